"""DDP through `python run.py`: two gloo processes on CPU give one process's selection and metrics, and
only rank 0 writes; DDP inside a multirun fails at once."""

import json

import pytest

from tests.helpers import isolated_cache, run_py

# LoRA dropout draws different masks in two processes than in one: off, so the steps are the same.
JOB = ["model=tiny_qwen2", "selector=delift", "trainer.max_steps=2", "eval.max_new_tokens=4", "logger=csv",
       "train.lora.dropout=0", "progress=false", "kernel.tile_size=8"]


def run_dir(cwd):
    (folder,) = (cwd / "outputs" / "runs").glob("*/*")
    return folder


def test_two_ddp_processes_give_the_selection_and_metrics_of_one(tmp_path):
    runs = {}
    for name, extra in (("one", []), ("ddp", ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"])):
        cwd = tmp_path / name
        cwd.mkdir()
        proc = run_py([*JOB, *extra], cwd=cwd, env_extra={"DELIFT_CACHE_DIR": str(isolated_cache(cwd))})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = (run_dir(cwd), proc)
    ddp_dir, ddp_proc = runs["ddp"]
    assert "GLOBAL_RANK: 1" in ddp_proc.stdout + ddp_proc.stderr  # the second rank joined the kernel's Trainer.predict
    one_dir = runs["one"][0]
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


def test_ddp_inside_a_multirun_fails_at_once_saying_what_to_do(tmp_path):
    proc = run_py(["-m", "model=tiny_qwen2", "seed=0,1", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"],
                  cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "cannot run inside a multirun" in proc.stderr and "hydra/launcher=slurm" in proc.stderr
    assert not list((tmp_path / "outputs").rglob("selection.json"))
