"""The exact utility engines: distances d(y_i | context) for blocks of rows and columns.

d = ||p - 1||_2 / sqrt(T), p_t = full-vocabulary softmax probability of the t-th target token under
teacher forcing, T = response tokens + the closing EOS.

- naive (the oracle): one full teacher-forced pass per (row, column) pair, whole-string
  tokenisation, the model's own logits at every position; length-bucketed padded batches.
- fast (same numbers): each demonstration block (the one-shot prompt up to `{prompt_i}`) runs
  once per tile and its KV cache is reused by every query of that column; batches mix pairs of
  any columns, bucketed by query length, over a fresh cache per batch: one buffer per layer
  holding copies of the blocks (never mutated) and room for the queries, written in place; on
  CPU, SDPA reads the grouped key/value heads without copying them. Queries that open with the
  same tokens (a shared instruction) run that opening once per column, as an extension of the
  block. The decoder runs for hidden
  states and the output head only at the scored positions; the final EOS, which predicts
  nothing, is not fed. Pairs whose tokens merge across the boundary, or that need truncation,
  take the whole-string path (still head-at-scored-positions).
- Rotary embeddings that depend on the pass's length (Phi-3's LongRoPE switches to its long
  factors once a pass exceeds `original_max_position_embeddings`, for every position of it): a
  block cached in a short pass would not match the long pass it joins, and a short sequence
  padded into a long batch would take the long factors. Pairs past that length take the
  whole-string path, sequences are batched only with others on the same side of it, and every
  sequence is fed whole, as the naive oracle feeds it. Dynamic NTK scaling recomputes its
  frequencies from the longest pass seen so far (order-dependent): sequences past its length are refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers.cache_utils import Cache, DynamicLayer

from delift.errors import DeliftInputError
from delift.generation import right_pad
from delift.utility.formatting import ScoredSequence, UtilityInputs

# Logit elements the fast engine's output head holds at once (128 MB in fp32).
HEAD_CHUNK_ELEMENTS = 1 << 25

# Queries that open with this many identical tokens (a shared instruction, say) share their KV.
MIN_SHARED_TOKENS = 8

ProgressHook = Callable[[int], None]

# transformers' switch for SDPA's own grouped-query attention (read on every attention call).
FORCE_GQA = "TRANSFORMERS_SDPA_FORCE_GQA"


def length_batches(lengths: Sequence, batch_size: int) -> list[list[int]]:
    """Indices sorted longest first (memory peaks early), cut into batches of similar length.

    A length may be a tuple (e.g. query length, then cached block length): later entries order ties.
    """
    order = sorted(range(len(lengths)), key=lambda k: lengths[k], reverse=True)  # stable: ties keep index order
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def _device(model) -> torch.device:
    return next(model.parameters()).device


def rotary_scaling_limit(model) -> tuple[int, str] | None:
    """(length, rope type) for a model whose rotary frequencies change with the pass's length past
    `length` tokens (longrope, dynamic NTK); None for fixed rotary embeddings."""
    config = getattr(model, "config", None)
    params = getattr(config, "rope_parameters", None) or {}
    kind = params.get("rope_type") if isinstance(params, dict) else None
    if kind == "longrope":
        limit = params.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings")
        return int(limit), kind
    if kind and "dynamic" in kind:
        return int(config.max_position_embeddings), kind
    return None


def _rotary_groups(scaling: tuple[int, str] | None, lengths: Sequence[int]) -> list[list[int]]:
    """Sequence indices that may share a batch: all of them, or (rotary `scaling`, see
    `rotary_scaling_limit`) those up to the model's limit and those past it."""
    if scaling is None:
        return [list(range(len(lengths)))]
    limit, kind = scaling
    longer = [k for k, n in enumerate(lengths) if n > limit]
    if longer and kind != "longrope":
        raise DeliftInputError(f"{len(longer)} utility sequence(s) exceed {limit} tokens, past which this model's "
                               f"{kind} rotary scaling depends on the order of passes; set kernel.max_length <= {limit}",
                               field="kernel.max_length")
    return [group for group in ([k for k, n in enumerate(lengths) if n <= limit], longer) if group]


