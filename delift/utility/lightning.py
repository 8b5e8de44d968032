"""The kernel computation as a LightningModule run through `Trainer.predict`, one tile per step.

The dataset is the list of tiles still missing; Lightning's distributed sampler hands each rank
its share, so `devices=N, strategy="ddp", num_nodes=M` spread the tiles with no code change
(ranks exchange tiles through the cache folder, which must then be on a shared filesystem).
Each finished tile is written atomically as soon as it is done.

Independent jobs (a SLURM array) split a kernel by `shard=(i, n)`: job i computes the tiles at
plan positions p with p % n == i into the shared folder, so jobs agree without talking to each
other; a later unsharded run assembles the kernel from the finished tiles.
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from delift.cache import save_npy
from delift.devices import build_trainer, kept_in_place, model_device, trainer_arguments
from delift.errors import DeliftInputError
from delift.utility.engine import check_output_head, one_shot_distances, zero_shot_distances
from delift.utility.formatting import UtilityInputs
from delift.utility.tiles import PairTile, Tile, read_tile, shard_tiles

log = logging.getLogger(__name__)

# Lightning's own logger, checkpoints, progress bar and summary have nothing to do in a predict run.
TRAINER_DEFAULTS = {"devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False}


class TileDataset(Dataset):
    """Item k is the index of the k-th tile to compute."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        return index


def _single(batch):
    return batch[0]


class UtilityKernelModule(L.LightningModule):
    """Computes one tile per predict step: zero-shot distances of a row block, one-shot distances of a
    block (dense kernels) or of the listed pairs in a column span (`PairTile`, sparse kernels: `pairs`
    holds the row and column of every listed pair)."""

    def __init__(self, model, inputs: UtilityInputs, tiles: list[Tile | PairTile], *, engine: str, batch_size: int,
                 pairs: tuple[np.ndarray, np.ndarray] | None = None, folder: Path | None = None):
        super().__init__()
        self.model = model
        self.inputs = inputs
        self.tiles = tiles
        self.engine = engine
        self.batch_size = batch_size
        self.pairs = pairs
        self.folder = folder
        self.on_scored = None  # set by PairProgressBar: called with the number of sequences scored

    def on_predict_start(self) -> None:
        if self.engine != "naive":
            check_output_head(self.model, self.inputs.zero_shot_sequence(0).context[-64:])

    def compute_tile(self, tile: Tile | PairTile) -> np.ndarray:
        if isinstance(tile, PairTile):
            return self._listed_pairs(tile)
        if tile.cols is None:
            return zero_shot_distances(self.model, self.inputs, tile.row_range, engine=self.engine,
                                       batch_size=self.batch_size, on_scored=self.on_scored)
        return one_shot_distances(self.model, self.inputs, tile.row_range, tile.col_range, engine=self.engine,
                                  batch_size=self.batch_size, on_scored=self.on_scored)

    def _listed_pairs(self, tile: PairTile) -> np.ndarray:
        positions = np.asarray(tile.positions)
        rows, cols = self.pairs[0][positions], self.pairs[1][positions]
        used_rows, row_slot = np.unique(rows, return_inverse=True)
        used_cols, col_slot = np.unique(cols, return_inverse=True)
        mask = np.zeros((len(used_rows), len(used_cols)), dtype=bool)
        mask[row_slot, col_slot] = True
        block = one_shot_distances(self.model, self.inputs, used_rows.tolist(), used_cols.tolist(), engine=self.engine,
                                   batch_size=self.batch_size, pair_mask=mask, on_scored=self.on_scored)
        return block[row_slot, col_slot]

    def predict_step(self, index: int):
        tile = self.tiles[index]
        values = self.compute_tile(tile)
        self._check_finite(tile, values)
        if self.folder is not None:
            save_npy(self.folder / tile.file_name, values)
        return index, values

    def _check_finite(self, tile: Tile | PairTile, values: np.ndarray) -> None:
        bad = np.argwhere(~np.isfinite(values))
        if not len(bad):
            return
        if isinstance(tile, PairTile):
            position = tile.positions[bad[0][0]]
            where = (f"{self.inputs.row_ids[self.pairs[0][position]]} (row) x "
                     f"{self.inputs.col_ids[self.pairs[1][position]]} (column)")
        elif tile.cols is None:
            row = self.inputs.row_ids[tile.rows[0] + bad[0][0]]
            where = f"{row} (row, no demonstration)"
        else:
            row = self.inputs.row_ids[tile.rows[0] + bad[0][0]]
            where = f"{row} (row) x {self.inputs.col_ids[tile.cols[0] + bad[0][1]]} (column)"
        raise DeliftInputError(f"the utility is {values[tuple(bad[0])]} ({len(bad)} non-finite value(s) in this tile); "
                               "a half-precision model can overflow: try dtype float32 or bfloat16",
                               record=where, field="model.dtype")


