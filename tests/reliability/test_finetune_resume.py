"""Fine-tuning killed mid-epoch continues from its last checkpoint with resume=true."""

import json
import math
import signal
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from delift.pipeline import run
from delift.training import finetune
from tests.helpers import HANG_GUARD_S, compose_config, run_py_invocation
from tests.hooks import STEP_VARIABLE, TrainStart
from tests.test_training import LORA, _fresh_tiny

OPTIM = {"lr": 1e-3, "epochs": 3, "batch_size": 2, "max_length": 128}


class CrashAtStep(Exception):
    pass


# 3 batches per epoch: grad_accum 1 gives 3 steps per epoch, grad_accum 2 gives 2 (the last one short);
# the crash step is mid-epoch 2 either way.
@pytest.mark.parametrize("grad_accum, crash_step", [(1, 4), (2, 3)])
def test_resumed_training_equals_uninterrupted(smollm2_spec, toy_records, tmp_path, grad_accum, crash_step):
    import lightning as L

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == crash_step:
                raise CrashAtStep

    def run(folder, resume=False, crash=False):
        options = {"enable_progress_bar": False, "accelerator": "cpu", "callbacks": [Crash()] if crash else []}
        return finetune(_fresh_tiny(smollm2_spec), toy_records, lora=LORA, optim=OPTIM | {"grad_accum": grad_accum},
                        trainer_options=options, output_dir=folder, seed=0, resume=resume, checkpoint_every_n_steps=1)

    run(tmp_path / "whole")
    with pytest.raises(CrashAtStep):
        run(tmp_path / "cut", crash=True)
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == crash_step
    run(tmp_path / "cut", resume=True)
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)


KILL_AT_STEP = 10  # mid-epoch 2 of 2 (7 steps per epoch)


def test_sigkill_then_resume_true_continues(tmp_path):
    """`python run.py` SIGKILLed by a test hook as step 11 starts (step 10's checkpoint on disk), then the
    same config with resume=true (in-process) trains from step 10 to the end."""
    run_dir = tmp_path / "run"
    overrides = ["model=tiny_qwen2", "selector=full", "train.optim.epochs=2", "train.checkpoint_every_n_steps=1",
                 "eval.max_new_tokens=2", "logger=csv", "progress=false",
                 "trainer.callbacks=[{_target_:tests.hooks.SigkillAt},{_target_:tests.hooks.TrainStart}]"]
    argv, env = run_py_invocation([*overrides, f"hydra.run.dir={run_dir}"], {STEP_VARIABLE: str(KILL_AT_STEP)})
    killed = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == KILL_AT_STEP
    assert not (run_dir / "results.json").exists()

    TrainStart.starts.clear()
    results = run(compose_config([*overrides, "resume=true"], output_dir=run_dir))
    assert TrainStart.starts == [KILL_AT_STEP]  # continued from the checkpoint, not from step 0
    selected = len(json.loads((run_dir / "selection.json").read_text())["indices"])
    expected_steps = 2 * math.ceil(selected / 4)  # 2 epochs, batch size 4
    assert torch.load(last, weights_only=True)["global_step"] == expected_steps > KILL_AT_STEP
    assert (run_dir / "results.json").exists() and results["n_selected"] == selected
