"""Tiles: the units of work, of sharding over processes and of the on-disk kernel cache.

A kernel folder `<cache_dir>/utility_kernel/<key>/` holds `key.json` (what the key hashes, for
people), one `.npy` per finished tile and, once all are there, `kernel.npy`. Tile files are
named by the rows and columns they cover, so a run with another tile size simply computes its
own tiles. A half-written tile file is recomputed; a readable one of the wrong shape or dtype is an error.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from delift.cache import UnreadableCacheFile, content_hash, load_npy, records_hash
from delift.errors import DeliftInputError
from delift.utility.formatting import UtilityTemplate, tokenizer_identity

KERNEL_FILE = "kernel.npy"
CACHE_KIND = "utility_kernel"
# Bump when the numbers a kernel holds would change for the same inputs.
FORMULA = "UF = d(y_i|x_i) - d(y_i|demo_j,x_i); d = ||p - 1||_2 / sqrt(T), T = response tokens + EOS"


@dataclass(frozen=True)
class Tile:
    """Rows [start, stop) x columns [start, stop); `cols` None is the zero-shot (no demonstration) column."""

    rows: tuple[int, int]
    cols: tuple[int, int] | None = None

    @property
    def row_range(self) -> range:
        return range(*self.rows)

    @property
    def col_range(self) -> range:
        return range(*self.cols)

    @property
    def file_name(self) -> str:
        rows = f"r{self.rows[0]:07d}-{self.rows[1]:07d}"
        if self.cols is None:
            return f"zero_shot_{rows}.npy"
        return f"one_shot_{rows}_c{self.cols[0]:07d}-{self.cols[1]:07d}.npy"

    @property
    def shape(self) -> tuple[int, ...]:
        if self.cols is None:
            return (len(self.row_range),)
        return (len(self.row_range), len(self.col_range))

    def passes(self) -> int:
        """Sequences this tile scores."""
        if self.cols is None:
            return len(self.row_range)
        return len(self.row_range) * len(self.col_range)


@dataclass(frozen=True)
class PairTile:
    """The listed pairs of a sparse kernel whose column lies in [start, stop): `positions` index the
    kernel's pair list. A column's demonstration block then runs once for all the rows it serves."""

    cols: tuple[int, int]
    positions: tuple[int, ...]

    @property
    def file_name(self) -> str:
        return f"pairs_c{self.cols[0]:07d}-{self.cols[1]:07d}.npy"

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.positions),)

    def passes(self) -> int:
        return len(self.positions)


def plan_pair_tiles(pair_cols: np.ndarray, n_cols: int, tile_size: int) -> list[PairTile]:
    """Column spans of `tile_size` columns, each with the positions of its pairs; empty spans are skipped."""
    order = np.argsort(pair_cols, kind="stable")
    bounds = np.searchsorted(pair_cols[order], np.arange(0, n_cols + tile_size, tile_size))
    tiles = []
    for k, start in enumerate(range(0, n_cols, tile_size)):
        positions = np.sort(order[bounds[k]:bounds[k + 1]])
        if len(positions):
            tiles.append(PairTile((start, min(start + tile_size, n_cols)), tuple(positions.tolist())))
    return tiles


def plan_tiles(n_rows: int, n_cols: int, tile_size: int) -> list[Tile]:
    """Zero-shot tiles, then one-shot tiles in row-major order."""
    row_blocks = [(s, min(s + tile_size, n_rows)) for s in range(0, n_rows, tile_size)]
    col_blocks = [(s, min(s + tile_size, n_cols)) for s in range(0, n_cols, tile_size)]
    return [Tile(r) for r in row_blocks] + [Tile(r, c) for r in row_blocks for c in col_blocks]


def shard_tiles(tiles: list, shard: tuple[int, int] | None) -> list:
    """Shard i of n (None: all tiles): the tiles at plan positions p with p % n == i. Every job
    derives the same plan, so jobs agree on their shares without talking; interleaving gives each
    shard zero-shot and one-shot tiles alike."""
    if shard is None:
        return tiles
    index, count = shard
    return tiles[index::count]


def read_tile(folder: Path, tile: Tile | PairTile) -> np.ndarray | None:
    """The finished tile, or None when it is missing or half-written (then it is recomputed).

    A readable tile of the wrong shape or dtype is an error naming the file (not ours to overwrite).
    """
    path = Path(folder) / tile.file_name
    if not path.exists():
        return None
    try:
        return load_npy(path, shape=tile.shape, dtype=np.float32)
    except UnreadableCacheFile:
        return None


def assemble_kernel(values: dict[Tile, np.ndarray], n_rows: int, n_cols: int) -> np.ndarray:
    """UF = zero-shot d (per row) - one-shot d."""
    zero_shot = np.zeros(n_rows, dtype=np.float32)
    one_shot = np.zeros((n_rows, n_cols), dtype=np.float32)
    for tile, array in values.items():
        if tile.cols is None:
            zero_shot[slice(*tile.rows)] = array
        else:
            one_shot[slice(*tile.rows), slice(*tile.cols)] = array
    return zero_shot[:, None] - one_shot


def model_fingerprint(model) -> dict:
    """SHA-256 of every weight (not the folder it came from): for models without a config identity (slow for
    big ones)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return {"weights_sha256": digest.hexdigest()}


def kernel_key(*, model, tokenizer, rows, cols, template: UtilityTemplate, max_length: int, model_identity=None,
               approximation: dict | None = None) -> tuple[str, dict]:
    """(key, parts): everything that determines the kernel's numbers, and nothing that doesn't.

    The engine (naive or fast), batch size and tile size are left out: the exact engines give the
    same numbers, and tiles carry their ranges in their names. An approximation is part of the key.
    """
    parts = {
        "formula": FORMULA,
        "model": model_identity if model_identity is not None else model_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype),
        "tokenizer": tokenizer_identity(tokenizer),
        "template": template.identity(),
        "max_length": max_length,
        "rows": records_hash(rows),
        "cols": records_hash(cols),
        "approximation": approximation,
    }
    return content_hash(parts), parts
