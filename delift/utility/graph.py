"""The candidate graph of the APPROXIMATE engines (knn, proxy): which (row, column) pairs they score.

Each row gets its `k` nearest columns by cosine of record vectors, plus `random` seeded random
other columns, so that the graph is not only local. Rows and columns may be different record sets
(pool x target, pool x existing). Where they are one pool (`self_pairs`), every row's nearest
column would be itself: the row's own pair (its self-utility, which the objectives include or
exclude at selection time) is always in the graph, and the `k` nearest are k *other* columns.
Record vectors are either the sentence embedder's (default) or the LLM's own mean-pooled
last-layer hidden states (`features="model"`, one pass per record).

Nearest neighbours come from faiss: an exact inner-product search (`IndexFlatIP`) up to
`flat_max` columns, above that an IVF index whose coarse quantiser is trained by k-means with a
fixed seed (`nlist` lists, `nprobe` searched). Both are deterministic for the same inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from delift.cache import cache_folder, cached_array, content_hash, records_hash
from delift.errors import DeliftInputError
from delift.generation import right_pad
from delift.records import record_text

FEATURES = ("embedder", "model")
ANN_DEFAULTS = {"flat_max": 20000, "nlist": None, "nprobe": 32}


@dataclass(frozen=True)
class CandidateGraph:
    """Candidate pairs in CSR layout: row i's columns are indices[indptr[i]:indptr[i + 1]], ascending."""

    indptr: np.ndarray  # (n_rows + 1,) int64
    indices: np.ndarray  # (nnz,) int64
    n_cols: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.indices)

    def pair_rows(self) -> np.ndarray:
        """(nnz,) the row of each pair, in CSR order."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), np.diff(self.indptr))


def _positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DeliftInputError(f"must be a positive integer, got {value!r}", field=field)
    return int(value)


def uses_ivf(n_cols: int, flat_max: int) -> bool:
    """Whether the neighbour search over n_cols columns is the seeded IVF index, not the exact flat one."""
    return n_cols > flat_max


def _ann_index(col_vectors: np.ndarray, *, flat_max: int, nlist: int | None, nprobe: int, seed: int):
    n, dim = col_vectors.shape
    if not uses_ivf(n, flat_max):
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = nlist or int(4 * math.sqrt(n))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed  # the k-means of the coarse quantiser: seeded, so the index is reproducible
        index.train(col_vectors)
        index.nprobe = min(nprobe, nlist)
    index.add(col_vectors)
    return index


def nearest_columns(row_vectors: np.ndarray, col_vectors: np.ndarray, k: int, *, flat_max: int = 20000,
                    nlist: int | None = None, nprobe: int = 32, seed: int = 0, chunk: int = 16384) -> np.ndarray:
    """(n_rows, min(k, n_cols)) int64: each row's nearest columns by inner product (unit vectors: cosine),
    nearest first. An IVF search that finds fewer than k columns for a row leaves -1 there."""
    k = min(_positive_int(k, "kernel.knn_k"), len(col_vectors))
    rows = np.ascontiguousarray(row_vectors, dtype=np.float32)
    index = _ann_index(np.ascontiguousarray(col_vectors, dtype=np.float32), flat_max=flat_max, nlist=nlist,
                       nprobe=nprobe, seed=seed)
    out = np.empty((len(rows), k), dtype=np.int64)
    for start in tqdm(range(0, len(rows), chunk), desc="nearest columns", unit="chunk",
                      disable=len(rows) <= chunk):
        _, out[start:start + chunk] = index.search(rows[start:start + chunk], k)
    return out


def candidate_graph(row_vectors: np.ndarray, col_vectors: np.ndarray, k: int, *, random: int = 0, seed: int = 0,
                    flat_max: int = 20000, nlist: int | None = None, nprobe: int = 32,
                    self_pairs: bool = False) -> CandidateGraph:
    """Each row's k nearest columns plus `random` seeded random columns (distinct from those; fewer
    only where the columns run out). With `self_pairs` (rows and columns are the same records), row i
    holds (i, i) and its k nearest columns other than i. Seeded: the same vectors and seed give the
    same graph."""
    if isinstance(random, bool) or not isinstance(random, (int, np.integer)) or random < 0:
        raise DeliftInputError(f"must be an integer >= 0, got {random!r}", field="kernel.knn_random")
    n_rows, n_cols = len(row_vectors), len(col_vectors)
    k = _positive_int(k, "kernel.knn_k")
    if self_pairs:
        if n_rows != n_cols:
            raise DeliftInputError(f"self pairs need as many rows as columns, got {n_rows} x {n_cols}",
                                   field="kernel.records")
        nearest = _others_then_self(nearest_columns(row_vectors, col_vectors, k + 1, flat_max=flat_max, nlist=nlist,
                                                    nprobe=nprobe, seed=seed), k)
    else:
        nearest = nearest_columns(row_vectors, col_vectors, k, flat_max=flat_max, nlist=nlist, nprobe=nprobe,
                                  seed=seed)
    if not random and (nearest >= 0).all():  # the common case, vectorised
        indices = np.sort(nearest, axis=1).reshape(-1)
        return CandidateGraph(indptr=np.arange(n_rows + 1, dtype=np.int64) * nearest.shape[1], indices=indices,
                              n_cols=n_cols)
    rng = np.random.default_rng(seed)
    per_row = []
    for i in range(n_rows):
        chosen = np.unique(nearest[i][nearest[i] >= 0])
        extra = min(int(random), n_cols - len(chosen))
        if extra:
            chosen = np.union1d(chosen, random_columns(rng, n_cols, chosen, extra))
        per_row.append(chosen)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(c) for c in per_row])
    indices = np.concatenate(per_row).astype(np.int64) if per_row else np.zeros(0, dtype=np.int64)
    return CandidateGraph(indptr=indptr, indices=indices, n_cols=n_cols)


def _others_then_self(nearest: np.ndarray, k: int) -> np.ndarray:
    """Row i's first k neighbours other than i (from a search of k + 1), and i itself as one more column;
    -1 where fewer were found (IVF)."""
    rows = np.arange(len(nearest))[:, None]
    others = np.where(nearest == rows, -1, nearest)
    # Stable: the neighbours keep their order, the removed self (now -1) moves to the end.
    others = np.take_along_axis(others, np.argsort(others < 0, axis=1, kind="stable"), axis=1)[:, :k]
    return np.concatenate([others, rows], axis=1)


def random_columns(rng: np.random.Generator, n_cols: int, exclude: np.ndarray, count: int) -> np.ndarray:
    """`count` distinct columns not in `exclude` (sorted), drawn by rejection: cheap when exclude << n_cols."""
    exclude = set(exclude.tolist())
    if count > n_cols - len(exclude):
        raise ValueError("not enough columns left to draw from")
    if 2 * (len(exclude) + count) > n_cols:  # dense case: draw from the explicit complement
        free = np.setdiff1d(np.arange(n_cols), np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
        return np.sort(rng.choice(free, size=count, replace=False))
    picked: set[int] = set()
    while len(picked) < count:
        for j in rng.integers(0, n_cols, size=2 * count).tolist():
            if j not in exclude and j not in picked and len(picked) < count:
                picked.add(j)
    return np.array(sorted(picked), dtype=np.int64)


@torch.inference_mode()
def model_vectors(model, tokenizer, texts: list[str], *, batch_size: int = 16, max_length: int = 512,
                  progress: bool = True) -> np.ndarray:
    """(n, hidden) float32 unit rows: the LLM's last-layer hidden states, mean-pooled over each text's tokens."""
    device = next(model.parameters()).device
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] or [tokenizer.eos_token_id]
               for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]), reverse=True)
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in tqdm(range(0, len(order), batch_size), desc="model features", unit="batch", disable=not progress):
        batch = order[start:start + batch_size]
        ids, mask = right_pad([encoded[i] for i in batch], pad_id)
        hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        weights = mask.to(device=device, dtype=torch.float32)[..., None]
        pooled = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)
        out[batch] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    return out


def record_vectors(records: list[dict], features: str, *, embedder=None, model=None, tokenizer=None,
                   model_identity: dict | None = None, cache_dir=None, batch_size: int = 16, max_length: int = 512,
                   progress: bool = True) -> np.ndarray:
    """Unit vectors of whole records (instruction + input + output) for the candidate graph and the proxy."""
    texts = [record_text(r) for r in records]
    if features == "embedder":
        if embedder is None:
            raise DeliftInputError("features 'embedder' need a sentence embedder", field="kernel.features")
        return embedder.encode(texts)
    if features != "model":
        raise DeliftInputError(f"unknown features {features!r}; choose one of {list(FEATURES)}",
                               field="kernel.features")
    compute = lambda: model_vectors(model, tokenizer, texts, batch_size=batch_size,  # noqa: E731
                                    max_length=max_length, progress=progress)
    if cache_dir is None:
        return compute()
    key = content_hash({"model": model_identity, "dtype": str(next(model.parameters()).dtype),
                        "max_length": max_length, "records": records_hash(records), "pooling": "mean last layer"})
    return cached_array(cache_folder(cache_dir, "model_features", key[:2]) / f"{key}.npy", compute, dtype=np.float32)


def features_identity(features: str, embedder=None) -> dict:
    """What the record vectors depend on beyond the records (the model's identity is in the kernel key)."""
    return {"features": features, "embedder": embedder.identity() if features == "embedder" else None}
