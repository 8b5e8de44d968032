"""Compose the real Hydra config in tests, as run.py would, with run folders under tmp_path; run the command
in-process (`run_cli`) or, where a process boundary is the point, as `python run.py` (`run_py`)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.conftest import MODEL_CACHE, fresh_cache  # noqa: F401 - MODEL_CACHE: the specs' (models only)


class SeededEmbedder:
    """Fixed pseudo-random unit vectors per text: a deterministic candidate graph without loading a model."""

    def identity(self):
        return {"name": "seeded-test-vectors"}

    def encode(self, texts):
        vectors = np.stack([np.random.default_rng(sum(map(ord, t))).standard_normal(8) for t in texts])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "delift" / "conf")
ROOT = Path(__file__).resolve().parents[1]


def current_cache() -> str:
    """The running test's own cache folder (conftest's `cache_dir` fixture sets $DELIFT_CACHE_DIR)."""
    return os.environ["DELIFT_CACHE_DIR"]


def compose_config(overrides=(), output_dir=None, cache_dir=None):
    """The composed, hydra-resolvable config for `overrides` (like `python run.py OVERRIDES`); its cache is
    `cache_dir`, by default the running test's own."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir or ROOT / "outputs" / "tests")
        cfg.paths.cache_dir = str(cache_dir or current_cache())
        cfg.progress = False
        del cfg["hydra"]  # run.py's config has no hydra node either; ${hydra:...} resolves via HydraConfig
    return cfg


def isolated_cache(tmp_path) -> Path:
    """Another fresh cache folder (kernels, embeddings, features), under `tmp_path`, sharing the converted models."""
    return fresh_cache(Path(tmp_path) / "cache")


def run_py_invocation(args, env_extra=None) -> tuple[list[str], dict]:
    """(argv, env) of `python run.py ARGS`, offline, with the running test's cache (unless env_extra sets one)."""
    env = {**os.environ, "WANDB_MODE": "offline", **(env_extra or {})}
    return [sys.executable, str(ROOT / "run.py"), *args], env


# Not a speed check (no test bounds how long anything takes): only a process that hangs is stopped.
HANG_GUARD_S = 1800


def run_py(args, cwd, env_extra=None) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in a subprocess (see run_py_invocation)."""
    argv, env = run_py_invocation(args, env_extra)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


class CliResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run_cli(args, cwd, monkeypatch) -> CliResult:
    """The `delift` command (run.py's `delift.cli.main`) in this process, in `cwd`: its exit status, stdout and
    stderr. W&B's service is shut down after it, as at a process's exit; what a real process boundary adds
    (interpreter start, signals, exit status) is run_py's to show, once per contract."""
    from delift import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # W&B's home, not the user's
        if variable not in os.environ:
            monkeypatch.setenv(variable, str(Path(cwd) / ".wandb_home"))
    monkeypatch.setattr(sys, "argv", ["run.py", *map(str, args)])
    # Hydra's logging setup closes every handler there is; absl's (rouge-score imports it) would close the
    # stream it holds, pytest's capture, were that not the real stderr (which absl never closes).
    _absl_to_real_stderr()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err = io.StringIO(), io.StringIO()
    code = 0
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            finally:
                if "wandb" in sys.modules:  # as at a process's exit: W&B's service flushes its runs and ends
                    sys.modules["wandb"].teardown()
    finally:
        _absl_to_real_stderr()  # also where the command imported absl, under the redirection
        GlobalHydra.instance().clear()
        for handler in [h for h in root.handlers if h not in handlers]:  # Hydra's job logging: undone
            root.removeHandler(handler)
            handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)
    return CliResult(code, out.getvalue(), err.getvalue())


def _absl_to_real_stderr() -> None:
    absl_logging = sys.modules.get("absl.logging")
    if absl_logging is not None:
        absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
