"""LLM-as-judge: the score parser, the Prometheus prompt, the probability-weighted score, counting, configs."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from delift import judge as judge_module
from delift.errors import DeliftInputError
from delift.judge import (
    ABS_SYSTEM_PROMPT,
    DEFAULT_RUBRIC,
    REFERENCE_RUBRIC,
    Judge,
    absolute_prompt,
    check_score_position,
    expected_scores,
    parse_absolute,
    result_prefix,
    score_distributions,
)
from delift.models import HubModel, PackagedGGUFModel
from delift.records import make_record
from delift.generation import score_token_ids
from tests.helpers import compose_config


@pytest.mark.parametrize("text,score", [
    ("Feedback: The answer matches the reference. [RESULT] 4", 4),
    ("[RESULT]: 4", 4),
    ("[result] 5", 5),
    ("[RESULT] (2)", 2),
    ("[RESULT] [1]", 1),
    ("[RESULT] 4 \n\n", 4),
    ("[SCORE] 3", 3),
    ("Score: 3/5", 3),
    ("score of 2 out of 5", 2),
    ("Result: 5", 5),
    ("Fair. (Score 3)", 3),
    ("Weak. [Result] Score: 2", 2),
    ("Compared with the reference (Score 5), it is close. [RESULT] 4", 4),
    ("Score: 2. On reflection, Score: 5", 5),                 # two scores: the last, which ends the output
    ("First [RESULT] 2, then after more thought [RESULT] 4", 4),
    ("It deserves a score of 2 at first sight, but [RESULT] 4", 4),
])
def test_parse_absolute_reads_the_score_that_ends_the_output(text, score):
    assert parse_absolute(text) == score


@pytest.mark.parametrize("text", [
    "[RESULT] 6", "[RESULT] 0", "[RESULT] 45", "[RESULT] 4.5", "[RESULT] five",
    "The response is good, 4", "", "[RESULT]",
    "[RESULT] 4.", "[RESULT] 4. Thank you.", "[RESULT] 3 4",   # text after the score: none, as in prometheus-eval
    "[RESULT] 4 and then the judge kept writing",
])
def test_parse_absolute_refuses_malformed_and_out_of_range(text):
    assert parse_absolute(text) is None


def test_prompt_has_the_prometheus_sections_in_order():
    text = absolute_prompt("Name the capital.\nFrance", "Lyon", "Paris", DEFAULT_RUBRIC)
    assert text.startswith(ABS_SYSTEM_PROMPT + "\n\n###Task Description:\n")
    sections = ["###Task Description:", "###The instruction to evaluate:\nName the capital.\nFrance\n\n",
                "###Response to evaluate:\nLyon\n\n", "###Reference Answer (Score 5):\nParis\n\n",
                "###Score Rubrics:\n[", "Score 1: ", "Score 5: ", "###Feedback: "]
    positions = [text.index(section) for section in sections]
    assert positions == sorted(positions)
    assert text.endswith("\n\n###Feedback: ")
    assert '"Feedback: (write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"' in text


def test_result_prefix_ends_where_the_score_token_comes():
    assert result_prefix("Good answer. [RESULT] 4") == "Good answer. [RESULT] "
    assert result_prefix("Fine [Result]: 3 and [RESULT] 5") == "Fine [Result]: 3 and [RESULT] "  # the last
    assert result_prefix("Feedback cut by the token lim") == "Feedback cut by the token lim [RESULT] "
    assert result_prefix("") == "[RESULT] "


def test_expected_score_on_hand_computed_probabilities():
    probs = [
        [0.1, 0.2, 0.4, 0.2, 0.1],       # symmetric around 3
        [0.05, 0.05, 0.1, 0.3, 0.5],     # .05 + .1 + .3 + 1.2 + 2.5
        [2.0, 2.0, 0.0, 0.0, 0.0],       # renormalised: (1 + 2) / 2
        [0.0, 0.0, 0.0, 0.0, 1.0],
    ]
    np.testing.assert_allclose(expected_scores(probs), [3.0, 4.15, 1.5, 5.0], atol=1e-12)


class _DigitTokenizer:
    """Score digits at unusual ids, to show the judge takes them from the tokenizer."""

    pad_token_id = 0

    def __init__(self, digit_ids: dict[str, list[int]]):
        self.digit_ids = digit_ids

    def encode(self, text, add_special_tokens=False):
        return list(self.digit_ids[text])

    def decode(self, ids):
        names = {v[-1]: k for k, v in self.digit_ids.items()}
        return "".join(names.get(i, "") for i in ids)


class _LastTokenModel(torch.nn.Module):
    """Logits at the last position depend only on the last input token: `table[token]` at the score ids,
    a large logit elsewhere (mass outside the score tokens that renormalisation must drop)."""

    def __init__(self, vocab: int, score_ids: list[int], table: dict[int, list[float]]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.score_ids, self.table = vocab, score_ids, table
        self.calls = []

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep):
        self.calls.append((input_ids.clone(), attention_mask.clone(), position_ids.clone()))
        logits = torch.full((input_ids.shape[0], logits_to_keep, self.vocab), 8.0)
        for row, last in enumerate(input_ids[:, -1].tolist()):
            logits[row, -1, self.score_ids] = torch.log(torch.tensor(self.table[last]))
        return SimpleNamespace(logits=logits)


def test_score_distributions_renormalise_over_the_tokenizers_score_ids():
    ids = [41, 17, 33, 29, 50]  # "1".."5"
    tokenizer = _DigitTokenizer({str(k): [i] for k, i in zip(range(1, 6), ids)})
    table = {7: [0.1, 0.2, 0.4, 0.2, 0.1], 8: [0.01, 0.01, 0.02, 0.06, 0.1], 9: [0.2, 0.2, 0.2, 0.2, 0.2]}
    model = _LastTokenModel(60, ids, table)
    sequences = [[3, 4, 7], [8], [5, 9], [3, 4, 5, 6, 8]]
    probs = score_distributions(model, tokenizer, sequences, batch_size=3, progress=False)
    np.testing.assert_allclose(probs, [[0.1, 0.2, 0.4, 0.2, 0.1], [0.05, 0.05, 0.1, 0.3, 0.5],
                                       [0.2] * 5, [0.05, 0.05, 0.1, 0.3, 0.5]], atol=1e-9)
    np.testing.assert_allclose(expected_scores(probs), [3.0, 4.15, 3.0, 4.15], atol=1e-9)
    # Left padding: the shortest of a batch starts late, with positions counted from its first real token.
    input_ids, mask, positions = model.calls[0]
    assert input_ids[0].tolist() == [0, 0, 8] and mask[0].tolist() == [0, 0, 1] and positions[0, -1] == 0
    assert positions[-1].tolist() == [0, 1, 2]


def test_the_score_follows_the_result_marker_as_one_token(tiny_qwen2):
    tokenizer = tiny_qwen2.tokenizer
    check_score_position(tokenizer, score_token_ids(tokenizer))  # "[RESULT] 4" = "[RESULT] " + "4" for this tokenizer


def test_tokenizer_that_merges_space_and_digit_is_refused():
    class MergingTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text.replace(" 4", "\x01")]

    with pytest.raises(DeliftInputError, match="judge.model"):
        check_score_position(MergingTokenizer(), [ord(str(k)) for k in range(1, 6)])


def _records(n):
    return [make_record(f"r{i}", "Answer the question.", f"What is {i} + {i}?", str(2 * i)) for i in range(n)]


def test_judge_counts_parse_failures_and_weights_every_example(tiny_qwen2, monkeypatch):
    feedback = ["Correct. [RESULT] 4", "Cut before the score", "[RESULT] 6", "Score: 2"]
    seen = {}

    def fake_generate(model, tokenizer, prompts, **options):
        seen.update(prompts=prompts, **options)
        return list(feedback)

    monkeypatch.setattr(judge_module, "generate", fake_generate)
    tokenizer = tiny_qwen2.tokenizer
    ids = score_token_ids(tokenizer)
    model = _LastTokenModel(len(tokenizer), ids, {tokenizer.encode(" ")[-1]: [0.05, 0.05, 0.1, 0.3, 0.5]})
    judge = Judge(dataclasses.replace(tiny_qwen2, model=model), name="fake", max_new_tokens=16, progress=False)
    records = _records(4)
    metrics, rows = judge.judge(records, ["0", "2", "5", "7"])
    assert metrics == {"laj": 3.0, "laj_weighted": pytest.approx(4.15), "laj_parse_failures": 2, "laj_retried": 0,
                       "laj_n": 4}
    assert [row["laj"] for row in rows] == [4, None, None, 2]
    assert [row["judge_feedback"] for row in rows] == feedback
    assert [row["judge_attempts"] for row in rows] == [1, 1, 1, 1]  # greedy: no retries
    assert seen["max_new_tokens"] == 16 and seen["do_sample"] is False
    # Prompts are chat-formatted, whole (no truncation), and each weighted pass continues the judge's own text.
    assert all(p.endswith("<|im_start|>assistant\n") and "###Feedback: " in p for p in seen["prompts"])
    assert seen["max_prompt_tokens"] == max(len(tokenizer.encode(p, add_special_tokens=False))
                                            for p in seen["prompts"])
    scored = [tokenizer.decode(row[mask.bool()]) for call in model.calls for row, mask in zip(call[0], call[1])]
    assert any(text.endswith("Correct. [RESULT] ") for text in scored)
    assert any(text.endswith("Cut before the score [RESULT] ") for text in scored)


def test_judge_runs_end_to_end_on_a_tiny_model(tiny_qwen2):
    # Plumbing only: a random judge writes noise, which must be counted as failures, not scored.
    judge = Judge(tiny_qwen2, name="tiny", max_new_tokens=6, batch_size=2, progress=False)
    metrics, rows = judge.judge(_records(3), ["0", "2", "4"])
    assert metrics["laj_n"] == 3 and len(rows) == 3
    assert metrics["laj_parse_failures"] == sum(row["laj"] is None for row in rows)
    assert math.isnan(metrics["laj"]) == (metrics["laj_parse_failures"] == 3)
    assert all(1.0 <= row["laj_weighted"] <= 5.0 for row in rows)
    assert metrics["laj_weighted"] == pytest.approx(np.mean([row["laj_weighted"] for row in rows]))


def test_seeded_sampling_is_reproducible(tiny_qwen2):
    judge = Judge(tiny_qwen2, name="tiny", max_new_tokens=6, do_sample=True, seed=3, parse_retries=2,
                  progress=False)
    first = judge.judge(_records(2), ["0", "2"])
    assert judge.judge(_records(2), ["0", "2"]) == first


def test_long_fields_are_cut_and_plain_prompts_end_with_feedback(tiny_qwen2):
    judge = Judge(tiny_qwen2, name="tiny", max_field_tokens=4, use_chat_template=False)
    [prompt] = judge.prompts(_records(1), ["one two three four five six seven eight"])
    assert "###Response to evaluate:\none two three four [...]\n\n" in prompt
    assert prompt.endswith("###Feedback: ")


def test_bad_input_names_the_record_and_field(tiny_qwen2):
    judge = Judge(tiny_qwen2, name="tiny", progress=False)
    with pytest.raises(DeliftInputError, match="predictions"):
        judge.judge(_records(2), ["0"])
    with pytest.raises(DeliftInputError, match="record r1.*prediction"):
        judge.judge(_records(2), ["0", None])
    with pytest.raises(DeliftInputError, match="judge.rubric"):
        Judge(tiny_qwen2, name="tiny", rubric="[Is it good?]\nScore 1: bad\nScore 5: good")
    with pytest.raises(DeliftInputError, match="judge.rubric"):
        Judge(tiny_qwen2, name="tiny", rubric="paper")  # not a rubric name, and no rubric text
    with pytest.raises(DeliftInputError, match="judge.parse_retries"):
        Judge(tiny_qwen2, name="tiny", parse_retries=-1)
    with pytest.raises(DeliftInputError, match="judge.repetition_penalty"):
        Judge(tiny_qwen2, name="tiny", repetition_penalty=0)
    assert judge.judge([], [])[0]["laj_n"] == 0


@pytest.mark.parametrize("name,spec,stand_in", [
    ("prometheus", HubModel, False),
    ("smollm2_standin", PackagedGGUFModel, True),
])
def test_judge_configs_compose_and_instantiate_without_loading(name, spec, stand_in, tmp_path):
    cfg = compose_config([f"judge={name}"], output_dir=tmp_path)
    judge = instantiate(cfg.judge)
    assert isinstance(judge, Judge) and isinstance(judge.model, spec)
    assert judge.stand_in is stand_in and judge._loaded is None
    assert judge.rubric == DEFAULT_RUBRIC and judge.parse_retries == 10
    if name == "prometheus":  # prometheus-eval's defaults, as the paper's code ran it
        assert judge.model.name == "prometheus-eval/prometheus-7b-v2.0"
        assert (judge.do_sample, judge.temperature, judge.top_p, judge.repetition_penalty, judge.max_new_tokens) == \
            (True, 1.0, 0.9, 1.03, 1024)
    else:
        assert judge.do_sample is False and judge.repetition_penalty == 1.0 and judge.max_new_tokens == 64


@pytest.mark.parametrize("rubric,expected", [
    ("reference", REFERENCE_RUBRIC),
    ("default", DEFAULT_RUBRIC),
    ("'[Is it short?]\nScore 1: no\nScore 2: -\nScore 3: -\nScore 4: -\nScore 5: yes'",
     "[Is it short?]\nScore 1: no\nScore 2: -\nScore 3: -\nScore 4: -\nScore 5: yes"),
])
def test_rubric_is_a_name_or_a_text(rubric, expected, tmp_path):
    cfg = compose_config(["judge=prometheus", f"judge.rubric={rubric}"], output_dir=tmp_path)
    assert instantiate(cfg.judge).rubric == expected


def test_reference_rubric_is_the_papers_eight_criteria():
    assert REFERENCE_RUBRIC.startswith("[Evaluate the model's ability to follow instructions and deliver a "
                                       "high-quality response across the following dimensions:\n1. **Instruction")
    criteria = ["Instruction Following", "Accuracy", "Relevance", "Completeness", "Depth", "Clarity", "Creativity",
                "Helpfulness"]
    assert all(f"{k}. **{name}**: " in REFERENCE_RUBRIC for k, name in enumerate(criteria, start=1))
    assert "?]\nScore 1: The response fails to meet expectations" in REFERENCE_RUBRIC
    assert REFERENCE_RUBRIC.endswith("Score 5: The response excels in all or nearly all criteria. It fully follows "
                                     "the instruction, is highly accurate, directly relevant, complete, and "
                                     "demonstrates depth and insight. The response is well-organized, creative where "
                                     "appropriate, and very helpful in addressing the user's needs.")


def test_no_judge_config_is_empty(tmp_path):
    cfg = compose_config(["judge=none"], output_dir=tmp_path)
    assert not cfg.get("judge")


def test_direct_grading_takes_the_most_probable_score_and_parses_nothing(tiny_qwen2, toy_records):
    judge = Judge(tiny_qwen2, name="tiny", feedback=False, progress=False)
    metrics, rows = judge.judge(toy_records[:3], ["Paris", "Green", "Eight"])
    assert metrics["laj_parse_failures"] == 0 and metrics["laj_n"] == 3
    assert all(row["judge_feedback"] == "" and row["laj"] in (1, 2, 3, 4, 5) for row in rows)
    assert 1.0 <= metrics["laj_weighted"] <= 5.0
    assert metrics["laj"] == np.mean([row["laj"] for row in rows])


def _scripted_judge(tiny_qwen2, monkeypatch, outputs_per_call, **options):
    """A judge whose generate() returns the next scripted list of outputs; the calls are recorded."""
    calls = []

    def scripted_generate(model, tokenizer, prompts, **generate_options):
        calls.append((list(prompts), generate_options))
        return list(outputs_per_call[len(calls) - 1])

    monkeypatch.setattr(judge_module, "generate", scripted_generate)
    tokenizer = tiny_qwen2.tokenizer
    model = _LastTokenModel(len(tokenizer), score_token_ids(tokenizer),
                            {tokenizer.encode(" ")[-1]: [0.05, 0.05, 0.1, 0.3, 0.5]})
    judge = Judge(dataclasses.replace(tiny_qwen2, model=model), name="scripted", progress=False, **options)
    return judge, calls


def test_two_scores_take_the_last(tiny_qwen2, monkeypatch):
    judge, calls = _scripted_judge(tiny_qwen2, monkeypatch, [["A score of 2 at first; on reflection [RESULT] 4"]])
    metrics, rows = judge.judge(_records(1), ["2"])
    assert rows[0]["laj"] == 4 and metrics["laj"] == 4.0 and len(calls) == 1


def test_a_failed_parse_is_sampled_again_and_the_retry_scores(tiny_qwen2, monkeypatch):
    first = ["Good. [RESULT] 4", "Cut before the sc", "[RESULT] 2"]
    judge, calls = _scripted_judge(tiny_qwen2, monkeypatch, [first, ["Now whole. [RESULT] 5"]],
                                   do_sample=True, top_p=0.9, repetition_penalty=1.03, parse_retries=3)
    metrics, rows = judge.judge(_records(3), ["0", "2", "4"])
    assert len(calls) == 2 and calls[1][0] == [calls[0][0][1]]      # only the failed prompt, once more
    assert calls[1][1] == calls[0][1] and calls[1][1]["do_sample"] is True and calls[1][1]["top_p"] == 0.9
    assert calls[1][1]["repetition_penalty"] == 1.03
    assert [row["laj"] for row in rows] == [4, 5, 2]
    assert [row["judge_feedback"] for row in rows] == ["Good. [RESULT] 4", "Now whole. [RESULT] 5", "[RESULT] 2"]
    assert [row["judge_attempts"] for row in rows] == [1, 2, 1]
    assert metrics["laj_parse_failures"] == 0 and metrics["laj_retried"] == 1
    assert metrics["laj"] == pytest.approx(11 / 3)


def test_retries_exhausted_count_as_a_parse_failure(tiny_qwen2, monkeypatch):
    outputs = [["[RESULT] 3", "rambling"], ["still rambling"], ["[RESULT] 4. Done."]]
    judge, calls = _scripted_judge(tiny_qwen2, monkeypatch, outputs, do_sample=True, parse_retries=2)
    metrics, rows = judge.judge(_records(2), ["0", "2"])
    assert len(calls) == 3
    assert [row["laj"] for row in rows] == [3, None]
    assert rows[1]["judge_feedback"] == "rambling" and rows[1]["judge_attempts"] == 3  # the first output stays
    assert metrics["laj_parse_failures"] == 1 and metrics["laj_retried"] == 1 and metrics["laj"] == 3.0


def test_greedy_feedback_is_not_retried(tiny_qwen2, monkeypatch):
    judge, calls = _scripted_judge(tiny_qwen2, monkeypatch, [["no score"]], do_sample=False, parse_retries=10)
    metrics, _ = judge.judge(_records(1), ["0"])
    assert len(calls) == 1 and metrics["laj_parse_failures"] == 1