class _Batch:
    """Right-padded inputs of a batch and where its targets sit."""

    def __init__(self, sequences: Sequence[ScoredSequence], *, feed_last: bool, pad_id: int, device):
        self.ids, self.mask = right_pad([s.context + (s.targets if feed_last else s.targets[:-1])
                                         for s in sequences], pad_id)
        owner, position, slot, targets = [], [], [], []
        for b, seq in enumerate(sequences):
            # The position of token k predicts token k + 1: the context's EOS predicts the first target.
            first = len(seq.context) - 1
            owner += [b] * len(seq.targets)
            position += range(first, first + len(seq.targets))
            slot += range(len(seq.targets))
            targets += seq.targets
        self.ids, self.mask = self.ids.to(device), self.mask.to(device)
        self.owner = torch.tensor(owner, device=device)
        self.position = torch.tensor(position, device=device)
        self.slot = torch.tensor(slot, device=device)
        self.targets = torch.tensor(targets, device=device)
        self.lengths = torch.tensor([len(s.targets) for s in sequences], dtype=torch.float32, device=device)

    def distances(self, probabilities: torch.Tensor) -> torch.Tensor:
        """||p - 1|| / sqrt(T) per sequence, summed in a fixed order (bitwise reproducible)."""
        squares = torch.zeros((len(self.lengths), int(self.lengths.max())), dtype=torch.float32,
                              device=probabilities.device)
        squares[self.owner, self.slot] = (probabilities - 1.0) ** 2
        return torch.sqrt(squares.sum(dim=1) / self.lengths)


