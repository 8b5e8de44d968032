"""Kernel shards over independent jobs (a SLURM array): each job computes its share of the tiles into the
shared cache, a later unsharded run assembles the same kernel bitwise, computing only what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest

from delift.errors import DeliftInputError
from delift.pipeline import results_table, run
from delift.records import make_record
from delift.utility import compute_kernel
from delift.utility import lightning as lightning_module
from delift.utility.tiles import plan_tiles
from tests.helpers import SeededEmbedder, compose_config, isolated_cache, run_py

RECORDS = [make_record(f"r{i}", "Answer the question.", f"What is {i} times {i + 3}?",
                       f"{i * (i + 3)}." + " Yes." * (i % 3)) for i in range(6)]
APPROXIMATIONS = {"knn": dict(engine="knn", knn_k=2, knn_random=1, embedder=SeededEmbedder()),
                  "proxy": dict(engine="proxy", knn_k=2, knn_random=1, embedder=SeededEmbedder(),
                                proxy={"sample": {"rows": 3, "random": 1}, "network": {"max_epochs": 3}})}


class TileCounter(L.Callback):
    def __init__(self):
        self.seen = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen += 1


def _kernel(tiny, cache_dir, **options):
    return compute_kernel(tiny.model, tiny.tokenizer, RECORDS, cache_dir=cache_dir, tile_size=2, batch_size=4,
                          progress=False, model_identity=tiny.identity, **options)


def _tile_files(cache_dir) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in Path(cache_dir).rglob("*.npy")
            if p.name.startswith(("zero_shot_", "one_shot_", "pairs_"))}


def _no_trainer(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("no tile should be computed here")

    monkeypatch.setattr(lightning_module, "make_trainer", never)


def test_exact_shards_write_only_their_tiles_and_assemble_the_same_kernel(tiny_qwen2, tmp_path, monkeypatch):
    reference = _kernel(tiny_qwen2, tmp_path / "one_process")
    plan = plan_tiles(6, 6, 2)  # 3 zero-shot + 9 one-shot tiles
    shared = tmp_path / "shared"
    for shard in range(2):
        details = {}
        assert _kernel(tiny_qwen2, shared, shard=shard, num_shards=2, details=details) is None
        assert details == {"shard": shard, "num_shards": 2, "tiles": 12, "shard_tiles": 6, "computed": 6,
                           "engine": "fast", "approximation": False}
        assert set(_tile_files(shared)) == {t.file_name for p, t in enumerate(plan) if p % 2 <= shard}
        assert not list(shared.rglob("kernel*.npy"))  # a shard never writes a (partial) kernel
    finished = _tile_files(shared)

    _no_trainer(monkeypatch)
    details = {}
    assembled = _kernel(tiny_qwen2, shared, details=details)
    assert np.array_equal(assembled, reference) and assembled.dtype == reference.dtype
    assert details["exact_pairs"] == 36 and "shard" not in details
    assert _tile_files(shared) == finished and len(list(shared.rglob("kernel.npy"))) == 1


def test_after_one_shard_an_unsharded_run_computes_only_the_missing_tiles(tiny_qwen2, tmp_path):
    reference = _kernel(tiny_qwen2, tmp_path / "one_process")
    shared = tmp_path / "shared"
    _kernel(tiny_qwen2, shared, shard=0, num_shards=2)
    finished = _tile_files(shared)
    counter = TileCounter()
    resumed = _kernel(tiny_qwen2, shared, trainer_options={"callbacks": [counter]})
    assert counter.seen == 12 - len(finished) == 6
    assert np.array_equal(resumed, reference)
    assert all(_tile_files(shared)[name] == stamp for name, stamp in finished.items())


def test_a_shard_with_every_tile_finished_computes_nothing(tiny_qwen2, tmp_path, monkeypatch):
    _kernel(tiny_qwen2, tmp_path)
    _no_trainer(monkeypatch)
    details = {}
    assert _kernel(tiny_qwen2, tmp_path, shard=1, num_shards=3, details=details) is None
    assert (details["shard_tiles"], details["tiles"], details["computed"]) == (4, 12, 0)


@pytest.mark.parametrize("engine", ["knn", "proxy"])
def test_approximate_shards_assemble_the_same_sparse_kernel(engine, tiny_qwen2, tmp_path, monkeypatch):
    options = APPROXIMATIONS[engine]
    reference = _kernel(tiny_qwen2, tmp_path / "one_process", **options)
    shared = tmp_path / "shared"
    fitted = []
    monkeypatch.setattr("delift.utility.proxy.fit_proxy", lambda *a, **k: fitted.append(1))
    details = [{}, {}]
    for shard in range(2):
        assert _kernel(tiny_qwen2, shared, shard=shard, num_shards=2, details=details[shard], **options) is None
        assert not list(shared.rglob("kernel*.npy"))
    monkeypatch.undo()
    assert not fitted  # the assembling run fits the proxy
    assert details[0]["tiles"] == details[1]["tiles"] == len(_tile_files(shared)) > 2
    assert details[0]["shard_tiles"] + details[1]["shard_tiles"] == details[0]["tiles"]
    assert all(d["computed"] == d["shard_tiles"] and d["engine"] == engine and d["approximation"] for d in details)

    _no_trainer(monkeypatch)
    assembled = _kernel(tiny_qwen2, shared, **options)
    for part in ("indptr", "indices", "data"):
        assert np.array_equal(getattr(assembled, part), getattr(reference, part)), part
    assert list(shared.rglob("kernel_data.npy"))


@pytest.mark.parametrize("shard, num_shards, field", [
    (2, 2, "kernel.shard"), (-1, 2, "kernel.shard"), (None, 2, "kernel.shard"), (True, 2, "kernel.shard"),
    (1, 1, "kernel.shard"), ("0", 2, "kernel.shard"), (0, 0, "kernel.num_shards"), (0, "2", "kernel.num_shards"),
    (0, 2.0, "kernel.num_shards")])
def test_bad_shard_arguments_name_the_field(shard, num_shards, field, tiny_qwen2, tmp_path):
    with pytest.raises(DeliftInputError, match=f"'{field}'"):
        _kernel(tiny_qwen2, tmp_path, shard=shard, num_shards=num_shards)
    assert not (tmp_path / "utility_kernel").exists()


def test_a_shard_needs_a_cache_dir(tiny_qwen2):
    with pytest.raises(DeliftInputError, match="'kernel.num_shards'.*cache_dir"):
        compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, RECORDS, shard=0, num_shards=2, progress=False)
    # One shard of one is the whole kernel.
    whole = compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, RECORDS[:2], shard=0, num_shards=1, progress=False)
    assert whole.shape == (2, 2)


def test_selecting_with_a_shard_is_an_error_naming_it(tmp_path):
    cfg = compose_config(["task=select", "selector=delift", "model=tiny_qwen2", "kernel.shard=0",
                          "kernel.num_shards=2"], output_dir=tmp_path)
    with pytest.raises(DeliftInputError, match="'kernel.num_shards'"):
        run(cfg)


def test_a_dry_run_with_a_shard_plans_the_whole_kernel(tmp_path, monkeypatch):
    _no_trainer(monkeypatch)
    cfg = compose_config(["task=kernel", "kernel.dry_run=true", "kernel.shard=1", "kernel.num_shards=2",
                          "selector=delift", "model=tiny_qwen2"], output_dir=tmp_path,
                         cache_dir=isolated_cache(tmp_path))
    results = run(cfg)
    assert results["plans"]["kernel"]["n_rows"] == 28 and (tmp_path / "plan.json").exists()
    assert not (tmp_path / "cache" / "utility_kernel").exists()


def test_results_table_prints_a_line_per_kernel_or_shard():
    shard = {"shard": 0, "num_shards": 2, "tiles": 6, "shard_tiles": 3, "computed": 3, "engine": "fast",
             "approximation": False}
    whole = {"shape": [4, 2], "min": -0.5, "max": 1.0, "mean": 0.25}
    lines = results_table({"kernels": {"kernel": {"details": shard}, "query_kernel": whole}}).splitlines()
    assert lines == ["kernel          shard 0/2: 3 of 6 tiles (3 computed)",
                     "query_kernel    shape (4, 2)  min -0.5000  mean 0.2500  max 1.0000"]


# The instruction stage's 28-record pool in tiles of 8: 4 zero-shot + 16 one-shot tiles.
PIPELINE = ["selector=delift", "model=tiny_qwen2", "progress=false", "kernel.tile_size=8", "kernel.batch_size=8"]


def _only(folder: Path, pattern: str) -> Path:
    (found,) = folder.rglob(pattern)
    return found


@pytest.mark.slow  # a run.py multirun whose joblib launcher starts two job processes
def test_two_shard_jobs_through_the_joblib_launcher_then_select_equal_one_process(tmp_path):
    shared = isolated_cache(tmp_path / "shared")
    proc = run_py(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "task=kernel", "kernel.shard=0,1",
                   "kernel.num_shards=2", f"paths.cache_dir={shared}", *PIPELINE], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for shard in range(2):
        assert f"shard {shard}/2: 10 of 20 tiles (10 computed)" in proc.stdout, proc.stdout[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "outputs" / "multiruns").rglob("results.json"))]
    assert [r["kernels"]["kernel"]["details"]["shard"] for r in reports] == [0, 1]
    assert not list(shared.rglob("kernel*.npy"))

    # The selections run in-process: one assembles the shards' tiles, one computes the kernel whole.
    other = isolated_cache(tmp_path / "other")
    for name, cache in (("assembled", shared), ("one_process", other)):
        run(compose_config(["task=select", *PIPELINE], output_dir=tmp_path / name, cache_dir=cache))
    assembled = _only(shared / "utility_kernel", "kernel.npy")
    one_process = _only(other / "utility_kernel", "kernel.npy")
    assert assembled.parent.name == one_process.parent.name  # the same key, whatever the cache folder
    assert np.array_equal(np.load(assembled), np.load(one_process))
    assert assembled.read_bytes() == one_process.read_bytes()
    selections = [json.loads(_only(tmp_path / name, "selection.json").read_text())
                  for name in ("assembled", "one_process")]
    for key in ("indices", "ids", "scores", "objective_value"):
        assert selections[0][key] == selections[1][key], key
    assert selections[0] == selections[1]
