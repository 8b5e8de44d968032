"""`compute_kernel` (the DELIFT utility kernel, cached and resumable) and `normalize_kernel`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from delift.cache import UnreadableCacheFile, cache_folder, file_lock, load_npy, save_json, save_npy
from delift.errors import DeliftInputError
from delift.objectives import minmax01
from delift.records import validate_records
from delift.utility.formatting import UtilityInputs, UtilityTemplate
from delift.utility.knn import knn_pair_mask
from delift.utility.lightning import PairProgressBar, UtilityKernelModule, make_trainer, predict_tiles
from delift.utility.tiles import CACHE_KIND, KERNEL_FILE, assemble_kernel, kernel_key, plan_tiles, read_tile

KERNEL_ENGINES = ("naive", "fast", "knn")


def _positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeliftInputError(f"must be a positive integer, got {value!r}", field=field)
    return value


def compute_kernel(model, tokenizer, rows: Sequence[Mapping], cols: Sequence[Mapping] | None = None, *,
                   template=None, engine: str = "fast", batch_size: int = 16, tile_size: int = 64,
                   cache_dir=None, max_length: int = 1024, trainer_options: dict | None = None,
                   model_identity: dict | None = None, progress: bool = True, knn_k: int | None = None,
                   embedder=None) -> np.ndarray:
    """The raw utility kernel UF (float32, len(rows) x len(cols)); `cols=None` means cols = rows.

    UF[i, j] = d(y_i | x_i) - d(y_i | demo_j, x_i): row i is the example helped, column j the
    demonstration. See `delift.utility` for the engines, the cache and the approximation.
    """
    if engine not in KERNEL_ENGINES:
        raise DeliftInputError(f"unknown engine {engine!r}; choose one of {list(KERNEL_ENGINES)}",
                               field="kernel.engine")
    if (knn_k is not None) != (engine == "knn"):
        raise DeliftInputError("knn_k goes with engine='knn' (an approximation) and only with it", field="kernel.knn_k")
    batch_size = _positive_int(batch_size, "kernel.batch_size")
    tile_size = _positive_int(tile_size, "kernel.tile_size")
    max_length = _positive_int(max_length, "kernel.max_length")

    rows = validate_records(rows)
    cols = rows if cols is None else validate_records(cols)
    if not rows or not cols:
        raise DeliftInputError("needs at least one row and one column record", field="kernel.records")
    template = UtilityTemplate.from_config(template)
    inputs = UtilityInputs(tokenizer, rows, cols, template, max_length)
    pair_mask = knn_pair_mask(embedder, rows, cols, knn_k) if engine == "knn" else None
    inputs.warn_truncation(pair_mask)
    shape = (len(rows), len(cols))

    folder = None
    if cache_dir is not None:
        approximation = None if engine != "knn" else {"kind": "knn", "k": knn_k, "embedder": embedder.identity()}
        key, parts = kernel_key(model=model, tokenizer=tokenizer, rows=rows, cols=cols, template=template,
                                max_length=max_length, model_identity=model_identity, approximation=approximation)
        folder = cache_folder(cache_dir, CACHE_KIND, key)
        if (folder / KERNEL_FILE).exists():
            try:
                return load_npy(folder / KERNEL_FILE, shape=shape, dtype=np.float32)
            except UnreadableCacheFile:
                pass  # a half-written kernel is rebuilt from its tiles
        save_json(folder / "key.json", parts)

    tiles = plan_tiles(*shape, tile_size)
    values = {}
    if folder is not None:
        values = {tile: array for tile in tiles if (array := read_tile(folder, tile)) is not None}
    missing = [tile for tile in tiles if tile not in values]
    is_main = True
    if missing:
        module = UtilityKernelModule(model, inputs, missing, engine="naive" if engine == "naive" else "fast",
                                     batch_size=batch_size, pair_mask=pair_mask, folder=folder)
        trainer = make_trainer(trainer_options, [PairProgressBar(sum(t.passes(pair_mask) for t in missing), progress)])
        values |= predict_tiles(trainer, module)
        is_main = trainer.global_rank == 0
        if folder is not None:
            for tile in missing:
                values[tile] = read_tile(folder, tile)
                if values[tile] is None:
                    raise DeliftInputError("a finished tile is missing or unreadable", file=folder / tile.file_name)

    kernel = assemble_kernel(values, *shape, pair_mask)
    if folder is not None and is_main:
        with file_lock(folder / KERNEL_FILE):
            save_npy(folder / KERNEL_FILE, kernel)
    return kernel


def normalize_kernel(kernel: np.ndarray) -> np.ndarray:
    """One global min-max to [0, 1] (float32), as the selectors need; a constant kernel maps to all zeros.

    The objectives' own `minmax01`, so a kernel normalised here and inside `delift.objectives` agree.
    """
    return minmax01(kernel)
