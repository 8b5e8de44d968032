"""Fine-tuning killed mid-epoch continues from its last checkpoint with resume=true."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from delift.training import finetune
from tests.conftest import MODEL_CACHE
from tests.helpers import ROOT, run_py
from tests.test_training import LORA, _fresh_tiny

OPTIM = {"lr": 1e-3, "epochs": 3, "batch_size": 2, "max_length": 128}


class CrashAtStep(Exception):
    pass


def test_resumed_training_equals_uninterrupted(smollm2_spec, toy_records, tmp_path):
    import lightning as L

    class Crash(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 4:  # mid-epoch 2 (3 steps per epoch)
                raise CrashAtStep

    def run(folder, resume=False, crash=False):
        options = {"enable_progress_bar": False, "accelerator": "cpu", "callbacks": [Crash()] if crash else []}
        return finetune(_fresh_tiny(smollm2_spec), toy_records, lora=LORA, optim=OPTIM, trainer_options=options,
                        output_dir=folder, seed=0, resume=resume, checkpoint_every_n_steps=1)

    run(tmp_path / "whole")
    try:
        run(tmp_path / "cut", crash=True)
    except CrashAtStep:
        pass
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    run(tmp_path / "cut", resume=True)
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    assert all(torch.allclose(whole[k], resumed[k], atol=1e-6) for k in whole)


def test_sigkill_then_resume_true_continues(tmp_path):
    run_dir = tmp_path / "run"
    args = ["model=tiny_qwen2", "selector=full", "train.optim.epochs=6", "train.checkpoint_every_n_steps=1",
            "eval.max_new_tokens=2", "logger=csv", "progress=false", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, DELIFT_CACHE_DIR=MODEL_CACHE)
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=True)["global_step"] >= 10:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step_at_kill = torch.load(last, weights_only=True)["global_step"]
    assert not (run_dir / "results.json").exists()

    resumed = run_py([*args, "resume=true"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restoring states from the checkpoint" in resumed.stderr + resumed.stdout
    selected = len(json.loads((run_dir / "selection.json").read_text())["indices"])
    expected_steps = 6 * math.ceil(selected / 4)  # 6 epochs, batch size 4
    assert torch.load(last, weights_only=True)["global_step"] == expected_steps > step_at_kill
    assert (run_dir / "results.json").exists()
