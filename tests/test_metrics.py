import numpy as np
import pytest

from delift.data.hub import choice_record
from delift.errors import DeliftInputError
from delift.metrics import (
    choice_options,
    extract_choice,
    extract_number,
    is_correct,
    likelihood_scores,
    option_continuations,
    option_score,
    rouge1_f,
    score_predictions,
)

# Rickets is the question; option B's text contains "Vitamin D", which is not option D.
RICKETS = choice_record("mmlu/rickets", "What causes rickets?", ["Scurvy", "Vitamin D deficiency", "Anaemia", "Goitre"],
                        1, source="mmlu", meta={})
CAPITALS = choice_record("mmlu/capital", "The capital of France?", ["Lyon", "Paris", "Marseille", "Nice"], 1,
                         source="mmlu", meta={})


def test_choice_options_are_read_back_from_the_record():
    assert choice_options(RICKETS) == ["Scurvy", "Vitamin D deficiency", "Anaemia", "Goitre"]
    multiline = choice_record("r", "Q?\nA. not an option line", ["one\ntwo", "three"], 0, source="t", meta={})
    assert choice_options(multiline) == ["one\ntwo", "three"]
    assert choice_options({"input": "no options here"}) == []


@pytest.mark.parametrize("prediction,expected", [
    ("B", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("(B)", "B"),
    ("B: because it is", "B"),
    ("B. Scurvy", "B"),                                # the letter leads, whatever text follows
    ("\nB\nBecause of the sun.", "B"),
    ("A good question. The answer is C", "C"),         # the article "A" is no answer
    ("The answer is (C)", "C"),
    ("Answer: D", "D"),
    ("The answer is: A", "A"),
    ("Answer: A. On reflection, the answer is C", "C"),  # the last stated answer
    ("It must be (B)", "B"),
    ("Vitamin D deficiency", "B"),                     # option B's text, not option D
    ("vitamin d deficiency.", "B"),
    ("I think it is Goitre", "D"),
    ("So the right one is B.", "B"),
    ("Either Scurvy or Anaemia", None),                # the texts of two options
    ("A good question.", None),
    ("Rickets comes from a lack of vitamin D in children", None),
    ("The answer is Carbon", None),
    ("Either (A) or (C), hard to say", None),
    ("", None),
])
def test_choice_parse_table(prediction, expected):
    assert extract_choice(prediction, choice_options(RICKETS)) == expected


def test_choice_without_options_reads_letters_a_to_d_only():
    assert extract_choice("Vitamin D deficiency") is None
    assert extract_choice("E.") is None
    assert extract_choice("The answer is (C)") == "C"


def test_extract_number():
    assert extract_number("so 5 + 3 = 8 apples") == 8.0
    assert extract_number("48/2 = 24\n#### 1,234") == 1234.0
    assert extract_number("no digits") is None


def test_is_correct_by_answer_type():
    assert is_correct("C. water", {"answer": "C", "answer_type": "choice"}) is True
    assert is_correct("A", {"answer": "C", "answer_type": "choice"}) is False
    assert is_correct("Paris", {"answer": "B", "answer_type": "choice"}, choice_options(CAPITALS)) is True
    assert is_correct("It is 72.", {"answer": "72", "answer_type": "number"}) is True
    assert is_correct("It is 71.", {"answer": "72", "answer_type": "number"}) is False
    assert is_correct("no number", {"answer": "72", "answer_type": "number"}) is False
    assert is_correct("Paris", {"answers": ["Paris"], "answer_type": "text"}) is None
    assert is_correct("Paris", {}) is None


def test_rouge1_hand_computed():
    # pred {the, cat, sat}, ref {a, cat, sat, down}: P = 2/3, R = 2/4, F = 4/7
    assert rouge1_f(["the cat sat"], ["a cat sat down"])[0] == pytest.approx(4 / 7)
    assert rouge1_f(["x"], ["y"])[0] == 0.0


def test_rouge1_stemming_is_a_setting_off_by_default():
    # Unstemmed: {the, cats, running} and {a, cat, runs} share nothing. Porter-stemmed (tokens over 3
    # characters): {the, cat, run} and {a, cat, run} share 2 of 3 each way, so P = R = F = 2/3.
    assert rouge1_f(["the cats running"], ["a cat runs"]) == [0.0]
    assert rouge1_f(["the cats running"], ["a cat runs"], use_stemmer=True)[0] == pytest.approx(2 / 3)


class FakeEmbedder:
    """Unit vectors by text, so cosines are known exactly."""

    table = {"yes": [1.0, 0.0], "no": [0.0, 1.0], "maybe": [0.6, 0.8]}

    def encode(self, texts):
        return np.array([self.table.get(t, [0.0, 1.0]) for t in texts], dtype=np.float32)


def test_score_predictions_aggregates_only_defined_accuracy():
    records = [
        {"output": "yes", "meta": {"answer": "A", "answer_type": "choice"}},
        {"output": "yes", "meta": {}},
    ]
    metrics, rows = score_predictions(records, ["A", "maybe"], FakeEmbedder())
    assert rows[0]["correct"] is True and "correct" not in rows[1]
    assert metrics["accuracy"] == 1.0 and metrics["n_accuracy"] == 1 and metrics["n_unparsed"] == 0
    assert metrics["embed_sim"] == pytest.approx((0.0 + 0.6) / 2)


def test_unparsed_answers_are_wrong_and_counted():
    records = [RICKETS, RICKETS, CAPITALS, {"id": "g", "output": "#### 3", "meta": {"answer": "3",
                                                                                   "answer_type": "number"}}]
    predictions = ["Vitamin D deficiency", "Either Scurvy or Anaemia", "Paris", "no idea"]
    metrics, rows = score_predictions(records, predictions, FakeEmbedder())
    assert [row["parsed_answer"] for row in rows] == ["B", None, "B", None]
    assert [row["correct"] for row in rows] == [True, False, True, False]
    assert metrics["accuracy"] == 0.5 and metrics["n_accuracy"] == 4 and metrics["n_unparsed"] == 2


def test_stemming_reaches_the_aggregate():
    records = [{"output": "a cat runs", "meta": {}}]
    assert score_predictions(records, ["the cats running"], FakeEmbedder())[0]["rouge1"] == 0.0
    stemmed = score_predictions(records, ["the cats running"], FakeEmbedder(), rouge_stemmer=True)[0]
    assert stemmed["rouge1"] == pytest.approx(2 / 3)


def test_an_answer_letter_outside_the_options_names_the_record():
    bad = dict(RICKETS, meta={"answer": "E", "answer_type": "choice"})
    with pytest.raises(DeliftInputError, match="record mmlu/rickets.*meta.answer"):
        score_predictions([bad], ["A"], FakeEmbedder())


def test_option_continuations_by_format():
    assert option_continuations(CAPITALS) == ["A. Lyon", "B. Paris", "C. Marseille", "D. Nice"]  # the outputs' form
    assert option_continuations(CAPITALS, "letter") == ["A", "B", "C", "D"]
    assert option_continuations(CAPITALS, "text") == ["Lyon", "Paris", "Marseille", "Nice"]
    assert option_continuations({"input": "no options", "meta": {}}, "letter") == []
    with pytest.raises(DeliftInputError, match="eval.likelihood.option_format"):
        option_continuations(CAPITALS, "number")


def test_length_normalisation_decides_between_a_short_and_a_long_option():
    # "Lyon": two tokens at -1 each (sum -2, -1 per token, -0.5 per character);
    # "Paris": one token at -1.5 (sum -1.5, -1.5 per token, -0.3 per character).
    lyon, paris = np.array([-1.0, -1.0]), np.array([-1.5])
    assert (option_score(lyon, "Lyon", "none"), option_score(paris, "Paris", "none")) == (-2.0, -1.5)
    assert (option_score(lyon, "Lyon", "token"), option_score(paris, "Paris", "token")) == (-1.0, -1.5)
    assert option_score(lyon, "Lyon", "char") == -0.5 and option_score(paris, "Paris", "char") == pytest.approx(-0.3)
    assert option_score(np.empty(0), "", "none") == -np.inf
    flat = [np.array([-9.0])] * 4
    texts = ["Lyon", "Paris", "Marseille", "Nice"]
    for normalize, choice in (("none", "B"), ("token", "A"), ("char", "B")):
        metrics, rows = likelihood_scores([CAPITALS], None, [[lyon, paris, *flat[2:]]], [texts], normalize)
        assert rows == [{"ll_choice": choice, "ll_correct": choice == "B"}]
        assert metrics == {"ll_accuracy": float(choice == "B"), "n_ll_accuracy": 1}


def test_ref_loss_is_the_mean_token_nll_per_example_then_over_examples():
    records = [{"output": "x", "meta": {}}, {"output": "y", "meta": {}}]
    metrics, rows = likelihood_scores(records, [np.array([-1.0, -3.0]), np.array([-0.5])], [[], []], [[], []])
    assert rows == [{"ref_loss": 2.0}, {"ref_loss": 0.5}]
    assert metrics == {"ref_loss": 1.25}
