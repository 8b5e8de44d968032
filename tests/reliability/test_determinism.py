"""The same config and seed give identical selections and identical results.json metrics (CPU): two runs
that each compute everything from nothing, in separate caches, one in this process and one `python run.py`."""

import json

from delift.pipeline import run
from tests.helpers import compose_config, isolated_cache, run_py

ARGS = ["model=tiny_qwen2", "trainer.max_steps=2", "eval.max_new_tokens=4", "logger=csv", "progress=false",
        "selector=delift_se", "stage=task"]


def _outputs(folder):
    return json.loads((folder / "selection.json").read_text()), json.loads((folder / "results.json").read_text())


def _cached_files(cache):
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*.npy") if "models" not in p.parts)


def test_two_runs_from_nothing_give_identical_selection_and_metrics(tmp_path, cache_dir):
    first_cache, second_cache = cache_dir, isolated_cache(tmp_path / "second")
    assert _cached_files(first_cache) == _cached_files(second_cache) == []
    run(compose_config(ARGS, output_dir=tmp_path / "a", cache_dir=first_cache))
    proc = run_py([*ARGS, f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path,
                  env_extra={"DELIFT_CACHE_DIR": str(second_cache)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Each run computed its embeddings itself, into its own cache.
    computed = _cached_files(first_cache)
    assert any(name.startswith("embeddings") for name in computed) and _cached_files(second_cache) == computed
    for name in computed:
        assert (first_cache / name).read_bytes() == (second_cache / name).read_bytes(), name
    (sel_a, res_a), (sel_b, res_b) = _outputs(tmp_path / "a"), _outputs(tmp_path / "b")
    assert sel_a == sel_b
    assert res_a["metrics_by_mode"] == res_b["metrics_by_mode"]
    assert {k: v for k, v in res_a.items() if k != "timings"} == {k: v for k, v in res_b.items() if k != "timings"}
