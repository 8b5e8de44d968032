"""SelectIT (Liu et al., NeurIPS 2024): the model rates each example, and its uncertainty tempers the rating.

Three levels of "uncertainty-aware self-reflection":
- token level: the model reads a rating prompt + (instruction, response) and we take its next-token
  probabilities of the score tokens "1".."5", renormalised over the five. With s the most likely
  score, the token score is s * mean over the other four scores k of (p_s - p_k): a confident
  rating counts fully, a hesitant one is shrunk towards 0.
- sentence level: K rating prompts (different wordings) give K token scores; the example's score
  is mean / (1 + alpha * std), std the population standard deviation over the K.
- model level: a weighted mean of the sentence scores of several models, weights proportional to
  their parameter counts (one model by default: `ctx.model`).
The TOP fraction is kept (the reference port kept the bottom). Per-prompt score-token
log-probabilities are cached on disk, keyed by the model, the prompts and the records.
"""

from __future__ import annotations

import numpy as np
import torch

from delift.cache import cache_folder, cached_array, content_hash, records_hash
from delift.errors import DeliftInputError
from delift.generation import next_token_log_probs
from delift.records import record_prompt
from delift.selectors.base import Selection, SelectionContext, Selector, register

SCORE_TOKENS = ("1", "2", "3", "4", "5")

DEFAULT_RATING_PROMPTS = (
    "Rate how well the response below follows the instruction and answers it correctly, on a scale "
    "from 1 (poor) to 5 (excellent). Reply with the number only.",
    "On a scale of 1 to 5, how accurate and helpful is the following response to the given instruction? "
    "Answer with a single digit.",
    "Judge the quality of this instruction-response pair. Give a score between 1 and 5, where 5 means the "
    "response is fully correct and complete. Output only the score.",
    "Score the response from 1 to 5 for how faithfully it carries out the instruction and how correct its "
    "content is. Write just the score.",
    "How good is this answer to the instruction? Use a 1-5 scale (1 = wrong or unhelpful, 5 = correct and "
    "precise) and give only the number.",
)

RECORD_BLOCK = "{rating_prompt}\n\nInstruction: {prompt}\nResponse: {response}"
# Ends the user turn; kept free of surrounding whitespace so chat templates that trim content keep it.
SCORE_QUESTION = "\n\nScore (1-5):"


def score_token_ids(tokenizer) -> list[int]:
    """The vocabulary ids of "1".."5", each checked to be a single token.

    SentencePiece tokenizers may encode a lone digit as (word-start marker, digit): the marker
    alone decodes to nothing and is dropped.
    """
    ids = []
    for digit in SCORE_TOKENS:
        pieces = tokenizer.encode(digit, add_special_tokens=False)
        pieces = [p for p in pieces if tokenizer.decode([p]).strip()] if len(pieces) > 1 else pieces
        if len(pieces) != 1 or tokenizer.decode(pieces).strip() != digit:
            raise DeliftInputError(f"the score token {digit!r} is not a single token for this tokenizer "
                                   f"(encodes to {pieces})", field="model.tokenizer")
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise DeliftInputError(f"score tokens map to repeated ids {ids}", field="model.tokenizer")
    return ids


def token_level_scores(probs: np.ndarray) -> np.ndarray:
    """SelectIT's token-level score from probabilities of the scores 1..5 (last axis).

    The probabilities are renormalised over the five; with s = argmax (1-based) the score is
    s * sum_k (p_s - p_k) / 4 (the k = s term is zero, so this is the mean over the other four).
    """
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    best = probs.argmax(axis=-1)
    p_best = np.take_along_axis(probs, best[..., None], axis=-1)
    gap = (p_best - probs).sum(axis=-1) / (probs.shape[-1] - 1)
    return (best + 1) * gap


def sentence_level_scores(token_scores: np.ndarray, alpha: float) -> np.ndarray:
    """mean / (1 + alpha * std) over the K rating prompts (last axis); std with ddof=0."""
    token_scores = np.asarray(token_scores, dtype=np.float64)
    return token_scores.mean(axis=-1) / (1.0 + alpha * token_scores.std(axis=-1))


