"""APPROXIMATE engines: sparse utility kernels on a candidate graph (nothing n_rows x n_cols is allocated).

- knn: the exact utility of every candidate pair (each row's k nearest columns + `knn_random`
  random ones; for one pool, the row's own pair + its k nearest others); every other pair is missing.
- proxy: the exact utility of a seeded sample (the candidate pairs of `sample.rows` rows, plus
  `sample.random` random columns each); a small network trained on them (delift.utility.proxy)
  predicts every candidate pair; measured pairs keep their exact value.

The result is a scipy CSR matrix (float32 UF). How a missing entry counts is the reader's choice
(delift.utility.kernel.similarity_floor): the selectors' default `missing="neutral"` reads
it as UF = 0; `missing="bottom"` (and the objectives given a raw sparse kernel) min-max the stored
entries, so it is similarity 0, the bottom of the scale (submodlib's sparse convention).

Cache folder (the exact kernel's key parts + the approximation): `graph_indptr.npy`,
`graph_indices.npy` and `scored_rows.npy` / `scored_cols.npy` (the pairs measured, so a resumed
run scores the same ones), zero-shot tiles over the scored rows, one `pairs_c*.npy` tile per
column span, and when done `kernel_indptr.npy`, `kernel_indices.npy`, `kernel_data.npy`
(memory-mappable) with `approximation.json`. Every file is written atomically.
"""

from __future__ import annotations

import json

import numpy as np
import scipy.sparse as sp

from delift.cache import UnreadableCacheFile, file_lock, load_npy, save_json, save_npy
from delift.errors import DeliftInputError
from delift.utility.formatting import UtilityInputs
from delift.utility.graph import ANN_DEFAULTS, CandidateGraph, candidate_graph, random_columns, record_vectors
from delift.utility.lightning import TileRun, run_tiles
from delift.utility.plan import sampled_row_count
from delift.utility.tiles import plan_pair_tiles, plan_tiles

KERNEL_PARTS = ("kernel_indptr.npy", "kernel_indices.npy", "kernel_data.npy")
DETAILS_FILE = "approximation.json"


def load_sparse_kernel(folder, shape) -> tuple[sp.csr_matrix, dict] | None:
    """The finished sparse kernel (memory-mapped arrays) and its details, or None."""
    if folder is None or not all((folder / name).exists() for name in KERNEL_PARTS + (DETAILS_FILE,)):
        return None
    try:
        indptr, indices, data = (load_npy(folder / name, mmap=True) for name in KERNEL_PARTS)
    except UnreadableCacheFile:
        return None
    if len(indptr) != shape[0] + 1 or data.dtype != np.float32 or len(indices) != len(data):
        raise DeliftInputError("is not a sparse kernel of this shape; delete the folder to recompute", file=folder)
    details = json.loads((folder / DETAILS_FILE).read_text(encoding="utf-8"))
    return sp.csr_matrix((data, indices, indptr), shape=shape, copy=False), details


def _cached(folder, names: tuple[str, ...], compute) -> tuple[np.ndarray, ...]:
    """int64 arrays computed together and saved once in the kernel folder, so a resumed run uses the same pairs."""
    if folder is None:
        return tuple(np.asarray(array, dtype=np.int64) for array in compute())
    paths = [folder / name for name in names]
    with file_lock(paths[0]):
        if all(path.exists() for path in paths):
            try:
                return tuple(np.asarray(load_npy(path, dtype=np.int64)) for path in paths)
            except UnreadableCacheFile:
                pass  # a half-written file: compute them again, and overwrite
        arrays = tuple(np.asarray(array, dtype=np.int64) for array in compute())
        for path, array in zip(paths, arrays):
            save_npy(path, array)
        return arrays


