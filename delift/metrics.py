"""Scores of predictions against references: ROUGE-1 F, embedding cosine, exact-match accuracy; and
the likelihood scores (reference loss, option log-likelihood) from teacher-forced log-probabilities.

Accuracy is defined only for records whose `meta.answer_type` is "choice" (an option letter, as in
MMLU) or "number" (a final number, as in GSM8K); it is averaged over those records alone. A
prediction with no readable answer is wrong, and is also counted in `n_unparsed`. The likelihood
scores need no generation, so they carry no sampling or answer-parsing noise; the model calls
that give their log-probabilities are in delift.evaluation (this module loads no model).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np

from delift.errors import DeliftInputError

# How an option is scored (`eval.likelihood.option_format`): its letter and text as the records' outputs
# write them ("B. text", the answer choice_record's prompt asks for), its letter alone ("B", as
# lm-evaluation-harness scores MMLU after a prompt ending "Answer:"), or its text alone.
OptionFormat = Literal["letter", "text", "letter_text"]
# How an option's log-likelihood is compared (`eval.likelihood.normalize`): the sum over its tokens
# (lm-evaluation-harness's acc), per token, or per character (its acc_norm).
LengthNormalization = Literal["none", "token", "char"]

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
# Four options (MMLU's) when a record's own options cannot be read.
_DEFAULT_LETTERS = "ABCD"


def choice_options(rec: Mapping) -> list[str]:
    """The option texts of a multiple-choice record, in letter order ([] if it has no lettered block).

    delift.data.hub.choice_record writes the input as the question, then one "A. text" line per
    option; the block is read back from its last "A. " line, a line not opening the next letter
    belonging to the option before it (an option text with a line break).
    """
    lines = str(rec.get("input") or "").split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith("A. ")]
    if not starts:
        return []
    options: list[str] = []
    for line in lines[starts[-1]:]:
        next_letter = string.ascii_uppercase[len(options)] if len(options) < len(string.ascii_uppercase) else None
        if next_letter and line.startswith(f"{next_letter}. "):
            options.append(line[3:])
        else:
            options[-1] += "\n" + line
    return options


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'")


def _option_by_text(text: str, options: Sequence[str]) -> int | None:
    """The one option whose text the prediction is, else the one whose text it contains, else None."""
    prediction = _normalise(text)
    texts = [_normalise(option) for option in options]
    equal = [k for k, option in enumerate(texts) if option and option == prediction]
    if len(equal) == 1:
        return equal[0]
    contained = [k for k, option in enumerate(texts)
                 if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", prediction)]
    return contained[0] if len(contained) == 1 else None


def extract_choice(text: str, options: Sequence[str] = ()) -> str | None:
    """The option letter a prediction answers with, or None when it names none (or several).

    The first rule that finds exactly one letter decides, as in evaluation harnesses' answer
    extraction (a capital letter inside prose, "A good idea" or "Vitamin D", is no answer):
    1. a stated answer, the last one: "Answer: X", "The answer is (X)", "answer is: X";
    2. a letter alone or opening the prediction: "B", "B.", "B)", "(B)", "B: ...", "B. Paris";
    3. a letter in parentheses anywhere: "... so (B)";
    4. the text of exactly one option (`options`, in letter order: what the prediction is, else
       what it contains);
    5. a letter followed by "." or ")" anywhere: "... so B." or "option B) fits".
    Letters are those of the options (A-D when they are unknown).
    """
    letters = string.ascii_uppercase[:len(options)] if options else _DEFAULT_LETTERS
    letter = f"([{letters}])"
    stated = re.findall(rf"(?i:\banswer\b)\s*(?:is\s*)?(?::\s*)?\(?{letter}\)?(?![A-Za-z0-9])", text)
    if stated:
        return stated[-1]
    leading = re.match(rf"\s*[(\[]?{letter}(?:[.:)\]]|[ \t]*(?:\n|$))", text)
    if leading:
        return leading.group(1)
    in_parentheses = set(re.findall(rf"\({letter}\)", text))
    if len(in_parentheses) == 1:
        return in_parentheses.pop()
    by_text = _option_by_text(text, options) if options else None
    if by_text is not None:
        return letters[by_text]
    marked = set(re.findall(rf"(?<![\w.]){letter}[.)](?!\w)", text))
    return marked.pop() if len(marked) == 1 else None


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


def parse_answer(prediction: str, meta: Mapping, options: Sequence[str] = ()) -> str | float | None:
    """The answer a prediction gives, in the form of `meta.answer_type`; None when there is none to read."""
    kind = meta.get("answer_type")
    if kind == "choice":
        return extract_choice(prediction, options)
    if kind == "number":
        return extract_number(prediction)
    return None


def is_correct(prediction: str, meta: Mapping, options: Sequence[str] = ()) -> bool | None:
    """Exact-match correctness, or None where the record has no single checkable answer."""
    kind, answer = meta.get("answer_type"), meta.get("answer")
    if answer is None or kind not in ("choice", "number"):
        return None
    predicted = parse_answer(prediction, meta, options)
    if predicted is None:
        return False
    if kind == "choice":
        return predicted == str(answer).strip().upper()
    expected = extract_number(str(answer))
    return expected is not None and abs(predicted - expected) < 1e-6


def rouge1_f(predictions: list[str], references: list[str], use_stemmer: bool = False) -> list[float]:
    """ROUGE-1 F per pair, by rouge_score. `use_stemmer=False` is HF evaluate's `rouge` default, which
    the paper's reference code uses; Porter stemming (of tokens over 3 characters) is a setting."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=use_stemmer)
    return [scorer.score(ref, pred)["rouge1"].fmeasure for pred, ref in zip(predictions, references)]


