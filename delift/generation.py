"""Batched generation: greedy by default, left-padded, prompts sorted by length; stops where the model
would end its turn (`stop_token_ids`). Teacher-forced scoring of given continuations and next tokens."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import RepetitionPenaltyLogitsProcessor

from delift.errors import DeliftInputError

# Prompts longer than this lose their start (demonstrations first), in generation and scoring alike.
MAX_PROMPT_TOKENS = 1024


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded so that every sequence ends in the last column."""
    return _pad(sequences, pad_id, left=True)


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded: every sequence starts in the first column."""
    return _pad(sequences, pad_id, left=False)


def _pad(sequences, pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        columns = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, columns] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask


END_OF_TURN_PROBE = "delift-end-of-turn-probe"


def end_of_turn_token_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (Phi-3's <|end|>,
    ChatML's <|im_end|>, Llama 3's <|eot_id|>), or None without a template or such a token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": END_OF_TURN_PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects this conversation has no usable answer here
        return None
    if END_OF_TURN_PROBE not in text:
        return None
    after = tokenizer(text.split(END_OF_TURN_PROBE, 1)[1].lstrip(), add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return int(after[0]) if after and after[0] in special else None


def stop_token_ids(model, tokenizer) -> list[int]:
    """Where generation stops: the model's generation-config EOS ids (Phi-3 lists three), the
    tokenizer's EOS and the chat template's end-of-turn token (not always the EOS), without repeats."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids += [tokenizer.eos_token_id, end_of_turn_token_id(tokenizer)]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
             progress: bool = True) -> list[str]:
    """Continue each prompt; returns the new text only, in the order of `prompts`.

    `repetition_penalty` > 1 divides the positive logits (multiplies the negative ones) of the tokens already in
    the prompt or the output, as vLLM and HF do (1.0: off).
    """
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    stop_ids = stop_token_ids(model, tokenizer)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress):
        batch = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in batch], tokenizer.pad_token_id)
        width = ids.shape[1]
        # Left padding is not part of a prompt: HF's plain repetition_penalty would count the pad token
        # (often the EOS) as already seen in the shorter rows, so the penalty skips each row's padding.
        penalty = [] if repetition_penalty == 1.0 else [RepetitionPenaltyLogitsProcessor(
            float(repetition_penalty), prompt_ignore_length=(width - mask.sum(dim=1)).to(device))]
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                                   pad_token_id=tokenizer.pad_token_id, logits_processor=penalty, **sampling)
        for row, i in enumerate(batch):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return outputs


@torch.no_grad()
def next_token_log_probs(model, tokenizer, sequences: list[list[int]], token_ids: list[int], *, batch_size: int = 8,
                         progress: bool = True, desc: str = "score tokens") -> np.ndarray:
    """(len(sequences), len(token_ids)) float64: log p(token | sequence), full-vocabulary softmax.

    Sequences are token ids, left-padded in length-sorted batches (little padding), with position
    ids that padding does not shift; only the last position goes through the output head.
    """
    ids = torch.tensor(token_ids)
    device = next(model.parameters()).device
    out = np.zeros((len(sequences), len(token_ids)), dtype=np.float64)
    order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not progress):
        input_ids, mask = left_pad([sequences[i] for i in batch], tokenizer.pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                       position_ids=positions.to(device), logits_to_keep=1).logits[:, -1, :]
        out[batch] = torch.log_softmax(logits.double(), dim=-1)[:, ids.to(device)].cpu().numpy()
    return out


@torch.no_grad()
def continuation_log_probs(model, tokenizer, prompts: list[list[int]], continuations: list[list[int]], *,
                           batch_size: int = 8, progress: bool = True,
                           desc: str = "score likelihoods") -> list[np.ndarray]:
    """Per (prompt, continuation) pair of token ids, log p(c_t | prompt, c_<t) of each continuation token
    (teacher forcing, full-vocabulary softmax), as float64 arrays in the order given.

    Batches are length-sorted and left-padded, with position ids that padding does not shift. A prompt
    with one continuation runs whole, prompt and continuation in one pass. A prompt with several (a
    multiple-choice question's options and its reference) runs once and its key/value cache scores
    the continuations: on MMLU about 3x faster than one pass per pair, the same scores to 1e-5.
    """
    if not all(prompts) or not all(continuations):
        raise ValueError("every prompt and every continuation needs at least one token")
    pairs_of: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        pairs_of.setdefault(tuple(prompt), []).append(i)
    alone = [pairs[0] for pairs in pairs_of.values() if len(pairs) == 1]
    shared = sorted((prompt for prompt, pairs in pairs_of.items() if len(pairs) > 1), key=len)
    out: list[np.ndarray] = [np.empty(0)] * len(prompts)
    pad_id = tokenizer.pad_token_id
    work = [partial(score_whole_sequences, batch, model, pad_id, prompts, continuations, out)
            for batch in whole_sequence_batches(alone, prompts, continuations, batch_size)]
    work += [partial(score_shared_prompts, {prompt: pairs_of[prompt] for prompt in shared[start:start + batch_size]},
                     model, pad_id, continuations, out, batch_size=batch_size)
             for start in range(0, len(shared), batch_size)]
    was_training = model.training
    model.eval()  # no LoRA dropout while scoring
    for score in tqdm(work, desc=desc, unit="batch", disable=not progress):
        score()
    model.train(was_training)
    return out