def _target_probabilities(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(1, targets[:, None]).squeeze(1).exp()


def _head_probabilities(model, hidden: torch.Tensor, batch: _Batch) -> torch.Tensor:
    """The output head applied only at the scored positions, in memory-bounded chunks."""
    head = model.get_output_embeddings()
    scored = hidden[batch.owner, batch.position]
    step = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    return torch.cat([_target_probabilities(head(scored[s:s + step]), batch.targets[s:s + step])
                      for s in range(0, len(scored), step)])


@torch.inference_mode()
def check_output_head(model, token_ids: Sequence[int]) -> None:
    """The fast engine's decoder + head must give the model's own logits (no soft-capping, scaling...)."""
    ids = torch.tensor([list(token_ids)], device=_device(model))
    reference = model(input_ids=ids).logits.float()
    ours = model.get_output_embeddings()(model.get_decoder()(input_ids=ids).last_hidden_state).float()
    tolerance = 1e-3 * max(1.0, float(reference.abs().max()))
    if float((reference - ours).abs().max()) > tolerance:
        raise DeliftInputError("this model post-processes its output-layer logits, which the fast engine's "
                               "head-at-scored-positions skips; use engine='naive'", field="kernel.engine")


@torch.inference_mode()
def sequence_distances(model, sequences: Sequence[ScoredSequence], *, naive: bool, pad_id: int, batch_size: int,
                       on_scored: ProgressHook | None = None) -> np.ndarray:
    """d for each whole sequence. naive: the model's full logits; else decoder + head at targets."""
    out = np.zeros(len(sequences), dtype=np.float32)
    lengths = [len(s.context) + len(s.targets) for s in sequences]
    scaling = rotary_scaling_limit(model)
    # With length-dependent rotary factors the pass's length matters: feed the last token as the oracle does.
    feed_last = naive or scaling is not None
    batches = [[group[k] for k in index] for group in _rotary_groups(scaling, lengths)
               for index in length_batches([lengths[k] for k in group], batch_size)]
    for index in batches:
        batch = _Batch([sequences[k] for k in index], feed_last=feed_last, pad_id=pad_id, device=_device(model))
        if naive:
            logits = model(input_ids=batch.ids, attention_mask=batch.mask).logits
            probabilities = _target_probabilities(logits[batch.owner, batch.position], batch.targets)
        else:
            hidden = model.get_decoder()(input_ids=batch.ids, attention_mask=batch.mask,
                                         use_cache=False).last_hidden_state
            probabilities = _head_probabilities(model, hidden, batch)
        out[index] = batch.distances(probabilities).cpu().numpy()
        if on_scored:
            on_scored(len(index))
    return out


class _PrefilledLayer(DynamicLayer):
    """One layer's cache in a buffer allocated once for the blocks and the tokens still to come.

    DynamicLayer concatenates on every update, which copies the whole cache; here the new keys
    and values are written in place after the blocks.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int):
        super().__init__()
        self.keys, self.values, self.filled = keys, values, filled
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.filled + key_states.shape[-2]
        self.keys[:, :, self.filled:end] = key_states
        self.values[:, :, self.filled:end] = value_states
        self.filled = end
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_seq_length(self) -> int:
        return self.filled


class BlockCache:
    """Cached demonstration blocks: per layer, all blocks' keys (and values) packed one after the
    other along the sequence, (kv heads, total length + 1, head dim), the last position all zeros.

    Packed rather than padded, so memory is the blocks' total length; a batch gathers its blocks
    in one indexing per layer, each right-aligned after zero padding (masked, but it must be
    finite: 0 * NaN would still reach the attention output).
    """

    def __init__(self, lengths: Sequence[int]):
        self.lengths = torch.tensor(list(lengths), dtype=torch.long)
        self.offsets = torch.cumsum(self.lengths, 0) - self.lengths
        self.keys, self.values = [], []  # per layer, allocated when its first block is stored

    def store(self, block: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Block `block`'s (heads, length, head dim) keys and values at `layer`."""
        if layer == len(self.keys):
            size = (keys.shape[0], int(self.lengths.sum()) + 1, keys.shape[-1])
            self.keys.append(keys.new_zeros(size))
            self.values.append(values.new_zeros(size))
        start = int(self.offsets[block])
        self.keys[layer][:, start:start + keys.shape[1]] = keys
        self.values[layer][:, start:start + values.shape[1]] = values

    def for_batch(self, blocks: Sequence[int], room: int) -> tuple[Cache, torch.Tensor]:
        """A fresh cache holding the `blocks`, left-padded to the longest, with `room` positions
        after them for the tokens to run; and the blocks' attention mask."""
        index = list(blocks)
        lengths = self.lengths[index]
        width = int(lengths.max())
        step = torch.arange(width)
        padding = (width - lengths)[:, None]
        zero_slot = self.keys[0].shape[1] - 1
        where = torch.where(step >= padding, self.offsets[index][:, None] + step - padding, zero_slot)
        where = where.to(self.keys[0].device)
        layers = []
        for keys, values in zip(self.keys, self.values):
            heads, _, head_dim = keys.shape
            batch_keys = keys.new_empty((len(blocks), heads, width + room, head_dim))
            batch_values = values.new_empty((len(blocks), heads, width + room, head_dim))
            batch_keys[:, :, :width] = keys[:, where].transpose(0, 1)
            batch_values[:, :, :width] = values[:, where].transpose(0, 1)
            layers.append(_PrefilledLayer(batch_keys, batch_values, width))
        return Cache(layers=layers), (step >= padding).long().to(where.device)


@torch.inference_mode()
def demonstration_caches(model, blocks: Sequence[Sequence[int]], *, pad_id: int, batch_size: int) -> BlockCache:
    """Every demonstration block run once, in right-padded batches (under the causal mask a
    block's own positions never see the padding after it), its keys and values kept."""
    cached = BlockCache([len(b) for b in blocks])
    device = _device(model)
    for index in length_batches([len(b) for b in blocks], batch_size):
        ids, mask = right_pad([blocks[k] for k in index], pad_id)
        cache = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True).cache
        for row, k in enumerate(index):
            length = len(blocks[k])
            for layer, computed in enumerate(cache.layers):
                cached.store(k, layer, computed.keys[row, :, :length], computed.values[row, :, :length])
    return cached


