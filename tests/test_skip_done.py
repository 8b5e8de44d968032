"""skip_done=true: a job whose run directory holds the results of the same config returns them; a grid
rerun with its old sweep dir computes only what did not finish."""

import json

from delift.pipeline import run
from tests.helpers import compose_config, run_py

SELECT = ["task=select", "selector=random", "logger=csv"]


def _mtimes(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_same_config_skipped_other_config_or_unfinished_run_recomputed(tmp_path):
    folder = tmp_path / "job"
    first = run(compose_config(SELECT, output_dir=folder))
    before = _mtimes(folder)
    # The same config on another machine (other folders) and with other progress/resume settings: done.
    again = compose_config([*SELECT, "skip_done=true", "resume=true"], output_dir=folder,
                           cache_dir=tmp_path / "elsewhere")
    assert run(again) == json.loads(json.dumps(first))
    assert _mtimes(folder) == before
    # Another seed is another job: it runs, and its results replace the old ones.
    other = run(compose_config([*SELECT, "skip_done=true", "seed=1"], output_dir=folder))
    assert other["seed"] == 1 and json.loads((folder / "results.json").read_text())["seed"] == 1
    # A run that did not finish (no results.json) is run again, even with the same config.
    (folder / "results.json").unlink()
    assert run(compose_config([*SELECT, "skip_done=true", "seed=1"], output_dir=folder))["seed"] == 1
    assert (folder / "results.json").exists()


def test_multirun_continued_in_its_sweep_dir_runs_only_unfinished_jobs(tmp_path):
    grid = ["-m", "model=tiny_qwen2", "selector=random,initial", "trainer.max_steps=1", "eval.max_new_tokens=2",
            "progress=false", "logger=csv"]
    proc = run_py(grid, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").glob("*/*")
    finished, interrupted = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    # An interrupted job has no results.json (written last); its other files are from the first attempt.
    (interrupted / "results.json").unlink()
    kept, redone = _mtimes(finished), (interrupted / "selection.json").stat().st_mtime_ns

    proc = run_py([*grid, f"hydra.sweep.dir={sweep}", "skip_done=true"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("Skipped:") == 1 and f"{finished} already holds the results of this config" in log
    # The finished job: nothing recomputed or rewritten (no selection, training, evaluation, new logger run).
    assert {k: v for k, v in _mtimes(finished).items() if k.parts[0] != ".hydra" and k.suffix != ".log"} == {
        k: v for k, v in kept.items() if k.parts[0] != ".hydra" and k.suffix != ".log"}
    # The interrupted one ran again, from selection on.
    assert (interrupted / "results.json").exists()
    assert (interrupted / "selection.json").stat().st_mtime_ns > redone
