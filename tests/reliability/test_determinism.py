"""The same config and seed give identical selections and identical results.json metrics (CPU)."""

import json

from tests.helpers import run_py

ARGS = ["model=tiny_qwen2", "trainer.max_steps=2", "eval.max_new_tokens=4", "logger=csv", "progress=false"]


def _job(tmp_path, name, extra):
    folder = tmp_path / name
    proc = run_py([*ARGS, *extra, f"hydra.run.dir={folder}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (json.loads((folder / "selection.json").read_text()), json.loads((folder / "results.json").read_text()))


def test_two_runs_identical_selection_and_metrics(tmp_path):
    sel_a, res_a = _job(tmp_path, "a", ["selector=delift_se", "stage=task"])
    sel_b, res_b = _job(tmp_path, "b", ["selector=delift_se", "stage=task"])
    assert sel_a == sel_b
    assert res_a["metrics_by_mode"] == res_b["metrics_by_mode"]
    assert {k: v for k, v in res_a.items() if k != "timings"} == {k: v for k, v in res_b.items() if k != "timings"}
