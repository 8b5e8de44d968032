"""Kernel heatmaps (budget curves are drawn by experiments/make_tables.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402


# A sparse kernel up to this many rows and columns is drawn as a heatmap (missing entries blank).
SPARSE_HEATMAP_MAX = 2000


def plot_kernel(kernel, path, *, title: str, row_label: str = "row i (helped)",
                col_label: str = "column j (demonstration)") -> Path:
    """A heatmap of a kernel, rows and columns in pool order; a large sparse kernel gets a histogram
    of its stored values instead."""
    fig, ax = plt.subplots(figsize=(6, 5))
    if sp.issparse(kernel) and max(kernel.shape) > SPARSE_HEATMAP_MAX:
        ax.hist(kernel.data, bins=100)
        ax.set(title=f"{title}: {kernel.nnz:,} stored of {kernel.shape[0]:,} x {kernel.shape[1]:,}",
               xlabel="stored value", ylabel="pairs")
    else:
        if sp.issparse(kernel):
            dense = np.full(kernel.shape, np.nan, dtype=np.float32)  # missing entries stay blank
            coo = kernel.tocoo()
            dense[coo.row, coo.col] = coo.data
            kernel = np.ma.masked_invalid(dense)
        image = ax.imshow(kernel if np.ma.isMaskedArray(kernel) else np.asarray(kernel), cmap="viridis",
                          aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax)
        ax.set(title=title, xlabel=col_label, ylabel=row_label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