class PairProgressBar(L.Callback):
    """tqdm over scored sequences (pairs, plus one zero-shot pass per row): rate and ETA, rank 0 only."""

    def __init__(self, total: int, enabled: bool = True):
        self.total = total
        self.enabled = enabled
        self.bar = None

    def on_predict_start(self, trainer, pl_module) -> None:
        share = math.ceil(self.total / max(1, trainer.world_size))
        self.bar = tqdm(total=share, unit="pair", desc="utility kernel", dynamic_ncols=True,
                        disable=not self.enabled or trainer.global_rank != 0)
        pl_module.on_scored = self.bar.update

    def on_predict_end(self, trainer, pl_module) -> None:
        self._close(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close(pl_module)

    def _close(self, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        pl_module.on_scored = None


def make_trainer(trainer_options: dict | None, callbacks: list, device) -> L.Trainer:
    """A predict Trainer for a model on `device` (the model runs in its own dtype: no precision plugin)."""
    return build_trainer(TRAINER_DEFAULTS | trainer_arguments(trainer_options, device, inference=True),
                         callbacks=callbacks)


class TileRun(NamedTuple):
    values: dict[Tile | PairTile, np.ndarray]  # every tile of the plan, or of the shard
    planned: int  # tiles in the whole plan
    computed: int  # tiles this call computed (over all ranks)

    def shard_details(self, shard: tuple[int, int]) -> dict:
        return {"shard": shard[0], "num_shards": shard[1], "tiles": self.planned, "shard_tiles": len(self.values),
                "computed": self.computed}


def run_tiles(model, inputs: UtilityInputs, tiles: list[Tile | PairTile], *, engine: str, batch_size: int, folder,
              trainer_options: dict | None, progress: bool, pairs: tuple[np.ndarray, np.ndarray] | None = None,
              on_start=None, shard: tuple[int, int] | None = None) -> TileRun:
    """Every tile's values: finished ones read from `folder`, the missing ones computed (and written
    there) through Trainer.predict; `on_start()` runs first when anything is missing. With
    `shard=(i, n)`, only shard i's tiles (see `shard_tiles`)."""
    planned = len(tiles)
    tiles = shard_tiles(tiles, shard)
    values = {}
    if folder is not None:
        values = {tile: array for tile in tiles if (array := read_tile(folder, tile)) is not None}
    missing = [tile for tile in tiles if tile not in values]
    if shard is not None:
        log.info("Kernel shard %d/%d: %d of %d tiles, %d to compute", *shard, len(tiles), planned, len(missing))
    if not missing:
        return TileRun(values, planned, 0)
    if on_start is not None:
        on_start()
    module = UtilityKernelModule(model, inputs, missing, engine=engine, batch_size=batch_size, pairs=pairs,
                                 folder=folder)
    trainer = make_trainer(trainer_options, [PairProgressBar(sum(t.passes() for t in missing), progress)],
                           model_device(model))
    with kept_in_place(model):
        values |= predict_tiles(trainer, module)
    if folder is not None:
        for tile in missing:
            values[tile] = read_tile(folder, tile)
            if values[tile] is None:
                raise DeliftInputError("a finished tile is missing or unreadable", file=folder / tile.file_name)
    return TileRun(values, planned, len(missing))


def predict_tiles(trainer: L.Trainer, module: UtilityKernelModule) -> dict[Tile | PairTile, np.ndarray]:
    """Run the module's tiles; with a folder they are on disk afterwards (all ranks synchronised)."""
    if module.folder is None and trainer.num_devices * trainer.num_nodes > 1:
        raise DeliftInputError("a multi-process kernel exchanges its tiles through disk: set a cache_dir",
                               field="kernel.cache_dir")
    loader = DataLoader(TileDataset(len(module.tiles)), batch_size=1, collate_fn=_single)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        outputs = trainer.predict(module, dataloaders=loader, return_predictions=module.folder is None)
    if module.folder is not None:
        trainer.strategy.barrier("utility-tiles-written")
        return {}
    return {module.tiles[index]: values for index, values in outputs}