@torch.inference_mode()
def extend_caches(model, cached: BlockCache, blocks: Sequence[int], head: Sequence[int], *,
                  batch_size: int) -> BlockCache:
    """The `blocks` of `cached`, each continued by the same `head` tokens (the opening its queries share)."""
    blocks = list(blocks)
    extended = BlockCache([int(cached.lengths[b]) + len(head) for b in blocks])
    device = _device(model)
    head_ids = torch.tensor([list(head)], device=device)
    for start in range(0, len(blocks), batch_size):
        chunk = range(start, min(start + batch_size, len(blocks)))
        cache, block_mask = cached.for_batch([blocks[k] for k in chunk], len(head))
        width = block_mask.shape[1]
        positions = block_mask.sum(dim=1, keepdim=True) + torch.arange(len(head), device=device)[None, :]
        attention = torch.cat([block_mask, torch.ones((len(chunk), len(head)), dtype=torch.long, device=device)], 1)
        cache = model.get_decoder()(input_ids=head_ids.expand(len(chunk), -1), attention_mask=attention,
                                    position_ids=positions, cache=cache, use_cache=True).cache
        for row, k in enumerate(chunk):
            first = width - int(cached.lengths[blocks[k]])  # drop the left padding
            for layer, computed in enumerate(cache.layers):
                extended.store(k, layer, computed.keys[row, :, first:], computed.values[row, :, first:])
    return extended


def shared_heads(queries: Sequence[Sequence[int]]) -> list[tuple[list[int], list[int]]]:
    """(head, members): groups of >= 2 queries opening with the same MIN_SHARED_TOKENS tokens, and
    the longest prefix all members share. Queries in no group are left out."""
    openings = {}
    for k, query in enumerate(queries):
        if len(query) >= MIN_SHARED_TOKENS:
            openings.setdefault(tuple(query[:MIN_SHARED_TOKENS]), []).append(k)
    groups = []
    for members in openings.values():
        if len(members) < 2:
            continue
        head = list(queries[members[0]])
        for k in members[1:]:
            other = queries[k]
            shared = next((t for t, (a, b) in enumerate(zip(head, other)) if a != b), min(len(head), len(other)))
            head = head[:shared]
        groups.append((head, members))
    return groups


@torch.inference_mode()
def query_distances(model, cached: BlockCache, pairs: Sequence[tuple[int, ScoredSequence]], *, pad_id: int,
                    batch_size: int, on_scored: ProgressHook | None = None) -> np.ndarray:
    """d for each (demonstration block index, query sequence) pair, the block read from `cached`.

    Pairs of any columns share a batch, bucketed by query length: the cached blocks are
    left-padded (masked) and each query keeps its true positions, block length + t. Cached keys
    already carry their rotary positions, so where a block sits in the padded cache is immaterial.
    The blocks are copied into every batch's cache, so `cached` is never mutated.
    """
    out = np.zeros(len(pairs), dtype=np.float32)
    device = _device(model)
    # Pairs of one row share a query length; ordering them by block length keeps the padded cache short.
    lengths = [(len(s.context) + len(s.targets), int(cached.lengths[b])) for b, s in pairs]
    for index in length_batches(lengths, batch_size):
        blocks = [pairs[k][0] for k in index]
        batch = _Batch([pairs[k][1] for k in index], feed_last=False, pad_id=pad_id, device=device)
        cache, block_mask = cached.for_batch(blocks, batch.ids.shape[1])
        block_lengths = block_mask.sum(dim=1, keepdim=True)
        # Padding sits at position 0: masked either way, and then the batch's largest position is a real
        # token's (length-dependent rotary scaling reads it).
        positions = (block_lengths + torch.arange(batch.ids.shape[1], device=device)[None, :]) * batch.mask
        hidden = model.get_decoder()(input_ids=batch.ids, attention_mask=torch.cat([block_mask, batch.mask], dim=1),
                                     position_ids=positions, cache=cache, use_cache=True).last_hidden_state
        out[index] = batch.distances(_head_probabilities(model, hidden, batch)).cpu().numpy()
        if on_scored:
            on_scored(len(index))
    return out


def zero_shot_distances(model, inputs: UtilityInputs, rows: Sequence[int], *, engine: str, batch_size: int,
                        on_scored: ProgressHook | None = None) -> np.ndarray:
    """d(y_i | x_i) for `rows`, without a demonstration."""
    return sequence_distances(model, [inputs.zero_shot_sequence(i) for i in rows], naive=engine == "naive",
                              pad_id=inputs.pad_id, batch_size=batch_size, on_scored=on_scored)


