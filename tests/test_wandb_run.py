"""The W&B run starts with the job, for every task, and holds what the job did; read back from the
offline run's own records (wandb/offline-run-*/run-*.wandb), which `wandb sync` uploads."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import wandb
from wandb.proto import wandb_internal_pb2

import delift.pipeline
from delift.pipeline import run
from tests.helpers import compose_config, fresh_cache, isolated_cache

TINY = ["model=tiny_qwen2", "trainer.max_steps=2", "eval.max_new_tokens=4"]

# The .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log style 32 KiB blocks of
# chunks, each a 7-byte header (crc32, length, type) and its bytes; a record spans FIRST..LAST chunks.
BLOCK, CHUNK_HEADER, FULL, LAST = 32768, 7, 1, 4


def read_records(path: Path) -> list:
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, payload, pos = [], b"", 7
    while pos + CHUNK_HEADER <= len(data):
        if BLOCK - pos % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if pos + CHUNK_HEADER + length > len(data):  # a chunk still being written
            break
        payload += data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


@dataclass
class OfflineRun:
    folder: Path
    records: list

    @classmethod
    def of(cls, output_dir: Path) -> "OfflineRun":
        """The run's records: W&B's service writes the file after `finish()` returns, so the service is
        shut down first (`wandb.teardown` returns once it has flushed every run and exited)."""
        wandb.teardown()
        (folder,) = output_dir.glob("wandb/offline-run-*")
        (path,) = folder.glob("run-*.wandb")
        records = read_records(path)
        assert any(r.WhichOneof("record_type") == "exit" for r in records), f"no exit record in {path}"
        return cls(folder, records)

    def _kind(self, kind: str) -> list[tuple[int, object]]:
        return [(n, getattr(r, kind)) for n, r in enumerate(self.records) if r.WhichOneof("record_type") == kind]

    @property
    def info(self):
        return self._kind("run")[0][1]

    @property
    def exit_code(self) -> int:
        ((_, exit_record),) = self._kind("exit")
        return exit_record.exit_code

    def history(self) -> list[tuple[int, dict]]:
        """(record position, {key: value}) per logged step; nested keys joined with '.'."""
        return [(n, {".".join(item.nested_key) or item.key: json.loads(item.value_json) for item in h.item})
                for n, h in self._kind("history")]

    def logged(self, key: str) -> list:
        return [row[key] for _, row in self.history() if key in row]

    def first_logged_at(self, key: str) -> int:
        return next(n for n, row in self.history() if key in row)

    def artifacts(self) -> dict[str, tuple[int, object]]:
        return {a.name: (n, a) for n, a in self._kind("artifact")}


def entries(artifact) -> dict[str, object]:
    return {entry.path: entry for entry in artifact.manifest.contents}


def _offline_wandb(monkeypatch, home: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for variable in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(variable, str(home))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, with its own home folders (no staging, cache or settings under ~)."""
    _offline_wandb(monkeypatch, tmp_path / "wandb_home")


@dataclass
class Job:
    output_dir: Path
    results: dict
    wandb_run: OfflineRun


@pytest.fixture(scope="module")
def delift_job(tmp_path_factory) -> Job:
    """One tiny run job (selector=delift, a fresh cache, offline W&B) whose outputs the tests below only read."""
    folder = tmp_path_factory.mktemp("delift_job")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _offline_wandb(monkeypatch, folder / "wandb_home")
        output_dir = folder / "job"
        results = run(compose_config(["selector=delift", *TINY], output_dir=output_dir,
                                     cache_dir=fresh_cache(folder / "cache")))
        return Job(output_dir, results, OfflineRun.of(output_dir))


def test_run_job_names_and_tags_its_run_and_ends_it_with_exit_status_0(delift_job):
    wandb_run = delift_job.wandb_run
    assert wandb_run.info.display_name == "instruction-delift-seed0" and wandb_run.info.job_type == "run"
    assert set(wandb_run.info.tags) == {"stage:instruction", "selector:delift", "model:tiny-qwen2",
                                        "experiment:instruction", "engine:fast", "data:trivia+mmlu+gsm8k"}
    assert wandb_run.exit_code == 0


def test_run_job_logs_its_selection_as_the_run_folders_own_files(delift_job):
    output_dir, wandb_run = delift_job.output_dir, delift_job.wandb_run
    _, selection = wandb_run.artifacts()["selection-instruction-delift-seed0"]
    assert selection.type == "dataset"
    files = entries(selection)
    assert set(files) == {"selection.json", "subset.jsonl"}
    for name, entry in files.items():  # the run folder's own files, not copies
        assert Path(entry.local_path) == output_dir / name and entry.size == (output_dir / name).stat().st_size
    subset = (output_dir / "subset.jsonl").read_text().splitlines()
    assert len(subset) == delift_job.results["n_selected"] == wandb_run.logged("selection/n_selected")[0] == 8


