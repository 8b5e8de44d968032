"""Scores of predictions against references: ROUGE-1 F, embedding cosine, exact-match accuracy.

Accuracy is defined only for records whose `meta.answer_type` is "choice" (a letter A-D, as in
MMLU) or "number" (a final number, as in GSM8K); it is averaged over those records alone.
"""

from __future__ import annotations

import re

import numpy as np

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_CHOICE = re.compile(r"\b([A-D])\b")


def extract_choice(text: str) -> str | None:
    """The first standalone option letter A-D (as in "B", "(B)", "B. Paris", "Answer: B")."""
    match = _CHOICE.search(text)
    return match.group(1) if match else None


def extract_number(text: str) -> float | None:
    """The number after a GSM8K-style '####', else the last number in the text."""
    tail = text.split("####")[-1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    try:
        return float(numbers[-1 if "####" not in text else 0].replace(",", ""))
    except ValueError:
        return None


def is_correct(prediction: str, meta: dict) -> bool | None:
    """Exact-match correctness, or None where the record has no single checkable answer."""
    kind, answer = meta.get("answer_type"), meta.get("answer")
    if answer is None:
        return None
    if kind == "choice":
        return extract_choice(prediction) == str(answer).strip().upper()
    if kind == "number":
        predicted, expected = extract_number(prediction), extract_number(str(answer))
        return predicted is not None and expected is not None and abs(predicted - expected) < 1e-6
    return None


def rouge1_f(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    return [scorer.score(ref, pred)["rouge1"].fmeasure for pred, ref in zip(predictions, references)]


def embedding_similarity(predictions: list[str], references: list[str], embedder) -> list[float]:
    """Cosine of the sentence embeddings of prediction and reference (the paper's "BGE" column)."""
    pred = embedder.encode([p if p.strip() else " " for p in predictions])
    ref = embedder.encode(references)
    return [float(x) for x in np.sum(pred * ref, axis=1)]


def score_predictions(records: list[dict], predictions: list[str], embedder) -> tuple[dict, list[dict]]:
    """Aggregate metrics (means) and per-example scores."""
    references = [r["output"] for r in records]
    rouge = rouge1_f(predictions, references)
    cosine = embedding_similarity(predictions, references, embedder)
    correct = [is_correct(p, r.get("meta") or {}) for p, r in zip(predictions, records)]
    per_example = []
    for i in range(len(records)):
        row = {"rouge1": rouge[i], "embed_sim": cosine[i]}
        if correct[i] is not None:
            row["correct"] = bool(correct[i])
        per_example.append(row)
    metrics = {"rouge1": float(np.mean(rouge)), "embed_sim": float(np.mean(cosine))}
    judged = [c for c in correct if c is not None]
    if judged:
        metrics["accuracy"] = float(np.mean(judged))
        metrics["n_accuracy"] = len(judged)
    return metrics, per_example
