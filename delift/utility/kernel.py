"""`compute_kernel` (the DELIFT utility kernel, cached and resumable) and `normalize_kernel`."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import get_args

import numpy as np
import scipy.sparse as sp

from delift.cache import UnreadableCacheFile, cache_folder, file_lock, load_npy, save_json, save_npy
from delift.config import Engine
from delift.devices import is_global_zero
from delift.errors import DeliftInputError
from delift.objectives import Missing, minmax01
from delift.records import validate_records
from delift.utility.formatting import UtilityInputs, UtilityTemplate
from delift.utility.graph import ANN_DEFAULTS, features_identity, uses_ivf
from delift.utility.lightning import run_tiles
from delift.utility.plan import CALIBRATION_BATCHES, KernelPlan, calibrate, describe, plan_kernel
from delift.utility.sparse import compute_sparse_kernel
from delift.utility.tiles import CACHE_KIND, KERNEL_FILE, assemble_kernel, kernel_key, plan_tiles

KERNEL_ENGINES = get_args(Engine)
EXACT_ENGINES = ("naive", "fast")
PROXY_OPTIONS = {"sample": {"rows": 0.1, "random": 8}, "network": {}}

log = logging.getLogger(__name__)


def _positive_int(value, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DeliftInputError(f"must be a positive integer, got {value!r}", field=field)
    return int(value)


def seed_matters(engine: str, knn_random: int, n_cols: int, ann: Mapping) -> bool:
    """Whether the seed can change an approximate kernel: the proxy's sample and network, seeded random
    graph columns, or an IVF index (trained by k-means); exact flat nearest neighbours never read it. Only
    then is it part of the cache key, so the seeds of a grid share one kernel."""
    return engine == "proxy" or knn_random > 0 or uses_ivf(n_cols, ann["flat_max"])


def compute_kernel(model, tokenizer, rows: Sequence[Mapping], cols: Sequence[Mapping] | None = None, *,
                   template=None, engine: str = "fast", batch_size: int = 16, tile_size: int = 64,
                   cache_dir=None, max_length: int = 1024, trainer_options: dict | None = None,
                   model_identity: dict | None = None, progress: bool = True, knn_k: int = 32, knn_random: int = 0,
                   features: str = "embedder", embedder=None, ann: Mapping | None = None,
                   proxy: Mapping | None = None, seed: int = 0, details: dict | None = None,
                   shard: int | None = None, num_shards: int = 1):
    """The raw utility kernel UF (float32, len(rows) x len(cols)); `cols=None` means cols = rows.

    UF[i, j] = d(y_i | x_i) - d(y_i | demo_j, x_i): row i is the example helped, column j the
    demonstration. Exact engines return a dense array; the approximate ones (knn, proxy) a scipy
    CSR matrix. `details`, when given, is filled with what was computed (engine, exact passes, the
    proxy's held-out error). With `num_shards` > 1, only shard `shard`'s tiles are computed into
    the cache and None is returned; a later call without a shard assembles the kernel. See
    `delift.utility` for the engines, the cache, the shards and the approximations.
    """
    if engine not in KERNEL_ENGINES:
        raise DeliftInputError(f"unknown engine {engine!r}; choose one of {list(KERNEL_ENGINES)}",
                               field="kernel.engine")
    batch_size = _positive_int(batch_size, "kernel.batch_size")
    tile_size = _positive_int(tile_size, "kernel.tile_size")
    max_length = _positive_int(max_length, "kernel.max_length")
    shard = _shard(shard, num_shards, cache_dir)
    approximate = engine not in EXACT_ENGINES
    if approximate:
        knn_k = _positive_int(knn_k, "kernel.knn_k")
        proxy = _proxy_options(proxy) if engine == "proxy" else None

    same = cols is None
    rows = validate_records(rows)
    cols = rows if same else validate_records(cols)
    if not rows or not cols:
        raise DeliftInputError("needs at least one row and one column record", field="kernel.records")
    template = UtilityTemplate.from_config(template)
    shape = (len(rows), len(cols))

    def log_plan() -> None:  # one timed batch: a real run's log line costs little (the dry run times three)
        log.info(describe(*kernel_plan(model, tokenizer, rows, None if same else cols, template=template, engine=engine,
                                       batch_size=batch_size, tile_size=tile_size, max_length=max_length, knn_k=knn_k,
                                       knn_random=knn_random, features=features, proxy=proxy, seed=seed,
                                       calibration_batches=1)))

    folder, parts = None, None
    if approximate:
        ann = ANN_DEFAULTS | dict(ann or {})
        # "neighbours": one pool's graph is its own pairs + k nearest others (self-utility is a selection choice)
        approximation = {"kind": engine, "knn_k": knn_k, "knn_random": knn_random, "neighbours": "self+others",
                         "seed": seed if seed_matters(engine, knn_random, len(cols), ann) else None,
                         "vectors": features_identity(features, embedder), "ann": ann, "proxy": proxy}
    else:
        approximation = None
    if cache_dir is not None:
        key, parts = kernel_key(model=model, tokenizer=tokenizer, rows=rows, cols=cols, template=template,
                                max_length=max_length, model_identity=model_identity, approximation=approximation)
        folder = cache_folder(cache_dir, CACHE_KIND, key)
        if not (folder / "key.json").exists():  # its time stamp is when the kernel was started
            save_json(folder / "key.json", parts)

    if approximate:
        kernel, computed = compute_sparse_kernel(
            model, tokenizer, rows, cols, engine=engine, template=template, batch_size=batch_size,
            tile_size=tile_size, max_length=max_length, folder=folder, trainer_options=trainer_options,
            progress=progress, knn_k=knn_k, knn_random=knn_random, features=features, embedder=embedder,
            ann=ann, proxy=proxy, seed=seed, model_identity=model_identity, cache_dir=cache_dir,
            key_parts=parts, on_start=log_plan, shard=shard)
    else:
        kernel, computed = _exact_kernel(model, tokenizer, rows, cols, shape, template=template, engine=engine,
                                         batch_size=batch_size, tile_size=tile_size, max_length=max_length,
                                         folder=folder, trainer_options=trainer_options, progress=progress,
                                         on_start=log_plan, shard=shard)
    if details is not None:
        details.update(computed)
    return kernel


def _shard(shard, num_shards, cache_dir) -> tuple[int, int] | None:
    """(shard, num_shards) when the call computes one shard of the kernel, None for the whole kernel."""
    num_shards = _positive_int(num_shards, "kernel.num_shards")
    if shard is None and num_shards == 1:
        return None
    if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or not 0 <= shard < num_shards:
        raise DeliftInputError(f"must be an integer in [0, {num_shards}) with kernel.num_shards={num_shards}, "
                               f"got {shard!r}", field="kernel.shard")
    if num_shards == 1:
        return None
    if cache_dir is None:
        raise DeliftInputError("shards meet in the kernel cache (on a filesystem every job sees): set a cache_dir",
                               field="kernel.num_shards")
    return int(shard), num_shards


# The kernel options a plan depends on (kernel_plan's keywords).
PLAN_OPTIONS = ("template", "engine", "batch_size", "tile_size", "max_length", "knn_k", "knn_random", "features",
                "proxy", "seed")


def kernel_plan(model, tokenizer, rows: Sequence[Mapping], cols: Sequence[Mapping] | None = None, *, template=None,
                engine: str = "fast", batch_size: int = 16, tile_size: int = 64, max_length: int = 1024,
                knn_k: int = 32, knn_random: int = 0, features: str = "embedder", proxy: Mapping | None = None,
                seed: int = 0, calibration_batches: int = CALIBRATION_BATCHES) -> tuple[KernelPlan, dict]:
    """What `compute_kernel` with these options would do (pairs, passes, tiles) and its calibration
    on this machine (a discarded warm-up batch, then `calibration_batches` timed ones); computes no kernel."""
    same = cols is None
    cols = rows if same else cols
    plan = plan_kernel(len(rows), len(cols), engine=engine, tile_size=tile_size, knn_k=knn_k, knn_random=knn_random,
                       features=features, proxy=_proxy_options(proxy) if engine == "proxy" else None,
                       same_records=same)
    calibration = calibrate(model, tokenizer, rows, cols, template=UtilityTemplate.from_config(template),
                            max_length=max_length, engine=engine, batch_size=batch_size, reuse=plan.reuse, seed=seed,
                            batches=calibration_batches)
    return plan, calibration


def _proxy_options(proxy: Mapping | None) -> dict:
    proxy = dict(proxy or {})
    unknown = set(proxy) - set(PROXY_OPTIONS)
    if unknown:
        raise DeliftInputError(f"unknown key(s) {sorted(unknown)}; expected {sorted(PROXY_OPTIONS)}",
                               field="kernel.proxy")
    sample = PROXY_OPTIONS["sample"] | dict(proxy.get("sample") or {})
    rows = sample["rows"]
    if isinstance(rows, bool) or not isinstance(rows, (int, float)) or rows <= 0:
        raise DeliftInputError(f"must be a fraction in (0, 1) or a count >= 1, got {rows!r}",
                               field="kernel.proxy.sample.rows")
    return {"sample": sample, "network": dict(proxy.get("network") or {})}


def _exact_kernel(model, tokenizer, rows, cols, shape, *, template, engine, batch_size, tile_size, max_length, folder,
                  trainer_options, progress, on_start, shard) -> tuple[np.ndarray | None, dict]:
    """(UF, details); a shard returns (None, its tile counts) and leaves the kernel to the assembling run."""
    costs = {"engine": engine, "approximation": False}
    whole = costs | {"exact_pairs": shape[0] * shape[1], "zero_shot_passes": shape[0], "all_pairs": shape[0] * shape[1]}
    if shard is None and folder is not None and (folder / KERNEL_FILE).exists():
        try:
            return load_npy(folder / KERNEL_FILE, shape=shape, dtype=np.float32), whole
        except UnreadableCacheFile:
            pass  # a half-written kernel is rebuilt from its tiles
    inputs = UtilityInputs(tokenizer, rows, cols, template, max_length)
    inputs.warn_truncation()
    run = run_tiles(model, inputs, plan_tiles(*shape, tile_size), engine=engine, batch_size=batch_size, folder=folder,
                    trainer_options=trainer_options, progress=progress, on_start=on_start, shard=shard)
    if shard is not None:
        return None, run.shard_details(shard) | costs
    kernel = assemble_kernel(run.values, *shape)
    if folder is not None and is_global_zero():  # every rank holds the kernel; one writes it, found or computed
        with file_lock(folder / KERNEL_FILE):
            save_npy(folder / KERNEL_FILE, kernel)
    return kernel, whole


def normalize_kernel(kernel: np.ndarray | sp.csr_matrix) -> np.ndarray | sp.csr_matrix:
    """One global min-max to [0, 1] (float32), as the selectors need; a constant kernel maps to all zeros.
    A sparse kernel is scaled over its stored entries (a missing entry stays 0, the bottom).

    The objectives' own `minmax01`, so a kernel normalised here and inside `delift.objectives` agree.
    """
    return minmax01(kernel)


MISSING = get_args(Missing)


def similarity_floor(kernels: dict, missing: str = "neutral") -> str:
    """What the objectives' min-max maps to 0 (`delift.objectives.maximize`'s `floor`) for UF kernels of
    which some may be sparse (approximate engines):

    - "neutral" (default) with a sparse kernel: "zero", i.e. max(UF, 0) / the range's maximum, so a
      pair that was not measured counts as UF = 0, a demonstration that neither helps nor hurts, and
      harmful pairs count the same;
    - "bottom": "min", the min-max over stored entries: a missing pair ranks with the least helpful
      measured one.
    Dense-only input (the exact engines) keeps the min-max ("min") either way.
    """
    if missing not in MISSING:
        raise DeliftInputError(f"unknown value {missing!r}; choose one of {list(MISSING)}", field="selector.missing")
    sparse = any(sp.issparse(k) for k in kernels.values() if k is not None)
    return "zero" if missing == "neutral" and sparse else "min"
