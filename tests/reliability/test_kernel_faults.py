"""The kernel cache under faults: SIGKILL at chosen points (the exact kernel's tiles and the knn
approximation's sparse tiles), half-written files, two runs at once, entries that are not ours."""

import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from delift.errors import DeliftInputError
from tests.helpers import HANG_GUARD_S
from tests.reliability.kernel_worker import compute

# One xdist worker takes the whole module (make test: --dist loadgroup): its module fixture is computed once.
pytestmark = pytest.mark.xdist_group("test_kernel_faults")

WORKER = Path(__file__).with_name("kernel_worker.py")


def _worker(cache_dir, out, engine="fast", kill_after_tiles=None) -> subprocess.Popen:
    """The worker process (it inherits the test's environment, its cache folder included)."""
    extra = [str(kill_after_tiles)] if kill_after_tiles else []
    return subprocess.Popen([sys.executable, str(WORKER), str(cache_dir), str(out), engine, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _tiles(cache_dir):
    """Finished tiles (hidden temporary files of writes in flight are not tiles)."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for pattern in ("*shot_*.npy", "pairs_*.npy")
            for p in Path(cache_dir).rglob(pattern) if not p.name.startswith(".")}


def _computed_cache(tmp_path_factory, name, engine="fast"):
    """(kernel, the cache folder it was computed into), in this process, from nothing."""
    cache = tmp_path_factory.mktemp(name) / "cache"
    return compute(cache, engine), cache


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _computed_cache(tmp_path_factory, "reference")


@pytest.fixture(scope="module")
def knn_reference(tmp_path_factory):
    return _computed_cache(tmp_path_factory, "knn_reference", "knn")


def _copy_of(cache, tmp_path) -> Path:
    """A copy of a computed cache (its models/ link stays a link)."""
    return Path(shutil.copytree(cache, tmp_path / "cache", symlinks=True))


# Tiles: fast 8 zero-shot + 64 one-shot; knn 16 zero-shot + 16 column spans (16 x 7 listed pairs).
@pytest.mark.parametrize("engine, step, final", [("fast", 12, "kernel.npy"), ("knn", 6, "kernel_data.npy")])
def test_sigkill_at_chosen_points_resumes_to_the_identical_kernel(request, tmp_path, engine, step, final):
    """Three worker processes, each SIGKILLed by a test hook after a seeded number of new tiles, then a run
    that finishes the kernel: no finished tile rewritten or recomputed, the kernel bitwise the reference."""
    reference, _ = request.getfixturevalue("reference" if engine == "fast" else "knn_reference")
    rng = random.Random(0)
    cache = tmp_path / "cache"
    kept = {}
    for attempt in range(3):
        count = rng.randint(3, step)
        proc = _worker(cache, tmp_path / "unused.npy", engine, kill_after_tiles=count)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == -signal.SIGKILL, f"attempt {attempt}: {err[-2000:]}"
        tiles = _tiles(cache)
        assert all(tiles[p] == stamp for p, stamp in kept.items()), "a finished tile was rewritten"
        assert len(tiles) == len(kept) + count, "killed after exactly `count` more finished tiles"
        kept = tiles
        assert not list(cache.rglob(final))
    kernel = compute(cache, engine)
    assert all(_tiles(cache)[p] == stamp for p, stamp in kept.items()), "a finished tile was recomputed"
    assert np.array_equal(kernel, reference, equal_nan=True)
    if engine == "knn":
        assert (~np.isnan(kernel)).sum(axis=1).tolist() == [7] * 16  # itself, 4 nearest others, 2 random columns


def test_half_written_tile_is_recomputed_not_trusted(reference, tmp_path):
    kernel, computed = reference
    cache = _copy_of(computed, tmp_path)
    (kernel_file,) = cache.rglob("kernel.npy")
    kernel_file.unlink()
    victim = sorted(_tiles(cache))[5]
    victim.write_bytes(victim.read_bytes()[:-7])  # a crash mid-write
    others = {p: stamp for p, stamp in _tiles(cache).items() if p != victim}
    assert np.array_equal(compute(cache), kernel)
    assert np.load(victim).shape in ((2, 2), (2,))  # rewritten whole
    assert {p: stamp for p, stamp in _tiles(cache).items() if p != victim} == others  # only the torn one


def test_two_runs_sharing_one_cache_at_once(reference, tmp_path):
    kernel, _ = reference
    cache = tmp_path / "cache"
    procs = [_worker(cache, tmp_path / f"k{i}.npy") for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0, err[-2000:]
    for i in range(2):
        assert np.array_equal(np.load(tmp_path / f"k{i}.npy"), kernel)
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name], "temporary files left behind"


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_cached_kernel_of_the_wrong_shape_or_dtype_is_an_error_naming_it(reference, tmp_path, bad):
    kernel, computed = reference
    cache = _copy_of(computed, tmp_path)
    (kernel_file,) = cache.rglob("kernel.npy")
    wrong = np.zeros((3, 3), np.float32) if bad == "shape" else kernel.astype(np.float64)
    np.save(kernel_file, wrong)
    expected = "has shape (3, 3), expected (16, 16)" if bad == "shape" else "has dtype float64, expected float32"
    with pytest.raises(DeliftInputError) as err:
        compute(cache)
    assert err.value.file == kernel_file
    assert re.fullmatch(rf"file {re.escape(str(kernel_file))}: {re.escape(expected)}; .*delete it to recompute",
                        str(err.value)), str(err.value)
    assert np.load(kernel_file).dtype == wrong.dtype  # left as found, for the user to inspect
