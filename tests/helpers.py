"""Compose the real Hydra config in tests, as run.py would, with run folders under tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from tests.conftest import MODEL_CACHE


class SeededEmbedder:
    """Fixed pseudo-random unit vectors per text: a deterministic candidate graph without loading a model."""

    def identity(self):
        return {"name": "seeded-test-vectors"}

    def encode(self, texts):
        vectors = np.stack([np.random.default_rng(sum(map(ord, t))).standard_normal(8) for t in texts])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

CONF_DIR = str(Path(__file__).resolve().parents[1] / "delift" / "conf")
ROOT = Path(__file__).resolve().parents[1]


def compose_config(overrides=(), output_dir=None, cache_dir=MODEL_CACHE):
    """The composed, hydra-resolvable config for `overrides` (like `python run.py OVERRIDES`)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(output_dir or ROOT / "outputs" / "tests")
        cfg.paths.cache_dir = str(cache_dir)
        cfg.progress = False
        del cfg["hydra"]  # run.py's config has no hydra node either; ${hydra:...} resolves via HydraConfig
    return cfg


def isolated_cache(tmp_path) -> Path:
    """A cache folder of its own (kernels, embeddings, features) that shares the converted models."""
    cache = Path(tmp_path) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    (Path(MODEL_CACHE) / "models").mkdir(parents=True, exist_ok=True)
    if not (cache / "models").exists():
        (cache / "models").symlink_to(Path(MODEL_CACHE) / "models", target_is_directory=True)
    return cache


def run_py_invocation(args, env_extra=None) -> tuple[list[str], dict]:
    """(argv, env) of `python run.py ARGS`, offline, with the shared model cache."""
    env = {**os.environ, "DELIFT_CACHE_DIR": MODEL_CACHE, "WANDB_MODE": "offline", **(env_extra or {})}
    return [sys.executable, str(ROOT / "run.py"), *args], env


def run_py(args, cwd, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in a subprocess (see run_py_invocation)."""
    argv, env = run_py_invocation(args, env_extra)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
