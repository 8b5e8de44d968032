"""Kernel heatmaps, the greedy's gain curve and a subset's source mix (budget curves are drawn by
experiments/make_tables.py)."""

from __future__ import annotations

from collections import Counter
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


def plot_gains(gains, path, *, title: str, ylabel: str = "marginal gain") -> Path:
    """Each pick's gain (or score) against its place in the pick order: where the greedy's returns flatten."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(gains) + 1), gains, marker="." if len(gains) <= 200 else None)
    ax.set(title=title, xlabel="pick order", ylabel=ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_source_mix(subset_sources, pool_sources, path, *, title: str) -> Path:
    """Per source, the subset's count next to the count the pool's share of that source would give
    (a uniform sample's expectation): which sources the selector favours."""
    pool, subset = Counter(pool_sources), Counter(subset_sources)
    names = sorted(pool, key=lambda name: (-pool[name], name))
    expected = [pool[name] / len(pool_sources) * len(subset_sources) for name in names]
    x, width = np.arange(len(names)), 0.4
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 4))
    ax.bar(x - width / 2, [subset[name] for name in names], width, label="subset")
    ax.bar(x + width / 2, expected, width, label="pool share x subset size")
    ax.set_xticks(x, [name or "(no source)" for name in names], rotation=30, ha="right")
    ax.set(title=title, ylabel="records")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
