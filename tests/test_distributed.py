"""DDP through `python run.py`: two gloo processes on CPU give one process's selection and metrics, and
only rank 0 writes; DDP inside a multirun fails at once (the command in-process)."""

import json

import pytest

from tests.helpers import isolated_cache, run_cli, run_py

# LoRA dropout draws different masks in two processes than in one: off, so the steps are the same.
JOB = ["model=tiny_qwen2", "selector=delift", "trainer.max_steps=2", "eval.max_new_tokens=4", "logger=csv",
       "train.lora.dropout=0", "progress=false", "kernel.tile_size=8"]


def run_dir(cwd):
    (folder,) = (cwd / "outputs" / "runs").glob("*/*")
    return folder


def test_two_ddp_processes_give_the_selection_and_metrics_of_one(tmp_path, monkeypatch):
    # One process: the command in this process (its own fresh cache); DDP: `python run.py`, whose Lightning
    # launcher starts the second rank, with another fresh cache.
    (tmp_path / "one").mkdir()
    one = run_cli(JOB, tmp_path / "one", monkeypatch)
    assert one.returncode == 0, one.stderr[-3000:]
    monkeypatch.chdir(tmp_path)
    cwd = tmp_path / "ddp"
    cwd.mkdir()
    ddp_proc = run_py([*JOB, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"], cwd=cwd,
                      env_extra={"DELIFT_CACHE_DIR": str(isolated_cache(cwd))})
    assert ddp_proc.returncode == 0, ddp_proc.stderr[-3000:]
    one_dir, ddp_dir = run_dir(tmp_path / "one"), run_dir(cwd)
    assert "GLOBAL_RANK: 1" in ddp_proc.stdout + ddp_proc.stderr  # the second rank joined the kernel's Trainer.predict
    assert (ddp_dir / "selection.json").read_text() == (one_dir / "selection.json").read_text()
    one, ddp = (json.loads((d / "results.json").read_text()) for d in (one_dir, ddp_dir))
    # Generation and its scores are equal; the reference loss, a continuous function of weights whose
    # gradients DDP all-reduced in another order, agrees to rounding.
    assert ddp["metrics"] == pytest.approx(one["metrics"], rel=1e-6)
    predictions = [[json.loads(line) for line in (d / "predictions.jsonl").read_text().splitlines()]
                   for d in (one_dir, ddp_dir)]
    assert [{k: v for k, v in row.items() if k != "ref_loss"} for row in predictions[1]] == \
        [{k: v for k, v in row.items() if k != "ref_loss"} for row in predictions[0]]
    assert [row["ref_loss"] for row in predictions[1]] == pytest.approx([row["ref_loss"] for row in predictions[0]],
                                                                        rel=1e-6)
    # Rank 1 wrote only Hydra's log of its console; rank 0 everything else, once.
    assert {p.name for p in ddp_dir.iterdir()} - {p.name for p in one_dir.iterdir()} == {"train_ddp_process_1.log"}
    assert ddp_proc.stdout.count("finetune") == 1  # one results table


def test_ddp_inside_a_multirun_fails_at_once_saying_what_to_do(tmp_path, monkeypatch):
    import delift.models

    def loads(*args, **kwargs):
        raise AssertionError("a model loaded: the multirun should have stopped first")

    monkeypatch.setattr(delift.models.TinyRandomModel, "load", loads)
    proc = run_cli(["-m", "model=tiny_qwen2", "seed=0,1", "trainer=ddp", "trainer.devices=2",
                    "trainer.accelerator=cpu"], tmp_path, monkeypatch)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "cannot run inside a multirun" in proc.stderr and "hydra/launcher=slurm" in proc.stderr
    assert not list((tmp_path / "outputs").rglob("selection.json"))
