import numpy as np
import pytest

from delift.metrics import extract_choice, extract_number, is_correct, rouge1_f, score_predictions


def test_extractors():
    assert extract_choice("B. Paris") == "B"
    assert extract_choice("The answer is (C)") == "C"
    assert extract_choice("none here") is None
    assert extract_number("so 5 + 3 = 8 apples") == 8.0
    assert extract_number("48/2 = 24\n#### 1,234") == 1234.0
    assert extract_number("no digits") is None


def test_is_correct_by_answer_type():
    assert is_correct("C. water", {"answer": "C", "answer_type": "choice"}) is True
    assert is_correct("A", {"answer": "C", "answer_type": "choice"}) is False
    assert is_correct("It is 72.", {"answer": "72", "answer_type": "number"}) is True
    assert is_correct("It is 71.", {"answer": "72", "answer_type": "number"}) is False
    assert is_correct("Paris", {"answers": ["Paris"], "answer_type": "text"}) is None
    assert is_correct("Paris", {}) is None


def test_rouge1_hand_computed():
    # pred {the, cat, sat}, ref {a, cat, sat, down}: P = 2/3, R = 2/4, F = 4/7
    assert rouge1_f(["the cat sat"], ["a cat sat down"])[0] == pytest.approx(4 / 7)
    assert rouge1_f(["x"], ["y"])[0] == 0.0


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
    assert metrics["accuracy"] == 1.0 and metrics["n_accuracy"] == 1
    assert metrics["embed_sim"] == pytest.approx((0.0 + 0.6) / 2)
