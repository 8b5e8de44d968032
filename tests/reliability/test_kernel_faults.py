"""The kernel cache under faults: SIGKILL at random points (the exact kernel's tiles and the knn
approximation's sparse tiles), half-written files, two runs at once."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MODEL_CACHE

WORKER = Path(__file__).with_name("kernel_worker.py")


def _start(cache_dir, out, engine="fast"):
    env = dict(os.environ, DELIFT_CACHE_DIR=MODEL_CACHE)
    return subprocess.Popen([sys.executable, str(WORKER), str(cache_dir), str(out), engine], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _tiles(cache_dir):
    """Finished tiles; the hidden temporary files of writes in flight can vanish while we look."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for pattern in ("*shot_*.npy", "pairs_*.npy")
            for p in Path(cache_dir).rglob(pattern) if not p.name.startswith(".")}


def _finish(cache_dir, out, engine="fast"):
    proc = _start(cache_dir, out, engine)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    return np.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    return _finish(folder / "cache", folder / "kernel.npy")


@pytest.fixture(scope="module")
def knn_reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("knn_reference")
    return _finish(folder / "cache", folder / "kernel.npy", "knn")


# Tiles: fast 8 zero-shot + 64 one-shot; knn 16 zero-shot + 16 column spans (16 x 6 listed pairs).
@pytest.mark.parametrize("engine, step, final", [("fast", 12, "kernel.npy"), ("knn", 6, "kernel_data.npy")])
def test_sigkill_at_random_points_resumes_to_the_identical_kernel(request, tmp_path, engine, step, final):
    reference = request.getfixturevalue("reference" if engine == "fast" else "knn_reference")
    rng = random.Random(0)
    cache = tmp_path / "cache"
    kept = {}
    for attempt in range(3):
        proc = _start(cache, tmp_path / "unused.npy", engine)
        target = len(kept) + rng.randint(3, step)
        deadline = time.time() + 300
        while proc.poll() is None and len(_tiles(cache)) < target and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"attempt {attempt}: the kernel finished before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        tiles = _tiles(cache)
        assert all(tiles[p] == stamp for p, stamp in kept.items()), "a finished tile was rewritten"
        assert len(tiles) > len(kept)
        kept = tiles
        assert not list(cache.rglob(final))
    kernel = _finish(cache, tmp_path / "kernel.npy", engine)
    assert all(_tiles(cache)[p] == stamp for p, stamp in kept.items()), "a finished tile was recomputed"
    assert np.array_equal(kernel, reference, equal_nan=True)
    if engine == "knn":
        assert (~np.isnan(kernel)).sum(axis=1).tolist() == [6] * 16  # 4 nearest + 2 random columns per row


def test_half_written_tile_is_recomputed_not_trusted(reference, tmp_path):
    cache = tmp_path / "cache"
    _finish(cache, tmp_path / "first.npy")
    (kernel_file,) = cache.rglob("kernel.npy")
    kernel_file.unlink()
    victim = sorted(_tiles(cache))[5]
    victim.write_bytes(victim.read_bytes()[:-7])  # a crash mid-write
    assert np.array_equal(_finish(cache, tmp_path / "second.npy"), reference)
    assert np.load(victim).shape == (2, 2) or np.load(victim).shape == (2,)


def test_two_runs_sharing_one_cache_at_once(reference, tmp_path):
    cache = tmp_path / "cache"
    procs = [_start(cache, tmp_path / f"k{i}.npy") for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    for i in range(2):
        assert np.array_equal(np.load(tmp_path / f"k{i}.npy"), reference)
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name], "temporary files left behind"


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_cached_kernel_of_the_wrong_shape_or_dtype_is_an_error_naming_it(reference, tmp_path, bad):
    cache = tmp_path / "cache"
    _finish(cache, tmp_path / "first.npy")
    (kernel_file,) = cache.rglob("kernel.npy")
    wrong = np.zeros((3, 3), np.float32) if bad == "shape" else reference.astype(np.float64)
    np.save(kernel_file, wrong)
    proc = _start(cache, tmp_path / "second.npy")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert str(kernel_file) in err and bad in err
    assert np.load(kernel_file).dtype == wrong.dtype  # left as found, for the user to inspect
