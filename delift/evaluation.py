"""Evaluation: prompts for the held-out records -> generation -> metrics (and the judge)."""

from __future__ import annotations

from delift.generation import generate
from delift.metrics import score_predictions
from delift.prompts import format_prompt


def evaluate(model, tokenizer, records: list[dict], embedder, *, max_new_tokens: int = 64, batch_size: int = 8,
             use_chat_template: bool = True, do_sample: bool = False, progress: bool = True,
             demonstrations: list[list[dict]] | None = None, judge=None,
             rouge_stemmer: bool = False) -> tuple[dict, list[dict]]:
    """Generate for each record and score; returns (metrics, prediction rows).

    `demonstrations[i]`, when given, are in-context examples placed before record i; `judge`, when
    given, adds the LLM-as-judge scores (delift.judge); `rouge_stemmer` (`eval.rouge_stemmer`)
    Porter-stems before ROUGE-1, off by default as in HF evaluate's rouge, the paper's metric.
    """
    prompts = [format_prompt(tokenizer, rec, use_chat_template=use_chat_template,
                             demonstrations=demonstrations[i] if demonstrations else ())
               for i, rec in enumerate(records)]
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           do_sample=do_sample, progress=progress)
    metrics, per_example = score_predictions(records, predictions, embedder, rouge_stemmer=rouge_stemmer)
    if judge is not None:
        judge_metrics, judge_rows = judge.judge(records, predictions)
        metrics |= judge_metrics
        per_example = [scores | extra for scores, extra in zip(per_example, judge_rows)]
    rows = [{"id": rec["id"], "prompt": prompt, "prediction": pred, "reference": rec["output"], **scores}
            for rec, prompt, pred, scores in zip(records, prompts, predictions, per_example)]
    return metrics, rows
