"""On-disk caches for expensive results: content-hash keys, atomic writes, no pickle.

Every cached artefact lives at `<cache_dir>/<kind>/<key>/...` where `key` is a SHA-256 over a
canonical JSON of everything that determines it. Files are written to a temporary name in the
same folder and renamed into place, so a crash never leaves a half-written file under the final
name; they get the usual permissions (the umask's), like any file the run writes. Arrays are `.npy`
(memory-mappable, loaded with allow_pickle=False).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from filelock import FileLock

from delift.errors import DeliftInputError


def content_hash(*parts) -> str:
    """SHA-256 of the canonical JSON of `parts` (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def records_hash(records) -> str:
    return content_hash([[r["id"], r["instruction"], r["input"], r["output"]] for r in records])


def default_cache_dir() -> Path:
    """$DELIFT_CACHE_DIR, else ~/.cache/delift: conf/paths' default, for scripts run outside Hydra."""
    return Path(os.environ.get("DELIFT_CACHE_DIR", Path.home() / ".cache" / "delift")).expanduser()


def cache_folder(cache_dir, kind: str, key: str) -> Path:
    folder = Path(cache_dir).expanduser() / kind / key  # paths.cache_dir=~/... is the user's home, not ./~
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def temp_path(folder: Path, prefix: str, suffix: str, *, directory: bool = False) -> Path:
    """A new, empty file (or folder) with a unique name in `folder`, created with the usual permissions
    (0666 / 0777 less the umask, as `open` and `mkdir` give), not tempfile's owner-only 0600 / 0700: once
    renamed into place it is an output others may read."""
    for _ in range(100):
        path = Path(folder) / f"{prefix}{uuid.uuid4().hex[:12]}{suffix}"
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


@contextmanager
def _atomic_path(path: Path, suffix: str):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path.parent, f".{path.name}.", f".tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class UnreadableCacheFile(DeliftInputError):
    """A truncated or unreadable cache file (a crash mid-write elsewhere): recompute it."""


def save_npy(path, array: np.ndarray) -> None:
    with _atomic_path(Path(path), ".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())


def load_npy(path, *, shape=None, dtype=None, mmap: bool = False) -> np.ndarray:
    """Load a cached array.

    A truncated or unreadable file raises UnreadableCacheFile (callers recompute it); a readable
    one of the wrong shape or dtype was not written by this code for this key, so it is an error.
    """
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise UnreadableCacheFile(f"unreadable or truncated array ({err})", file=path) from err
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise DeliftInputError(f"has shape {tuple(array.shape)}, expected {tuple(shape)}; this cache entry is not "
                               "ours: delete it to recompute", file=path)
    if dtype is not None and array.dtype != np.dtype(dtype):
        raise DeliftInputError(f"has dtype {array.dtype}, expected {np.dtype(dtype)}; this cache entry is not "
                               "ours: delete it to recompute", file=path)
    return array


def save_safetensors(path, tensors: dict) -> None:
    from safetensors.torch import save_file  # imports torch: only for the callers that save tensors

    with _atomic_path(Path(path), ".safetensors") as tmp:
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, str(tmp))


def load_safetensors(path) -> dict:
    """Tensors saved by `save_safetensors`; a truncated or unreadable file raises UnreadableCacheFile."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UnreadableCacheFile(f"unreadable or truncated tensors ({err})", file=path) from err


def save_json(path, obj) -> None:
    with _atomic_path(Path(path), ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")


def save_jsonl(path, rows) -> None:
    with _atomic_path(Path(path), ".jsonl") as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def file_lock(path) -> FileLock:
    """An inter-process lock beside `path`, for work two runs sharing a cache could both start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def cached_array(path, compute, *, shape=None, dtype=None) -> np.ndarray:
    """Return the array at `path`, computing and saving it first if absent or invalid."""
    path = Path(path)
    with file_lock(path):
        if path.exists():
            try:
                return load_npy(path, shape=shape, dtype=dtype)
            except UnreadableCacheFile:
                path.unlink()  # a half-written entry is recomputed, never trusted
        array = compute()
        save_npy(path, array)
        return array
