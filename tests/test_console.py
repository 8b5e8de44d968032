"""What a default run prints: each message once, no third-party chatter, warnings that say what to change."""

from collections import Counter

from tests.helpers import run_py

NOISE = ("litlogger", "Tip:", "faiss.loader", "wandb: WARNING", "FutureWarning", "DeprecationWarning",
         "is deprecated", "Saving the dataset")


def test_a_tiny_run_prints_one_screen_once(tmp_path):
    proc = run_py(["model=tiny_qwen2", "selector=random", "trainer.max_steps=2", "eval.max_new_tokens=4",
                   "progress=false", "train.optim.max_length=24"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) <= 20, "\n".join(lines)
    assert not [line for line in lines if any(word in line for word in NOISE)], "\n".join(lines)
    messages = Counter(line.split("] - ", 1)[-1] for line in lines)  # without Hydra's timestamp prefix
    assert [m for m, n in messages.items() if n > 1] == []
    cut = [line for line in lines if "exceed train.optim.max_length=24" in line]
    assert len(cut) == 1 and "raise train.optim.max_length" in cut[0]