def embedding_similarity(predictions: list[str], references: list[str], embedder) -> list[float]:
    """Cosine of the sentence embeddings of prediction and reference (the paper's "BGE" column)."""
    pred = embedder.encode([p if p.strip() else " " for p in predictions])
    ref = embedder.encode(references)
    return [float(x) for x in np.sum(pred * ref, axis=1)]


def _options_of(rec: Mapping) -> list[str]:
    """A choice record's options, checked against its answer letter."""
    meta = rec.get("meta") or {}
    if meta.get("answer_type") != "choice":
        return []
    options = choice_options(rec)
    answer = str(meta.get("answer", "")).strip().upper()
    if options and answer not in string.ascii_uppercase[:len(options)]:
        raise DeliftInputError(f"is {answer!r}, not one of the record's {len(options)} option letters",
                               record=rec.get("id"), field="meta.answer")
    return options


def score_predictions(records: list[dict], predictions: list[str], embedder,
                      rouge_stemmer: bool = False) -> tuple[dict, list[dict]]:
    """Aggregate metrics (means) and per-example scores.

    Rows of records with a checkable answer carry `correct` and `parsed_answer` (None: unparsed).
    """
    references = [r["output"] for r in records]
    rouge = rouge1_f(predictions, references, use_stemmer=rouge_stemmer)
    cosine = embedding_similarity(predictions, references, embedder)
    per_example, judged, unparsed = [], [], 0
    for rec, prediction, rouge_f, cos in zip(records, predictions, rouge, cosine):
        row = {"rouge1": rouge_f, "embed_sim": cos}
        meta, options = rec.get("meta") or {}, _options_of(rec)
        correct = is_correct(prediction, meta, options)
        if correct is not None:
            row["parsed_answer"] = parse_answer(prediction, meta, options)
            row["correct"] = bool(correct)
            judged.append(row["correct"])
            unparsed += row["parsed_answer"] is None
        per_example.append(row)
    metrics = {"rouge1": float(np.mean(rouge)), "embed_sim": float(np.mean(cosine))}
    if judged:
        metrics["accuracy"] = float(np.mean(judged))
        metrics["n_accuracy"] = len(judged)
        metrics["n_unparsed"] = unparsed
    return metrics, per_example


def option_continuations(rec: Mapping, option_format: OptionFormat = "letter_text") -> list[str]:
    """What each option of a choice record is scored as, in letter order ([] for other records)."""
    if option_format not in get_args(OptionFormat):
        raise DeliftInputError(f"unknown option format {option_format!r}; choose one of {get_args(OptionFormat)}",
                               field="eval.likelihood.option_format")
    options = _options_of(rec)
    forms = {"letter": lambda letter, text: letter, "text": lambda letter, text: text,
             "letter_text": lambda letter, text: f"{letter}. {text}"}[option_format]
    return [forms(letter, text) for letter, text in zip(string.ascii_uppercase, options)]


def option_score(log_probs: np.ndarray, text: str, normalize: LengthNormalization) -> float:
    """An option's log-likelihood from its tokens' log-probabilities: summed, per token or per character
    of `text`. An option with no tokens (an empty text) is never chosen."""
    if normalize not in get_args(LengthNormalization):
        raise DeliftInputError(f"unknown normalisation {normalize!r}; choose one of {get_args(LengthNormalization)}",
                               field="eval.likelihood.normalize")
    if len(log_probs) == 0:
        return -np.inf
    total = float(np.sum(log_probs))
    return {"none": total, "token": total / len(log_probs), "char": total / len(text)}[normalize]


def likelihood_scores(records: list[dict], reference_log_probs: list[np.ndarray] | None,
                      option_log_probs: list[list[np.ndarray]], option_texts: list[list[str]],
                      normalize: LengthNormalization = "none") -> tuple[dict, list[dict]]:
    """Aggregate metrics and per-example rows from teacher-forced log-probabilities.

    `reference_log_probs[i]`: of record i's reference tokens (output + EOS); None skips `ref_loss`.
    `option_log_probs[i][k]`: of option k's continuation `option_texts[i][k]` ([] for a record without
    options). Rows get `ref_loss` (mean token negative log-likelihood) and, for records with options,
    `ll_choice` (the letter of the highest-scoring option, the first on a tie) and `ll_correct`.
    Metrics: `ref_loss` (its mean over examples), `ll_accuracy` and `n_ll_accuracy`.
    """
    per_example: list[dict] = [{} for _ in records]
    metrics: dict = {}
    if reference_log_probs is not None:
        for row, log_probs in zip(per_example, reference_log_probs):
            row["ref_loss"] = -float(np.mean(log_probs))
        metrics["ref_loss"] = float(np.mean([row["ref_loss"] for row in per_example]))
    judged = []
    for rec, row, log_probs, texts in zip(records, per_example, option_log_probs, option_texts):
        if not texts:
            continue
        scores = [option_score(lp, text, normalize) for lp, text in zip(log_probs, texts)]
        row["ll_choice"] = string.ascii_uppercase[int(np.argmax(scores))]
        row["ll_correct"] = row["ll_choice"] == str(rec["meta"]["answer"]).strip().upper()
        judged.append(row["ll_correct"])
    if judged:
        metrics["ll_accuracy"] = float(np.mean(judged))
        metrics["n_ll_accuracy"] = len(judged)
    return metrics, per_example