def test_run_job_logs_its_kernel_and_adapter(delift_job):
    artifacts = delift_job.wandb_run.artifacts()
    _, kernel = artifacts["kernel-instruction-delift-seed0"]
    assert kernel.type == "kernel" and set(entries(kernel)) == {"kernel.png", "kernel.npy"}
    assert np.load(delift_job.output_dir / "kernel.npy").shape == (28, 28)
    _, adapter = artifacts["adapter-instruction-delift-seed0"]
    assert adapter.type == "model" and {"adapter_config.json", "adapter_model.safetensors"} <= set(entries(adapter))


def test_run_job_logs_its_plots(delift_job):
    for plot in ("kernel", "gains", "source_mix"):
        assert (delift_job.output_dir / f"{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (logged,) = delift_job.wandb_run.logged(f"plots/{plot}.path")
        assert (delift_job.wandb_run.folder / "files" / logged).is_file()


def test_run_job_logs_timings_as_each_step_ends_and_its_metrics(delift_job):
    wandb_run, results = delift_job.wandb_run, delift_job.results
    selection_at, _ = wandb_run.artifacts()["selection-instruction-delift-seed0"]
    # Timings land as each step ends, around the selection: not all at the end of the job.
    assert wandb_run.first_logged_at("time/select") < selection_at < wandb_run.first_logged_at("time/finetune")
    assert wandb_run.logged("time/total") == [results["timings"]["total"]]
    assert wandb_run.logged("eval/finetune/rouge1") == [results["metrics"]["rouge1"]]


def test_select_task_starts_a_run_and_references_a_sparse_kernel_in_the_cache(tmp_path, offline_wandb):
    cache = isolated_cache(tmp_path)
    output_dir = tmp_path / "job"
    run(compose_config(["task=select", "selector=delift", "kernel.engine=knn", "kernel.knn_k=4", *TINY],
                       output_dir=output_dir, cache_dir=cache))
    wandb_run = OfflineRun.of(output_dir)

    assert wandb_run.info.display_name == "instruction-delift-seed0" and wandb_run.info.job_type == "select"
    assert "engine:knn" in wandb_run.info.tags and wandb_run.exit_code == 0
    artifacts = wandb_run.artifacts()
    assert set(entries(artifacts["selection-instruction-delift-seed0"][1])) == {"selection.json", "subset.jsonl"}
    kernel_files = entries(artifacts["kernel-instruction-delift-seed0"][1])
    assert "kernel.npy" not in kernel_files and not (output_dir / "kernel.npy").exists()
    cached = {path: entry.ref for path, entry in kernel_files.items() if path.startswith("cache/")}
    assert cached and all(ref.startswith((cache / "utility_kernel").resolve().as_uri()) for ref in cached.values())
    assert wandb_run.logged("plots/gains.path") and wandb_run.logged("time/select")


def test_kernel_task_starts_a_run_with_the_kernel(tmp_path, offline_wandb):
    output_dir = tmp_path / "job"
    run(compose_config(["task=kernel", "selector=delift", *TINY], output_dir=output_dir))
    wandb_run = OfflineRun.of(output_dir)

    assert wandb_run.info.job_type == "kernel" and wandb_run.exit_code == 0
    assert set(entries(wandb_run.artifacts()["kernel-instruction-delift-seed0"][1])) == {"kernel.png", "kernel.npy"}
    assert wandb_run.logged("time/kernel") and wandb_run.logged("plots/kernel.path")


def test_a_name_and_tags_the_user_sets_win(tmp_path, offline_wandb):
    output_dir = tmp_path / "job"
    run(compose_config(["task=select", "selector=random", "logger.name=mine", "logger.tags=[a,b]"],
                       output_dir=output_dir))
    info = OfflineRun.of(output_dir).info
    assert info.display_name == "mine" and list(info.tags) == ["a", "b"]


def test_a_job_that_fails_midway_leaves_its_run_marked_failed(tmp_path, offline_wandb, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("fine-tuning broke")

    monkeypatch.setattr(delift.pipeline, "finetune", fail)
    output_dir = tmp_path / "job"
    with pytest.raises(RuntimeError, match="fine-tuning broke"):
        run(compose_config(["selector=random", *TINY], output_dir=output_dir))
    wandb_run = OfflineRun.of(output_dir)
    assert wandb_run.exit_code == 1  # the command's exit status for an error that is not bad input
    assert wandb_run.logged("time/select") and "selection-instruction-random-seed0" in wandb_run.artifacts()


# `~logger` drops the group (Hydra 1.3 refuses `logger=null` on the command line).
@pytest.mark.parametrize("logger", ["logger=csv", "~logger"])
def test_other_loggers_get_the_plots_as_files_and_no_wandb_run(logger, tmp_path, offline_wandb):
    output_dir = tmp_path / "job"
    run(compose_config(["task=select", "selector=random", logger], output_dir=output_dir))
    assert (output_dir / "source_mix.png").is_file() and not (output_dir / "wandb").exists()
    metrics = list(output_dir.glob("csv/version_*/metrics.csv"))
    assert bool(metrics) == (logger == "logger=csv")
    if metrics:
        assert "time/select" in metrics[0].read_text().splitlines()[0]
