"""Safety: no remote code by default, no pickle, safe YAML, and no secret in any output."""

import re
from pathlib import Path

from omegaconf import OmegaConf

from tests.helpers import CONF_DIR, ROOT, run_cli

SOURCES = sorted([*(ROOT / "delift").rglob("*.py"), ROOT / "run.py", *(ROOT / "experiments").glob("*.py")])


def _calls(pattern):
    return [(path.name, n, line.strip()) for path in SOURCES
            for n, line in enumerate(path.read_text().splitlines(), 1) if re.search(pattern, line)]


def test_no_pickle_and_no_unsafe_loads_in_the_project():
    assert _calls(r"\bimport pickle\b|\bpickle\.(loads?|dumps?|Unpickler)\b|allow_pickle=True|\bimport dill\b|joblib\.load") == []
    assert [c for c in _calls(r"torch\.load\(") if "weights_only=True" not in c[2]] == []
    assert [c for c in _calls(r"yaml\.load\(") if "SAFE_YAML_LOADER" not in c[2] and "SafeLoader" not in c[2]] == []
    assert _calls(r"(?<![.\w])(eval|exec)\(") == []


def test_remote_code_is_off_in_every_config():
    for path in Path(CONF_DIR).rglob("*.yaml"):
        config = OmegaConf.load(path)
        assert "trust_remote_code: true" not in path.read_text().lower(), path
        if "trust_remote_code" in config:
            assert config.trust_remote_code is False, path


FAKE_SECRETS = {"WANDB_API_KEY": "fake-wandb-key-0123456789abcdef0123456789abcdef01234567",
                "HF_TOKEN": "hf_fakeTokenValue0123456789", "HUGGING_FACE_HUB_TOKEN": "hf_fakeHubToken987654321",
                "OPENAI_API_KEY": "sk-fakeOpenAIKey0123456789", "DELIFT_TEST_SECRET": "s3cr3t-value-never-logged"}


def test_no_secret_reaches_logs_configs_run_directory_or_wandb(tmp_path, monkeypatch):
    import wandb

    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    wandb.teardown()  # W&B's service process starts afresh, with the secrets in its environment too
    proc = run_cli(["model=tiny_qwen2", "selector=random", "trainer.max_steps=1", "eval.max_new_tokens=2",
                    "eval.mode=both", "progress=false", f"paths.log_dir={tmp_path}"], tmp_path, monkeypatch)
    wandb.teardown()  # every W&B file written
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("wandb" in p.parts for p in files) and any(p.name == "results.json" for p in files)
    leaks = [(p, name) for p in files for name, value in FAKE_SECRETS.items() if value.encode() in p.read_bytes()]
    assert leaks == []
    assert not any(value in proc.stdout + proc.stderr for value in FAKE_SECRETS.values())
