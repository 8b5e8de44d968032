"""RDS+ (Ivison et al. 2025, "Large-scale data selection for instruction tuning", arXiv 2503.01807):
pick the pool examples whose hidden-state embeddings are closest to the query (target) examples.

As the authors' code does (hamishivi/automated-instruction-selection):

1. Embedding (compute_influence_cosinesim.py, `--pooling weighted_mean`): the whole training
   sequence, prompt + response + EOS, through the model being fine-tuned; the final layer's hidden
   states averaged with weights proportional to token position (1, 2, ..., L, normalised to sum
   to 1; SGPT's weighting), then L2-normalised. Pool and query examples alike.
2. Similarity: cosine of every query with every pool example.
3. Selection (get_top_influences.py, `--selection_method max`): round robin over the queries in
   order; at its turn a query takes the next pool example of its own ranking (most similar first,
   equal similarities by lower pool index); if that example was already taken the turn is spent
   and nothing is added. Rounds continue until the budget is filled.

Where we differ: a record's sequence is the one delift fine-tunes on (delift.training.encode_example:
the run's chat template or plain layout, over-long examples losing the start of their prompt),
not the authors' Tulu format truncated at the end; padded batches mask padding out of the weights
(the authors embed one example at a time, so they never pad).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

import numpy as np
import torch
from tqdm.auto import tqdm

from delift.cache import cache_folder, cached_array, content_hash
from delift.devices import model_device
from delift.errors import DeliftInputError
from delift.generation import right_pad, weighted_mean_pooled_states
from delift.schema import Range
from delift.selectors.base import Fraction, Selection, SelectionContext, Selector, register

POOLING = "position-weighted mean of the final hidden states, L2-normalised"


def round_robin_select(similarity: np.ndarray, budget: int) -> tuple[list[int], list[float], list[int]]:
    """RDS+'s round robin on a (queries, pool) similarity matrix.

    Returns the chosen pool indices in the order taken, the similarity each was taken with, and
    the query that took it.
    """
    n_queries, n_pool = similarity.shape
    ranked = np.argsort(-similarity, axis=1, kind="stable")  # stable: equal similarities by lower index
    taken = np.zeros(n_pool, dtype=bool)
    chosen, scores, takers = [], [], []
    for rank in range(n_pool):
        for query in range(n_queries):
            if len(chosen) == budget:
                return chosen, scores, takers
            candidate = int(ranked[query, rank])
            if taken[candidate]:
                continue  # the authors' rule: the turn is spent, not passed down the query's ranking
            taken[candidate] = True
            chosen.append(candidate)
            scores.append(float(similarity[query, candidate]))
            takers.append(query)
    return chosen, scores, takers


def sequences_hash(sequences: list[list[int]]) -> str:
    """SHA-256 of token sequences (lengths, then the tokens): cheaper than JSON for long pools."""
    digest = hashlib.sha256(np.array([len(s) for s in sequences], dtype=np.int64).tobytes())
    for sequence in sequences:
        digest.update(np.asarray(sequence, dtype=np.int64).tobytes())
    return digest.hexdigest()


@torch.inference_mode()
def sequence_embeddings(model, sequences: list[list[int]], pad_id: int, *, batch_size: int, progress: bool,
                        desc: str) -> np.ndarray:
    """(n, hidden) float32 unit rows: position-weighted mean of the final hidden states per sequence.

    Batches are length-sorted (longest first) and right-padded, so padding changes no real token's state.
    """
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    out = np.zeros((len(sequences), model.config.hidden_size), dtype=np.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = order[start:start + batch_size]
        ids, mask = right_pad([sequences[i] for i in batch], pad_id)
        hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        pooled = weighted_mean_pooled_states(hidden, mask)
        out[batch] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    return out


@register("rds")
class RDSSelector(Selector):
    """RDS+: round robin over the target (query) examples, each taking its most similar pool example."""

    def __init__(self, fraction: Fraction = 0.3, batch_size: Annotated[int, Range(1)] = 16,
                 max_length: Annotated[int, Range(1)] = 2048):
        super().__init__(fraction)
        for key, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DeliftInputError(f"must be a positive integer, got {value!r}", field=f"selector.{key}")
        self.batch_size = batch_size
        self.max_length = max_length

    def embeddings(self, ctx: SelectionContext, records: list[dict], role: str) -> np.ndarray:
        """Unit embeddings of `records`, cached under ctx.cache_dir by the token ids the model reads."""
        from delift.training import encode_for_selection  # imports Lightning: only when RDS runs

        loaded = ctx.model
        chat = bool(ctx.train_options.get("use_chat_template", True))  # the run's fine-tuning format
        sequences = [e["input_ids"] for e in encode_for_selection(loaded.tokenizer, records, self.max_length,
                                                                  use_chat_template=chat, key="selector.max_length",
                                                                  what=f"RDS+ {role} embeddings")]
        pad_id = loaded.tokenizer.pad_token_id
        pad_id = loaded.tokenizer.eos_token_id if pad_id is None else pad_id

        def compute() -> np.ndarray:
            model = loaded.model
            was_training = model.training
            model.eval()  # dropout off: an embedding is a function of the text
            try:
                return sequence_embeddings(model, sequences, pad_id, batch_size=self.batch_size,
                                           progress=ctx.progress, desc=f"RDS+ {role} embeddings")
            finally:
                model.train(was_training)

        if ctx.cache_dir is None:
            return compute()
        key = content_hash("rds/v1", loaded.identity, str(next(loaded.model.parameters()).dtype), POOLING,
                           self.max_length, sequences_hash(sequences))
        path = cache_folder(ctx.cache_dir, "rds_embeddings", key[:2]) / f"{key}.npy"
        return cached_array(path, compute, shape=(len(records), loaded.model.config.hidden_size), dtype=np.float32)

    def select(self, ctx: SelectionContext) -> Selection:
        if not ctx.target:
            raise DeliftInputError("RDS+ ranks the pool by similarity to the stage's target examples (its query "
                                   "set), and this stage has none: give it a target role or holdout.target",
                                   field="stage.roles.target")
        budget = self.budget(len(ctx.pool))
        pool_vectors = self.embeddings(ctx, ctx.pool, "pool").astype(np.float64)
        query_vectors = self.embeddings(ctx, ctx.target, "target").astype(np.float64)
        chosen, scores, takers = round_robin_select(query_vectors @ pool_vectors.T, budget)
        return Selection(indices=chosen, scores=scores, info={"n_queries": len(ctx.target), "taken_by": takers})
