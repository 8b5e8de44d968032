"""skip_done=true: a job whose run directory holds the results of the same config returns them; a grid
killed mid-job and rerun with its old sweep dir computes only what did not finish."""

import json
import signal
import subprocess

from delift.pipeline import run
from tests.helpers import HANG_GUARD_S, compose_config, run_cli, run_py_invocation
from tests.hooks import JOB_VARIABLE, STEP_VARIABLE

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


GRID = ["-m", "model=tiny_qwen2", "selector=random", "seed=0,1,2", "trainer.max_steps=1", "eval.max_new_tokens=2",
        "progress=false", "logger=csv", "trainer.callbacks=[{_target_:tests.hooks.SigkillAt}]"]


def test_killed_multirun_continued_in_its_sweep_dir_runs_only_unfinished_jobs(tmp_path, monkeypatch):
    # `python run.py -m`, SIGKILLed by the test hook as the second job (job 1) starts fine-tuning; the hook is
    # armed by the environment, so the rerun's config is the same.
    argv, env = run_py_invocation(GRID, {STEP_VARIABLE: "0", JOB_VARIABLE: "1"})
    killed = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns").glob("*/*")
    jobs = sorted((p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()), key=lambda p: p.name)
    finished = [job for job in jobs if (job / "results.json").exists()]
    # Killed while the second job trained: its folder holds a partial run, never results.json (written last).
    assert [job.name[0] for job in finished] == ["0"] and [job.name[0] for job in jobs] == ["0", "1"]
    assert (jobs[1] / "selection.json").exists()
    kept = _mtimes(finished[0])

    proc = run_cli([*GRID, f"hydra.sweep.dir={sweep}", "skip_done=true"], tmp_path, monkeypatch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("Skipped:") == 1 and f"{finished[0]} already holds the results of this config" in log
    # The finished job: nothing recomputed or rewritten (no selection, training, evaluation, new logger run).
    assert {k: v for k, v in _mtimes(finished[0]).items() if k.parts[0] != ".hydra" and k.suffix != ".log"} == {
        k: v for k, v in kept.items() if k.parts[0] != ".hydra" and k.suffix != ".log"}
    # The killed job and the one never started ran, with their own seeds.
    seeds = [json.loads((job / "results.json").read_text())["seed"] for job in sorted(sweep.glob("[0-9]_*"))]
    assert seeds == [0, 1, 2]
