"""SelectIT (Liu et al., NeurIPS 2024): the model rates each example, and its uncertainty tempers the rating.

As the published code (github.com/Blue-Raincoat/SelectIT, self_reflection/*.py), three levels of
"uncertainty-aware self-reflection":
- token level: the model reads a rating prompt + (instruction, response) and we take its next-token
  probabilities of the score tokens "1".."5". They are renormalised over the five, then softmaxed
  (exp, renormalise). With s the most likely score, the token score is s * mean over the other four
  scores k of (p_s - p_k): a confident rating counts fully, a hesitant one is shrunk towards 0.
- sentence level: K rating prompts (different wordings) give K token scores; the example's score
  is mean / (1 + alpha * std), std the population standard deviation over the K.
- model level: a weighted mean of the sentence scores of several models, weights proportional to
  their parameter counts (one model by default: `ctx.model`).
The rating prompts and the answer layout are the original's by default (`rating_prompts` and
`layout`: "original" or "delift", see selectit_prompts.py). The TOP fraction is kept (the reference
port kept the bottom). Per-prompt score-token log-probabilities are cached on disk, keyed by the
model, the prompts, the layout and the records.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch

from delift.cache import cache_folder, cached_array, content_hash, records_hash
from delift.errors import DeliftInputError
from delift.generation import SCORE_TOKENS, next_token_log_probs, score_token_ids
from delift.records import record_prompt
from delift.selectors.base import Fraction, Selection, SelectionContext, Selector, register
from delift.selectors.selectit_prompts import LAYOUTS, RATING_PROMPTS, RatingLayout

log = logging.getLogger(__name__)



def resolve_rating_prompts(rating_prompts) -> list[str]:
    """A prompt-set name from selectit_prompts.RATING_PROMPTS, or the wordings themselves."""
    if isinstance(rating_prompts, str):
        if rating_prompts not in RATING_PROMPTS:
            raise DeliftInputError(f"unknown rating prompt set {rating_prompts!r}; choose one of "
                                   f"{sorted(RATING_PROMPTS)} or give a list of wordings",
                                   field="selector.rating_prompts")
        return list(RATING_PROMPTS[rating_prompts])
    prompts = [str(p) for p in rating_prompts]
    if not prompts:
        raise DeliftInputError("needs at least one rating prompt", field="selector.rating_prompts")
    return prompts


def resolve_layout(name: str) -> RatingLayout:
    if name not in LAYOUTS:
        raise DeliftInputError(f"unknown layout {name!r}; choose one of {sorted(LAYOUTS)}", field="selector.layout")
    return LAYOUTS[name]


def token_level_scores(probs: np.ndarray) -> np.ndarray:
    """SelectIT's token-level score from probabilities of the scores 1..5 (last axis).

    As the original (self_reflection/sentence_level.py:78-100): renormalise over the five, softmax
    the result (exp, renormalise), then with s = argmax (1-based) the score is
    s * sum_k (p_s - p_k) / 4 (the k = s term is zero, so this is the mean over the other four).
    The softmax squeezes the five into [1/(4+e), e/(4+e)], so scores lie in [0, 5(e-1)/(e+4)].
    """
    probs = np.asarray(probs, dtype=np.float64)
    exps = np.exp(probs / probs.sum(axis=-1, keepdims=True))
    soft = exps / exps.sum(axis=-1, keepdims=True)
    best = soft.argmax(axis=-1)
    p_best = np.take_along_axis(soft, best[..., None], axis=-1)
    gap = (p_best - soft).sum(axis=-1) / (soft.shape[-1] - 1)
    return (best + 1) * gap


def sentence_level_scores(token_scores: np.ndarray, alpha: float) -> np.ndarray:
    """mean / (1 + alpha * std) over the K rating prompts (last axis); std with ddof=0, as np.std in the
    original (self_reflection/sentence_level.py:101-103)."""
    token_scores = np.asarray(token_scores, dtype=np.float64)
    return token_scores.mean(axis=-1) / (1.0 + alpha * token_scores.std(axis=-1))


def model_level_scores(sentence_scores: list[np.ndarray], model_sizes: list[float]) -> np.ndarray:
    """Mean of per-model sentence scores weighted by model size (weights sum to 1), as in the paper.

    The original's model_level.py:115-117 hard-codes 7/20, 13/20 and 70/90 for LLaMA-2 7B/13B/70B;
    7/90 and 13/90 (size over total size, as the paper states) are taken to be meant.
    """
    weights = np.asarray(model_sizes, dtype=np.float64)
    if len(weights) != len(sentence_scores) or len(weights) == 0 or (weights <= 0).any():
        raise DeliftInputError(f"need one positive size per model, got {list(model_sizes)}", field="selector.models")
    weights = weights / weights.sum()
    return np.einsum("m,mn->n", weights, np.stack([np.asarray(s, dtype=np.float64) for s in sentence_scores]))


def rating_sequences(tokenizer, records: list[dict], rating_prompts, *, max_length: int,
                     layout: RatingLayout = LAYOUTS["original"], use_chat_template: bool = False,
                     cut: set | None = None) -> list[list[int]]:
    """Token ids of every (record, rating prompt) pair, record-major: index = record * K + prompt.

    Each sequence ends where the model's next token is the score. A sequence that fits is the
    whole text tokenized at once, as the original does; an over-long one loses the start of the
    record's prompt (as every selector fits records), never its response nor the closing question,
    with one warning naming selector.max_length and how many records (their ids go into `cut`); one
    that does not fit even without its prompt is an error naming selector.max_length.
    """
    chat = use_chat_template and getattr(tokenizer, "chat_template", None)

    def encode(rating_prompt: str, prompt: str, rec: dict) -> list[int]:
        user = layout.record_block.format(rating_prompt=rating_prompt, prompt=prompt, response=rec["output"]) \
            + layout.question
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                                 tokenize=False)
        else:
            text = user + layout.plain_end
        return tokenizer.encode(text, add_special_tokens=not chat)

    sequences, shortened = [], {}
    for rec in records:
        for rating_prompt in rating_prompts:
            prompt = record_prompt(rec)
            whole = encode(rating_prompt, prompt, rec)
            while len(whole) > max_length:
                prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
                if not prompt:
                    raise DeliftInputError(f"the rating prompt is {len(whole)} tokens even without the record's "
                                           f"prompt, more than selector.max_length={max_length} (the response is "
                                           "kept whole): raise selector.max_length or drop the record",
                                           record=rec["id"], field="output")
                excess = len(whole) - max_length
                prompt = tokenizer.decode(prompt_ids[excess:]) if excess < len(prompt_ids) else ""
                whole = encode(rating_prompt, prompt, rec)
                shortened[rec["id"]] = True
            sequences.append(whole)
    if shortened:
        log.warning("%d of %d records exceed selector.max_length=%d tokens in SelectIT's rating prompts: their "
                    "prompts lose their start (the response is kept whole); raise selector.max_length to keep them "
                    "whole", len(shortened), len(records), max_length)
        if cut is not None:
            cut.update(shortened)
    return sequences


@torch.inference_mode()
def score_token_log_probs(loaded, sequences: list[list[int]], *, batch_size: int = 16,
                          progress: bool = True) -> np.ndarray:
    """(len(sequences), 5) float32: log p(score token | sequence) under the full-vocabulary softmax."""
    log_probs = next_token_log_probs(loaded.model, loaded.tokenizer, sequences, score_token_ids(loaded.tokenizer),
                                     batch_size=batch_size, progress=progress, desc="SelectIT rating")
    return log_probs.astype(np.float32)


def model_size(model) -> int:
    """Parameters as configured, counting bitsandbytes 4-bit weights unpacked.

    A quantized Params4bit stores two 4-bit values per byte of storage (more for wider
    `quant_storage`), so its numel() undercounts; its `quant_state.shape` keeps the original
    shape. (transformers' num_parameters handles this too, but needs bitsandbytes imported.)
    """
    total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        total += math.prod(quant_state.shape) if quant_state is not None else param.numel()
    return total


@register("selectit")
class SelectITSelector(Selector):
    """Keep the top `fraction` of the pool by SelectIT score.

    `rating_prompts`: a prompt-set name ("original", "delift") or a list of wordings (K = its length).
    `layout`: how the pair is laid out and the score asked for ("original", "delift").
    `extra_models`: further model specs (with `.load()`), rated like `ctx.model` and combined
    with it by size-weighted mean (SelectIT's model level).
    """

    def __init__(self, fraction: Fraction = 0.3, rating_prompts: str | list[str] = "original", layout: str = "original",
                 alpha: float = 0.2, batch_size: int = 16, max_length: int = 1024, use_chat_template: bool = False,
                 extra_models=()):
        super().__init__(fraction)
        self.rating_prompts = resolve_rating_prompts(rating_prompts)
        self.layout = str(layout)
        self._layout = resolve_layout(self.layout)
        self.alpha = float(alpha)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.use_chat_template = bool(use_chat_template)
        self.extra_models = list(extra_models)

    def rating_log_probs(self, loaded, records, ctx: SelectionContext) -> np.ndarray:
        """(n, K, 5) score-token log-probabilities of one model, cached when `ctx.cache_dir` is set."""
        shape = (len(records), len(self.rating_prompts), len(SCORE_TOKENS))

        cut: set = set()
        sequences = rating_sequences(loaded.tokenizer, records, self.rating_prompts, max_length=self.max_length,
                                     layout=self._layout, use_chat_template=self.use_chat_template, cut=cut)

        def compute():
            flat = score_token_log_probs(loaded, sequences, batch_size=self.batch_size, progress=ctx.progress)
            return flat.reshape(shape)

        if ctx.cache_dir is None:
            return compute()
        # v2: a sequence that fits is tokenized whole (v1 always split it before the question). An over-long
        # record loses the start of its prompt (before: the end of its record block): marked in the key.
        key = content_hash("selectit/v2", loaded.identity, self.rating_prompts, dataclasses.asdict(self._layout),
                           self.max_length, self.use_chat_template, records_hash(records),
                           *(["prompt-start-cut"] if cut else []))
        path = cache_folder(ctx.cache_dir, "selectit", key) / "score_log_probs.npy"
        return cached_array(path, compute, shape=shape, dtype=np.float32)

    def sentence_scores(self, log_probs: np.ndarray) -> np.ndarray:
        probs = np.exp(log_probs - log_probs.max(axis=-1, keepdims=True))  # renormalised below, safely
        return sentence_level_scores(token_level_scores(probs), self.alpha)

    def select(self, ctx: SelectionContext) -> Selection:
        pool = ctx.pool
        budget = self.budget(len(pool))
        per_model, sizes, names = [], [], []
        loaded = ctx.model
        per_model.append(self.sentence_scores(self.rating_log_probs(loaded, pool, ctx)))
        sizes.append(model_size(loaded.model))
        names.append(loaded.name)
        for spec in self.extra_models:
            extra = spec.load(ctx.device)
            per_model.append(self.sentence_scores(self.rating_log_probs(extra, pool, ctx)))
            sizes.append(model_size(extra.model))
            names.append(extra.name)
            del extra  # one extra model in memory at a time
        scores = model_level_scores(per_model, sizes)
        ranked = np.lexsort((np.arange(len(pool)), -scores))  # highest score first, ties by index
        top = [int(i) for i in ranked[:budget]]
        return Selection(indices=top, scores=[float(scores[i]) for i in top],
                         info={"models": names, "model_sizes": sizes, "all_scores": scores.tolist()})