def model_level_scores(sentence_scores: list[np.ndarray], model_sizes: list[float]) -> np.ndarray:
    """Mean of per-model sentence scores weighted by model size (weights sum to 1)."""
    weights = np.asarray(model_sizes, dtype=np.float64)
    if len(weights) != len(sentence_scores) or len(weights) == 0 or (weights <= 0).any():
        raise DeliftInputError(f"need one positive size per model, got {list(model_sizes)}", field="selector.models")
    weights = weights / weights.sum()
    return np.einsum("m,mn->n", weights, np.stack([np.asarray(s, dtype=np.float64) for s in sentence_scores]))


def rating_sequences(tokenizer, records: list[dict], rating_prompts, *, max_length: int,
                     use_chat_template: bool = True) -> list[list[int]]:
    """Token ids of every (record, rating prompt) pair, record-major: index = record * K + prompt.

    Each sequence ends where the model's next token is the score. Over-long sequences lose the
    end of the record block, never the closing question.
    """
    chat = use_chat_template and getattr(tokenizer, "chat_template", None)
    sequences = []
    for rec in records:
        for rating_prompt in rating_prompts:
            user = RECORD_BLOCK.format(rating_prompt=rating_prompt, prompt=record_prompt(rec),
                                       response=rec["output"]) + SCORE_QUESTION
            if chat:
                text = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                     add_generation_prompt=True, tokenize=False)
            else:
                text = user + "\n"  # the score then starts a line, without a leading space
            cut = text.rfind(SCORE_QUESTION)
            head = tokenizer.encode(text[:cut], add_special_tokens=not chat)
            tail = tokenizer.encode(text[cut:], add_special_tokens=False)
            if len(tail) >= max_length:
                raise DeliftInputError(f"max_length {max_length} leaves no room for the record",
                                       field="selector.max_length")
            sequences.append(head[: max_length - len(tail)] + tail)
    return sequences


@torch.inference_mode()
def score_token_log_probs(loaded, sequences: list[list[int]], *, batch_size: int = 16,
                          progress: bool = True) -> np.ndarray:
    """(len(sequences), 5) float32: log p(score token | sequence) under the full-vocabulary softmax."""
    log_probs = next_token_log_probs(loaded.model, loaded.tokenizer, sequences, score_token_ids(loaded.tokenizer),
                                     batch_size=batch_size, progress=progress, desc="SelectIT rating")
    return log_probs.astype(np.float32)


def model_size(model) -> int:
    return sum(p.numel() for p in model.parameters())


@register("selectit")
class SelectITSelector(Selector):
    """Keep the top `fraction` of the pool by SelectIT score.

    `extra_models`: further model specs (with `.load()`), rated like `ctx.model` and combined
    with it by size-weighted mean (SelectIT's model level).
    """

    def __init__(self, fraction: float = 0.3, rating_prompts=DEFAULT_RATING_PROMPTS, alpha: float = 0.2,
                 batch_size: int = 16, max_length: int = 1024, use_chat_template: bool = True,
                 extra_models=()):
        super().__init__(fraction)
        self.rating_prompts = [str(p) for p in rating_prompts]
        if not self.rating_prompts:
            raise DeliftInputError("needs at least one rating prompt", field="selector.rating_prompts")
        self.alpha = float(alpha)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.use_chat_template = bool(use_chat_template)
        self.extra_models = list(extra_models)

    def rating_log_probs(self, loaded, records, ctx: SelectionContext) -> np.ndarray:
        """(n, K, 5) score-token log-probabilities of one model, cached when `ctx.cache_dir` is set."""
        shape = (len(records), len(self.rating_prompts), len(SCORE_TOKENS))

        def compute():
            sequences = rating_sequences(loaded.tokenizer, records, self.rating_prompts, max_length=self.max_length,
                                         use_chat_template=self.use_chat_template)
            flat = score_token_log_probs(loaded, sequences, batch_size=self.batch_size, progress=ctx.progress)
            return flat.reshape(shape)

        if ctx.cache_dir is None:
            return compute()
        key = content_hash("selectit/v1", loaded.identity, self.rating_prompts, RECORD_BLOCK, SCORE_QUESTION,
                           self.max_length, self.use_chat_template, records_hash(records))
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