def _graph(folder, row_vectors, col_vectors, *, knn_k, knn_random, seed, ann, self_pairs) -> CandidateGraph:
    def build():
        graph = candidate_graph(row_vectors, col_vectors, knn_k, random=knn_random, seed=seed, self_pairs=self_pairs,
                                **ann)
        return graph.indptr, graph.indices

    indptr, indices = _cached(folder, ("graph_indptr.npy", "graph_indices.npy"), build)
    return CandidateGraph(indptr=indptr, indices=indices, n_cols=len(col_vectors))


def proxy_sample(graph: CandidateGraph, sample: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs the proxy learns from: every candidate pair of a seeded set of rows, plus
    `sample["random"]` other random columns per sampled row; (rows, cols), sorted row-major."""
    rng = np.random.default_rng([seed, 1])  # a stream apart from the graph's random columns
    count = sampled_row_count(graph.n_rows, sample.get("rows", 0.1))
    chosen = np.sort(rng.choice(graph.n_rows, size=count, replace=False))
    extra = int(sample.get("random", 0))
    rows, cols = [], []
    for i in chosen:
        candidates = graph.indices[graph.indptr[i]:graph.indptr[i + 1]]
        more = min(extra, graph.n_cols - len(candidates))
        picked = np.union1d(candidates, random_columns(rng, graph.n_cols, candidates, more)) if more else candidates
        rows.append(np.full(len(picked), i, dtype=np.int64))
        cols.append(np.asarray(picked, dtype=np.int64))
    return np.concatenate(rows), np.concatenate(cols)


def score_pairs(model, tokenizer, rows, cols, pair_rows: np.ndarray, pair_cols: np.ndarray, *, template,
                engine: str, batch_size: int, tile_size: int, max_length: int, folder, trainer_options,
                progress: bool, shard: tuple[int, int] | None = None) -> tuple[np.ndarray | None, TileRun]:
    """Exact UF of the listed (row, column) pairs, resumable by tiles: zero-shot tiles over the rows
    involved, one tile per column span holding all of its pairs; and the tile run. A `shard` only
    computes its tiles into `folder` (UF None)."""
    used_rows, local_rows = np.unique(pair_rows, return_inverse=True)
    used_cols, local_cols = np.unique(pair_cols, return_inverse=True)
    inputs = UtilityInputs(tokenizer, [rows[i] for i in used_rows], [cols[j] for j in used_cols], template,
                           max_length)
    inputs.warn_truncation(pairs=(local_rows, local_cols))
    tiles = plan_tiles(len(used_rows), 0, tile_size) + plan_pair_tiles(local_cols, len(used_cols), tile_size)
    run = run_tiles(model, inputs, tiles, engine=engine, batch_size=batch_size, folder=folder,
                    trainer_options=trainer_options, progress=progress, pairs=(local_rows, local_cols), shard=shard)
    if shard is not None:
        return None, run
    zero_shot = np.zeros(len(used_rows), dtype=np.float32)
    one_shot = np.zeros(len(pair_rows), dtype=np.float32)
    for tile, array in run.values.items():
        if hasattr(tile, "positions"):
            one_shot[np.asarray(tile.positions)] = array
        else:
            zero_shot[slice(*tile.rows)] = array
    return zero_shot[local_rows] - one_shot, run


def compute_sparse_kernel(model, tokenizer, rows, cols, *, engine: str, template, batch_size: int, tile_size: int,
                          max_length: int, folder, trainer_options, progress: bool, knn_k: int, knn_random: int,
                          features: str, embedder, ann: dict, proxy: dict, seed: int, model_identity,
                          cache_dir, key_parts: dict | None, on_start=None,
                          shard: tuple[int, int] | None = None) -> tuple[sp.csr_matrix | None, dict]:
    """(UF as CSR float32, details for results.json); see the module docstring. `on_start()` runs
    once real work begins (the caller logs the plan and estimate there). A `shard` builds (or reads)
    the graph and the pairs as the whole run would, scores only its tiles and returns (None, its
    tile counts)."""
    shape = (len(rows), len(cols))
    if shard is None and (finished := load_sparse_kernel(folder, shape)) is not None:
        return finished
    if on_start is not None:
        on_start()
    vector_options = dict(embedder=embedder, model=model, tokenizer=tokenizer, model_identity=model_identity,
                          cache_dir=cache_dir, batch_size=batch_size, max_length=max_length, progress=progress)
    row_vectors = record_vectors(rows, features, **vector_options)
    col_vectors = row_vectors if cols is rows else record_vectors(cols, features, **vector_options)
    graph = _graph(folder, row_vectors, col_vectors, knn_k=knn_k, knn_random=knn_random, seed=seed,
                   ann=ANN_DEFAULTS | dict(ann or {}), self_pairs=cols is rows)
    graph_rows = graph.pair_rows()
    if engine == "knn":
        pair_rows, pair_cols = graph_rows, graph.indices
    else:
        pair_rows, pair_cols = _cached(folder, ("scored_rows.npy", "scored_cols.npy"),
                                       lambda: proxy_sample(graph, proxy["sample"], seed))
    # The listed pairs are scored by the fast exact engine (its numbers are the naive oracle's).
    exact, scored = score_pairs(model, tokenizer, rows, cols, pair_rows, pair_cols, template=template, engine="fast",
                                batch_size=batch_size, tile_size=tile_size, max_length=max_length, folder=folder,
                                trainer_options=trainer_options, progress=progress, shard=shard)
    if shard is not None:  # the run that assembles the kernel fits the proxy
        return None, scored.shard_details(shard) | {"engine": engine, "approximation": True}
    details = {"engine": engine, "approximation": True, "knn_k": knn_k, "knn_random": knn_random,
               "features": features, "exact_pairs": int(len(pair_rows)),
               "zero_shot_passes": int(len(np.unique(pair_rows))), "all_pairs": shape[0] * shape[1],
               # features=model: one forward pass per record for its vector (not a scored pair)
               "feature_passes": 0 if features != "model" else len(rows) + (0 if cols is rows else len(cols))}
    if engine == "knn":
        kernel = sp.csr_matrix((exact, graph.indices, graph.indptr), shape=shape)
    else:
        from delift.utility.proxy import fit_proxy

        fitted = fit_proxy(row_vectors, col_vectors, pair_rows, pair_cols, exact, config=proxy.get("network"),
                           seed=seed, groups=pair_rows, cache_dir=cache_dir, cache_parts=key_parts, progress=progress)
        predicted = fitted.predict(row_vectors, col_vectors, graph_rows, graph.indices)
        kernel = measured_over_predicted(shape, (pair_rows, pair_cols, exact), (graph_rows, graph.indices, predicted))
        details |= {"proxy": fitted.metrics, "proxy_config": fitted.config, "sample": dict(proxy["sample"])}
    details["nnz"] = int(kernel.nnz)
    if folder is not None:
        for name, array in zip(KERNEL_PARTS, (kernel.indptr.astype(np.int64), kernel.indices.astype(np.int64),
                                              kernel.data.astype(np.float32))):
            save_npy(folder / name, array)
        save_json(folder / DETAILS_FILE, details)
    return kernel, details


def measured_over_predicted(shape, measured, predicted) -> sp.csr_matrix:
    """CSR over the union of two (rows, cols, values) pair lists; where both hold a pair, the measured
    value wins. Built by hand: scipy's arithmetic would drop stored entries that are exactly 0."""
    rows, cols, values = (np.concatenate([measured[k], predicted[k]]) for k in range(3))
    keys = rows.astype(np.int64) * shape[1] + cols
    # A stable sort keeps measured entries (listed first) ahead of a predicted duplicate.
    order = np.argsort(keys, kind="stable")
    keep = order[np.concatenate(([True], keys[order][1:] != keys[order][:-1]))]
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.bincount(rows[keep], minlength=shape[0]))
    return sp.csr_matrix((values[keep].astype(np.float32), cols[keep].astype(np.int64), indptr), shape=shape)
