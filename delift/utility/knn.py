"""APPROXIMATION (engine="knn"): each row scores only its k nearest columns by sentence embedding.

About n_rows * k one-shot passes instead of n_rows * n_cols. Unscored pairs get UF = 0, the
value of a demonstration that neither helps nor hurts: after the global min-max normalisation
they sit where a neutral demonstration sits (not at the bottom, which would read as "harmful"),
so facility location still prefers any scored helpful column over them.
"""

from __future__ import annotations

import numpy as np

from delift.errors import DeliftInputError
from delift.records import record_text


def nearest_columns(row_vectors: np.ndarray, col_vectors: np.ndarray, k: int, *, chunk: int = 1024) -> np.ndarray:
    """(n_rows, n_cols) bool: each row's k most cosine-similar columns (ties: lower column index).

    Vectors are unit rows (as `Embedder.encode` gives); k >= n_cols marks every column.
    """
    n_rows, n_cols = len(row_vectors), len(col_vectors)
    k = min(int(k), n_cols)
    mask = np.zeros((n_rows, n_cols), dtype=bool)
    for start in range(0, n_rows, chunk):
        similarity = row_vectors[start:start + chunk] @ col_vectors.T
        nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        np.put_along_axis(mask[start:start + chunk], nearest, True, axis=1)
    return mask


def knn_pair_mask(embedder, rows, cols, k: int) -> np.ndarray:
    """Which pairs the knn engine scores, from sentence embeddings of the whole records."""
    if embedder is None:
        raise DeliftInputError("engine 'knn' needs a sentence embedder", field="kernel.embedder")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise DeliftInputError(f"must be a positive integer, got {k!r}", field="kernel.knn_k")
    row_vectors = embedder.encode([record_text(r) for r in rows])
    col_vectors = row_vectors if cols is rows else embedder.encode([record_text(c) for c in cols])
    return nearest_columns(row_vectors, col_vectors, k)