def whole_sequence_batches(pairs, prompts, continuations, batch_size: int) -> list[list[int]]:
    """The pair indices `pairs` in batches for `score_whole_sequences`, shortest prompt + continuation first
    (less padding per batch)."""
    order = sorted(pairs, key=lambda i: (len(prompts[i]) + len(continuations[i]), i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def score_whole_sequences(batch: list[int], model, pad_id: int, prompts, continuations, out: list) -> None:
    """Fill out[i] for each pair i of `batch` (at most a batch's worth), from prompt + continuation as one
    left-padded sequence: every continuation ends in the last column, so the output head runs only over the
    last (longest continuation + 1) columns."""
    device = next(model.parameters()).device
    input_ids, mask = left_pad([prompts[i] + continuations[i] for i in batch], pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    span = max(len(continuations[i]) for i in batch)
    # Column W - span - 1 + k predicts column W - span + k: drop the last column's prediction.
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                   position_ids=positions.to(device), logits_to_keep=span + 1).logits[:, :-1].float()
    targets = input_ids[:, -span:].to(device).unsqueeze(-1)
    picked = (logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)).double().cpu().numpy()
    for row, i in enumerate(batch):
        out[i] = picked[row, span - len(continuations[i]):]


@torch.no_grad()
def score_shared_prompts(pairs_of: dict[tuple, list[int]], model, pad_id: int, continuations, out: list, *,
                         batch_size: int) -> None:
    """Each prompt once; its last column scores the first token of its continuations, its cache the rest,
    in right-padded chunks of `batch_size` pairs at positions that go on from the prompt's end."""
    device = next(model.parameters()).device
    input_ids, mask = left_pad(list(pairs_of), pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    prompt_pass = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                        position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
    last = prompt_pass.logits[:, -1].float()
    last = last - torch.logsumexp(last, dim=-1, keepdim=True)
    pairs = [(row, i) for row, indices in enumerate(pairs_of.values()) for i in indices]
    chunks = [pairs[start:start + batch_size] for start in range(0, len(pairs), batch_size)]
    for chunk in chunks:
        rows = torch.tensor([row for row, _ in chunk])
        prompt_mask = mask[rows]
        chunk_continuations = [continuations[i] for _, i in chunk]
        first = last[rows.to(device), torch.tensor([c[0] for c in chunk_continuations], device=device)]
        rest = torch.empty((len(chunk), 0))
        if any(len(c) > 1 for c in chunk_continuations):
            # The cache grows in place: a chunk that is not the batch's only one works on a copy.
            cache = prompt_pass.cache if len(chunks) == 1 else copy.deepcopy(prompt_pass.cache)
            cache.batch_select_indices(rows.to(device))
            inputs, input_mask = right_pad([c[:-1] for c in chunk_continuations], pad_id)
            targets, _ = right_pad([c[1:] for c in chunk_continuations], pad_id)
            columns = prompt_mask.sum(-1, keepdim=True) + torch.arange(inputs.shape[1])
            attention = torch.cat([prompt_mask, input_mask], dim=1)
            logits = model(input_ids=inputs.to(device), attention_mask=attention.to(device),
                           position_ids=columns.to(device), cache=cache).logits.float()
            rest = logits.gather(-1, targets.to(device).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        first, rest = first.double().cpu().numpy(), rest.double().cpu().numpy()
        for k, (_, i) in enumerate(chunk):
            out[i] = np.concatenate([first[k:k + 1], rest[k, :len(continuations[i]) - 1]])


# The rating scale of SelectIT and of the Prometheus judge: each score is read as one next token.
SCORE_TOKENS = ("1", "2", "3", "4", "5")


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


def response_token_lengths(tokenizer, records: list[dict]) -> np.ndarray:
    """Each record's response (`output`) length in tokens, without special tokens (int64)."""
    encoded = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"] if records else []
    return np.array([len(ids) for ids in encoded], dtype=np.int64)


# Here, beside right_pad, rather than in a selector: a model-forward helper that selectors and
# delift.utility (which must not import selectors) can both reuse.
def weighted_mean_pooled_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) hidden states -> (B, H) float32: the mean over each sequence's tokens weighted by
    position, the t-th real token (1-based) weighing t / sum(1..L) (SGPT's weighting, used by RDS+).

    Positions count real tokens only, so padding on either side gets weight 0 and shifts nothing.
    """
    mask = attention_mask.to(device=hidden.device, dtype=torch.float32)
    positions = mask.cumsum(dim=1) * mask
    weights = positions / positions.sum(dim=1, keepdim=True).clamp_min(1.0)
    return (hidden.float() * weights[..., None]).sum(dim=1)
