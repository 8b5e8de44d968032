"""Plan before paying: what a kernel will cost (pairs, forward passes, tiles) and how long, from a
short calibration of the engine on this machine: warm batches only (the first batch of each kind is
run and discarded: first calls pay for allocation and dispatch that the kernel's thousands of batches
do not), whose spread gives the estimate's uncertainty.

`plan_kernel` needs only the sizes and the kernel options (no embeddings, no graph: the
approximate engines score exactly min(k + random, n_cols) pairs per scored row); `calibrate`
runs the engine on a few seeded records, at the demonstration reuse the plan will see.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from delift.utility.engine import one_shot_distances, zero_shot_distances
from delift.utility.formatting import UtilityInputs

APPROXIMATE_ENGINES = ("knn", "proxy")
# Timed batches of each kind after the discarded warm-up batch (the dry run's; a real run's log line, 1).
CALIBRATION_BATCHES = 3


@dataclass(frozen=True)
class KernelPlan:
    engine: str
    n_rows: int
    n_cols: int
    exact_pairs: int  # one-shot sequences scored by the model
    zero_shot_passes: int  # one per scored row
    demonstration_blocks: int  # block prefills of the fast engine (each reused by every row of its tile)
    feature_passes: int  # features=model: one pass per record for the candidate graph
    tiles: int
    predicted_pairs: int  # proxy: pairs whose utility the network predicts

    @property
    def forward_passes(self) -> int:
        return self.exact_pairs + self.zero_shot_passes + self.demonstration_blocks + self.feature_passes

    @property
    def reuse(self) -> float:
        """Pairs served per demonstration block: what calibration imitates."""
        return self.exact_pairs / max(1, self.demonstration_blocks)

    def to_dict(self) -> dict:
        return asdict(self) | {"forward_passes": self.forward_passes, "all_pairs": self.n_rows * self.n_cols}


def sampled_row_count(n_rows: int, rows) -> int:
    """`proxy.sample.rows`: a fraction (< 1) or a count of rows, at least 2 (one to train, one to hold out)."""
    count = int(rows) if rows >= 1 else int(math.floor(rows * n_rows + 0.5))
    return max(2, min(n_rows, count))


def plan_kernel(n_rows: int, n_cols: int, *, engine: str, tile_size: int = 64, knn_k: int = 32, knn_random: int = 0,
                features: str = "embedder", proxy: dict | None = None, same_records: bool = True) -> KernelPlan:
    """The work of one kernel (n_rows x n_cols) with `engine`."""
    row_tiles = math.ceil(n_rows / tile_size)
    col_tiles = math.ceil(n_cols / tile_size)
    if engine not in APPROXIMATE_ENGINES:
        blocks = 0 if engine == "naive" else n_cols * row_tiles
        return KernelPlan(engine, n_rows, n_cols, n_rows * n_cols, n_rows, blocks, 0,
                          row_tiles + row_tiles * col_tiles, 0)
    # One pool's graph holds each row's own pair (the self-utility) beside its k nearest others.
    per_row = min(knn_k + knn_random + (1 if same_records else 0), n_cols)
    feature_passes = 0 if features != "model" else n_rows + (0 if same_records else n_cols)
    if engine == "knn":
        pairs = n_rows * per_row
        return KernelPlan(engine, n_rows, n_cols, pairs, n_rows, min(n_cols, pairs), feature_passes,
                          row_tiles + col_tiles, 0)
    sample = (proxy or {}).get("sample", {})
    scored_rows = sampled_row_count(n_rows, sample.get("rows", 0.1))
    pairs = scored_rows * min(per_row + int(sample.get("random", 0)), n_cols)
    return KernelPlan(engine, n_rows, n_cols, pairs, scored_rows, min(n_cols, pairs), feature_passes,
                      math.ceil(scored_rows / tile_size) + col_tiles, n_rows * per_row)


def calibrate(model, tokenizer, rows, cols, *, template, max_length: int, engine: str, batch_size: int,
              reuse: float, seed: int = 0, batches: int = CALIBRATION_BATCHES) -> dict:
    """Seconds per zero-shot pass and per pair on this machine: a warm-up zero-shot batch and batch of
    pairs (discarded), then `batches` timed ones, each of about `batch_size` pairs whose columns each serve
    `reuse` rows (as in the planned kernel), on its own seeded sample of the records. Their median is the
    rate (a batch slowed by another job's burst does not set it); half their range, relative to it, the
    uncertainty (`relative_spread`)."""
    rng = np.random.default_rng(seed)
    n_use = max(1, min(batch_size, len(rows), int(round(reuse)) or 1))
    n_demo = max(1, min(len(cols), math.ceil(batch_size / n_use)))
    engine = "naive" if engine == "naive" else "fast"
    zero_shot, pair = [], []
    for batch in range(1 + max(1, int(batches))):
        row_sample = [rows[i] for i in sorted(rng.choice(len(rows), n_use, replace=False))]
        col_sample = [cols[j] for j in sorted(rng.choice(len(cols), n_demo, replace=False))]
        inputs = UtilityInputs(tokenizer, row_sample, col_sample, template, max_length)
        started = time.perf_counter()
        zero_shot_distances(model, inputs, range(n_use), engine=engine, batch_size=batch_size)
        zero_seconds = (time.perf_counter() - started) / n_use
        started = time.perf_counter()
        one_shot_distances(model, inputs, range(n_use), range(n_demo), engine=engine, batch_size=batch_size)
        pair_seconds = (time.perf_counter() - started) / (n_use * n_demo)
        if batch:  # the first batch warms up: discarded
            zero_shot.append(zero_seconds)
            pair.append(pair_seconds)
    per_pair = float(np.median(pair))
    return {"seconds_per_zero_shot": float(np.median(zero_shot)), "seconds_per_pair": per_pair,
            "calibration_pairs": n_use * n_demo, "calibration_batches": len(pair),
            "relative_spread": float((max(pair) - min(pair)) / 2 / per_pair) if per_pair > 0 else 0.0}


def estimate_seconds(plan: KernelPlan, calibration: dict) -> float:
    # A record-feature pass costs about a zero-shot pass (one record through the model).
    return ((plan.zero_shot_passes + plan.feature_passes) * calibration["seconds_per_zero_shot"]
            + plan.exact_pairs * calibration["seconds_per_pair"])


def describe(plan: KernelPlan, calibration: dict | None = None, *, name: str = "kernel") -> str:
    """One human line: the plan, and the estimate when calibrated."""
    all_pairs = plan.n_rows * plan.n_cols
    fewer = all_pairs / max(1, plan.exact_pairs)
    approximate = plan.engine in APPROXIMATE_ENGINES
    text = (f"{name} plan ({plan.engine}{', APPROXIMATION' if approximate else ''}): "
            f"{plan.n_rows:,} rows x {plan.n_cols:,} columns = {all_pairs:,} pairs; scored exactly "
            f"{plan.exact_pairs:,} pairs + {plan.zero_shot_passes:,} zero-shot passes"
            + (f" ({fewer:,.1f}x fewer pairs than exact)" if approximate else "")
            + f"; {plan.forward_passes:,} forward passes, {plan.tiles} tiles")
    if plan.predicted_pairs:
        text += f"; the proxy predicts {plan.predicted_pairs:,} candidate pairs"
    if calibration is not None:
        seconds = estimate_seconds(plan, calibration)
        spread = calibration.get("relative_spread") or 0.0
        batches = calibration.get("calibration_batches", 1)
        text += f"; estimated {format_seconds(seconds)} here"
        if spread >= 0.005:
            text += f" ({format_seconds(seconds * (1 - spread))} to {format_seconds(seconds * (1 + spread))})"
        text += (f": {1 / calibration['seconds_per_pair']:.1f} pairs/s"
                 + (f" ± {spread:.0%}" if spread >= 0.005 else "")
                 + f", measured on {batches} warm batch{'es' if batches != 1 else ''} of "
                 f"{calibration['calibration_pairs']} pairs")
    return text


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
