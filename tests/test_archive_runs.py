"""experiments/archive_runs.py: a grid's finished jobs and kernels survive a fresh checkout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("archive_runs", Path(__file__).parents[1] / "experiments" /
                                              "archive_runs.py")
archive_runs = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(archive_runs)


def test_finished_jobs_round_trip_and_unfinished_ones_stay_behind(tmp_path):
    sweep = tmp_path / "sweep"
    for job, finished in (("0_a_seed0", True), ("1_b_seed0", False)):
        (sweep / job / "adapter").mkdir(parents=True)
        (sweep / job / "config_resolved.yaml").write_text(f"job: {job}\n")
        if finished:
            for name in ("results.json", "predictions.jsonl", "selection.json"):
                (sweep / job / name).write_text(f"{name} of {job}\n")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    archive = tmp_path / "archive"
    assert archive_runs.save(sweep, archive) == 1
    assert sorted(p.name for p in (archive / "0_a_seed0").iterdir()) == sorted(archive_runs.JOB_FILES)
    assert not (archive / "1_b_seed0").exists() and (archive / "multirun.yaml").exists()

    fresh = tmp_path / "fresh"
    assert archive_runs.restore(archive, fresh) == 1
    assert (fresh / "0_a_seed0" / "results.json").read_text() == "results.json of 0_a_seed0\n"
    assert archive_runs.restore(archive, fresh) == 0  # a finished job there is left as it is


def test_a_kernel_goes_back_to_its_cache_folder(tmp_path):
    folder = tmp_path / "cache" / "utility_kernel" / "abc123"
    folder.mkdir(parents=True)
    (folder / "kernel.npy").write_bytes(b"npy")
    (folder / "key.json").write_text("{}")
    archive_runs.save_kernel(folder, tmp_path / "kept")
    restored = archive_runs.restore_kernel(tmp_path / "kept", tmp_path / "new_cache")
    assert restored == tmp_path / "new_cache" / "utility_kernel" / "abc123"
    assert (restored / "kernel.npy").read_bytes() == b"npy"
    with pytest.raises(SystemExit, match="no finished kernel"):
        archive_runs.save_kernel(tmp_path / "cache", tmp_path / "nothing")
