"""Kernel heatmaps (budget curves are drawn by experiments/make_tables.py)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_kernel(kernel: np.ndarray, path, *, title: str, row_label: str = "row i (helped)",
                col_label: str = "column j (demonstration)") -> Path:
    """A heatmap of a kernel, rows and columns in pool order."""
    fig, ax = plt.subplots(figsize=(6, 5))
    image = ax.imshow(np.asarray(kernel), cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set(title=title, xlabel=col_label, ylabel=row_label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
