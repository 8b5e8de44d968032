"""The Python API: every selector in the registry, and `delift.select` with the command's defaults."""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import delift
from delift.errors import DeliftInputError
from delift.records import make_record
from delift.selectors import SELECTORS
from delift.selectors.delift import DeliftSESelector
from delift.utility import kernel as kernel_module
from tests.helpers import CONF_DIR, isolated_cache

QUESTIONS = ["capital of France", "colour of the sky", "legs of a spider", "author of Hamlet", "12 times 12",
             "gas plants absorb", "largest planet", "boiling point of water", "speed of light", "author of Emma"]


def records(n=10, source="toy"):
    return [make_record(f"{source}/{i}", "Answer the question.", QUESTIONS[i % len(QUESTIONS)] + f" ({i})",
                        f"answer {i}", source=source) for i in range(n)]


def test_registry_holds_every_shipped_selector():
    for path in sorted(Path(CONF_DIR, "selector").glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        if target:  # less_paper extends less
            assert target.rsplit(".", 1)[1] in {cls.__name__ for cls in SELECTORS.values()}, path.stem
    assert SELECTORS["delift"].__name__ == "DeliftSelector" and SELECTORS["delift_se"] is DeliftSESelector


def test_select_random_is_seeded_and_sized(tmp_path):
    pool = records(10)
    first = delift.select(pool, "random", 0.3, seed=3, progress=False)
    again = delift.select(pool, "random", 0.3, seed=3, progress=False)
    other = delift.select(pool, "random", 0.3, seed=4, progress=False)
    assert len(first.indices) == 3 and first.indices == again.indices and first.indices != other.indices


def test_select_delift_with_a_tiny_model_is_reproducible(tmp_path, monkeypatch):
    cache = isolated_cache(tmp_path)
    pool = records(8)
    overrides = [f"paths.cache_dir={cache}", "kernel.batch_size=8"]
    selection = delift.select(pool, "delift", 0.5, model="tiny_qwen2", overrides=overrides, progress=False)
    assert len(selection.indices) == 4 and len(set(selection.indices)) == 4
    assert selection.info["objective"] == "fl"
    (kernel_file,) = cache.glob("utility_kernel/*/kernel.npy")
    # The cached kernel is the one the command computes; a second call reads it (computing a tile
    # raises) and picks the same.
    monkeypatch.setattr(kernel_module, "run_tiles", _no_kernel_computation)
    again = delift.select(pool, "delift", 0.5, model="tiny_qwen2", overrides=overrides, progress=False)
    assert again.indices == selection.indices and list(cache.glob("utility_kernel/*/kernel.npy")) == [kernel_file]


def _no_kernel_computation(*args, **kwargs):
    raise AssertionError("the kernel was computed again instead of read from the cache")


def test_select_task_stage_uses_flmi_and_needs_a_target(tmp_path):
    pool, target = records(10), records(4, source="target")
    selection = delift.select(pool, "delift_se", 0.3, stage="task", target=target, progress=False,
                              overrides=[f"paths.cache_dir={isolated_cache(tmp_path)}"])
    assert selection.info["objective"] == "flmi" and len(selection.indices) == 3
    assert np.all(np.diff(selection.scores) <= 1e-9)  # greedy gains never grow
    with pytest.raises(DeliftInputError, match="target"):
        delift.select(pool, "delift_se", 0.3, stage="task")


def test_select_rejects_bad_input_with_the_field():
    with pytest.raises(DeliftInputError) as err:
        delift.select(records(6), "random", 1.5)
    assert err.value.field == "selector.fraction"
    with pytest.raises(DeliftInputError) as err:
        delift.select([{"id": "a", "instruction": "q"}], "random", 0.5)
    assert err.value.field == "output" and "<records>" in str(err.value)
