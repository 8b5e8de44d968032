"""Evaluation: prompts for the held-out records -> generation -> metrics (and the judge), and the
teacher-forced likelihood scores of the same prompts."""

from __future__ import annotations

import numpy as np

from delift.generation import MAX_PROMPT_TOKENS, continuation_log_probs, generate
from delift.metrics import LengthNormalization, OptionFormat, likelihood_scores, option_continuations, score_predictions
from delift.prompts import format_prompt, response_token_ids


def evaluate(model, tokenizer, records: list[dict], embedder, *, max_new_tokens: int = 64, batch_size: int = 8,
             use_chat_template: bool = True, do_sample: bool = False, progress: bool = True,
             demonstrations: list[list[dict]] | None = None, judge=None,
             rouge_stemmer: bool = False, ref_loss: bool = True, option_ll: bool = True,
             option_format: OptionFormat = "letter_text",
             normalize: LengthNormalization = "none") -> tuple[dict, list[dict]]:
    """Generate for each record and score; returns (metrics, prediction rows).

    `demonstrations[i]`, when given, are in-context examples placed before record i; `judge`, when
    given, adds the LLM-as-judge scores (delift.judge); `rouge_stemmer` (`eval.rouge_stemmer`)
    Porter-stems before ROUGE-1, off by default as in HF evaluate's rouge, the paper's metric.
    `ref_loss` and `option_ll` (with `option_format`, `normalize`; `eval.likelihood`) add the
    likelihood scores of `record_likelihoods` on the same prompts.
    """
    prompts = [format_prompt(tokenizer, rec, use_chat_template=use_chat_template,
                             demonstrations=demonstrations[i] if demonstrations else ())
               for i, rec in enumerate(records)]
    predictions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           do_sample=do_sample, progress=progress)
    metrics, per_example = score_predictions(records, predictions, embedder, rouge_stemmer=rouge_stemmer)
    if ref_loss or option_ll:
        likelihood_metrics, likelihood_rows = record_likelihoods(
            model, tokenizer, records, prompts, ref_loss=ref_loss, option_ll=option_ll, option_format=option_format,
            normalize=normalize, batch_size=batch_size, progress=progress)
        metrics |= likelihood_metrics
        per_example = [scores | extra for scores, extra in zip(per_example, likelihood_rows)]
    if judge is not None:
        judge_metrics, judge_rows = judge.judge(records, predictions)
        metrics |= judge_metrics
        per_example = [scores | extra for scores, extra in zip(per_example, judge_rows)]
    rows = [{"id": rec["id"], "prompt": prompt, "prediction": pred, "reference": rec["output"], **scores}
            for rec, prompt, pred, scores in zip(records, prompts, predictions, per_example)]
    return metrics, rows


def likelihood_pairs(tokenizer, records: list[dict], prompts: list[str], *, ref_loss: bool = True,
                     option_ll: bool = True, option_format: OptionFormat = "letter_text"):
    """What `record_likelihoods` scores: per (prompt, continuation) pair, its (record index, option index
    or None for the reference), prompt token ids and continuation token ids; and each record's option texts."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-MAX_PROMPT_TOKENS:] for p in prompts]
    option_texts = [option_continuations(rec, option_format) if option_ll else [] for rec in records]
    jobs, continuations = [], []
    if ref_loss:
        for i, rec in enumerate(records):
            jobs.append((i, None))
            continuations.append(response_token_ids(tokenizer, rec))
    for i, texts in enumerate(option_texts):
        for k, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids:  # an empty option has no tokens to score (option_score never chooses it)
                jobs.append((i, k))
                continuations.append(ids)
    return jobs, [prompt_ids[i] for i, _ in jobs], continuations, option_texts


def record_likelihoods(model, tokenizer, records: list[dict], prompts: list[str], *, ref_loss: bool = True,
                       option_ll: bool = True, option_format: OptionFormat = "letter_text",
                       normalize: LengthNormalization = "none", batch_size: int = 8,
                       progress: bool = True) -> tuple[dict, list[dict]]:
    """Teacher-forced scores of each record after its prompt (delift.metrics.likelihood_scores).

    `ref_loss`: the mean token negative log-likelihood of the reference, tokenised as fine-tuning
    scores it (output + EOS); `option_ll`: each option of a multiple-choice record as a continuation
    of the prompt, the option with the highest (normalised) log-likelihood being the model's answer.
    Prompts lose their start beyond MAX_PROMPT_TOKENS, as in generation; a record's prompt runs once
    for all its continuations (`continuation_log_probs`).
    """
    jobs, prompt_ids, continuations, option_texts = likelihood_pairs(tokenizer, records, prompts, ref_loss=ref_loss,
                                                                     option_ll=option_ll, option_format=option_format)
    log_probs = continuation_log_probs(model, tokenizer, prompt_ids, continuations, batch_size=batch_size,
                                       progress=progress) if jobs else []
    reference = [np.empty(0) for _ in records]
    options = [[np.empty(0) for _ in texts] for texts in option_texts]
    for (i, k), scores in zip(jobs, log_probs):
        if k is None:
            reference[i] = scores
        else:
            options[i][k] = scores
    return likelihood_scores(records, reference if ref_loss else None, options, option_texts, normalize)