def one_shot_distances(model, inputs: UtilityInputs, rows: Sequence[int], cols: Sequence[int], *, engine: str,
                       batch_size: int, pair_mask: np.ndarray | None = None,
                       on_scored: ProgressHook | None = None) -> np.ndarray:
    """d(y_i | demo_j, x_i) for the (len(rows), len(cols)) block; pairs outside `pair_mask` stay 0."""
    rows, cols = list(rows), list(cols)
    wanted = np.ones((len(rows), len(cols)), dtype=bool) if pair_mask is None else np.asarray(pair_mask, dtype=bool)
    out = np.zeros((len(rows), len(cols)), dtype=np.float32)
    if engine == "naive":
        whole = np.argwhere(wanted)
    else:
        direct = wanted & inputs.boundary_safe(rows, cols) & inputs.fits(rows, cols)
        if (scaling := rotary_scaling_limit(model)) is not None:  # a cached short block would keep short factors
            direct &= inputs.pair_lengths(rows, cols) <= scaling[0]
        direct[:, [len(inputs.demo[j]) == 0 for j in cols]] = False
        whole = np.argwhere(wanted & ~direct)
        pairs = np.argwhere(direct)
        if len(pairs):
            out[pairs[:, 0], pairs[:, 1]] = _cached_block_distances(model, inputs, rows, cols, pairs,
                                                                    batch_size=batch_size, on_scored=on_scored)
    if len(whole):
        sequences = inputs.one_shot_sequences([(rows[r], cols[c]) for r, c in whole])
        out[whole[:, 0], whole[:, 1]] = sequence_distances(model, sequences, naive=engine == "naive",
                                                           pad_id=inputs.pad_id, batch_size=batch_size,
                                                           on_scored=on_scored)
    return out


@contextlib.contextmanager
def _grouped_query_attention(model):
    """On CPU, let SDPA read the shared key/value heads directly instead of copying them once per
    query head (transformers does that whenever there is a mask; torch's CPU kernel gives the same
    bits either way). Not on GPUs, where a masked GQA call would leave the fused kernels."""
    if _device(model).type != "cpu":
        yield
        return
    before = os.environ.get(FORCE_GQA)
    os.environ[FORCE_GQA] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FORCE_GQA]
        else:
            os.environ[FORCE_GQA] = before


def _cached_block_distances(model, inputs: UtilityInputs, rows, cols, pairs: np.ndarray, *, batch_size: int,
                            on_scored: ProgressHook | None) -> np.ndarray:
    """d for (row position, column position) `pairs` whose parts concatenate exactly, over cached blocks.

    Each column's block runs once (the tile's columns bound the caches held at once); queries of a
    group sharing an opening run that opening once per column too, as an extension of the block.
    """
    with _grouped_query_attention(model):
        used = sorted(set(pairs[:, 1].tolist()))
        slot = {c: k for k, c in enumerate(used)}
        cached = demonstration_caches(model, [inputs.demo[cols[c]] for c in used], pad_id=inputs.pad_id,
                                      batch_size=batch_size)
        out = np.zeros(len(pairs), dtype=np.float32)
        alone = np.ones(len(pairs), dtype=bool)
        for head, members in shared_heads([inputs.query[i] for i in rows]):
            chosen = np.flatnonzero(np.isin(pairs[:, 0], members))
            group_cols = sorted(set(pairs[chosen, 1].tolist()))
            if len(chosen) == len(group_cols):
                continue  # one pair per column: nothing to share
            extended = extend_caches(model, cached, [slot[c] for c in group_cols], head, batch_size=batch_size)
            where = {c: k for k, c in enumerate(group_cols)}
            out[chosen] = query_distances(
                model, extended, [(where[c], inputs.query_sequence(rows[r], skip=len(head))) for r, c in pairs[chosen]],
                pad_id=inputs.pad_id, batch_size=batch_size, on_scored=on_scored)
            alone[chosen] = False
        rest = np.flatnonzero(alone)
        if len(rest):
            out[rest] = query_distances(model, cached, [(slot[c], inputs.query_sequence(rows[r]))
                                                        for r, c in pairs[rest]],
                                        pad_id=inputs.pad_id, batch_size=batch_size, on_scored=on_scored)
        return out
