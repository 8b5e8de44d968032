"""Rotary embeddings whose factors depend on the pass's length (Phi-3's LongRoPE): the fast engine and
batching must give what one pass per sequence gives."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from delift.errors import DeliftInputError
from delift.records import make_record
from delift.utility import UtilityTemplate, compute_kernel, engine
from delift.utility.formatting import UtilityInputs

# One xdist worker takes the whole module (make test: --dist loadgroup): its module fixture is computed once.
pytestmark = pytest.mark.xdist_group("test_rotary")

RECORDS = [make_record(f"r{i}", "Answer.", "Why? " * (1 + 5 * (i % 3)), "Because " * (1 + 4 * (i % 2)) + "so.")
           for i in range(6)]


def tiny_llama(tokenizer, rope_parameters):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=20,
                         rope_parameters=rope_parameters, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def longrope(smollm2_spec):
    """SmolLM2 given Phi-3's LongRoPE (short factors 1: its own rotary embedding below the limit; long
    factors 4 past it), with the limit in the middle of the one-shot lengths. The real model, since a
    random one predicts nearly uniformly and its utilities are all ~0."""
    loaded = smollm2_spec.load()
    model, tokenizer = loaded.model, loaded.tokenizer
    lengths = UtilityInputs(tokenizer, RECORDS, RECORDS, UtilityTemplate(), 1024).pair_lengths(range(6), range(6))
    limit = int(np.median(lengths))
    assert (lengths <= limit).any() and (lengths > limit).any()
    half_head = model.config.head_dim // 2
    model.config.rope_parameters = {"rope_type": "longrope", "rope_theta": model.config.rope_parameters["rope_theta"],
                                    "short_factor": [1.0] * half_head, "long_factor": [4.0] * half_head,
                                    "original_max_position_embeddings": limit}
    model.config.original_max_position_embeddings = limit
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)
    return model, tokenizer, limit


def kernel(model, tokenizer, engine_name, batch_size=4):
    return compute_kernel(model, tokenizer, RECORDS, engine=engine_name, batch_size=batch_size, tile_size=3,
                          progress=False)


def test_the_limit_is_read_from_the_config(longrope, tiny_qwen2):
    model, _, limit = longrope
    assert engine.rotary_scaling_limit(model) == (limit, "longrope")
    assert engine.rotary_scaling_limit(tiny_qwen2.model) is None


@pytest.mark.slow
def test_fast_equals_one_pass_per_sequence_across_the_longrope_limit(longrope, monkeypatch):
    model, tokenizer, _ = longrope
    one_pass_each = kernel(model, tokenizer, "naive", batch_size=1)
    np.testing.assert_allclose(kernel(model, tokenizer, "naive"), one_pass_each, atol=1e-5)
    np.testing.assert_allclose(kernel(model, tokenizer, "fast"), one_pass_each, atol=1e-5)
    assert np.abs(one_pass_each).max() > 0.05
    # Without the rule (cached short blocks joined by long queries, mixed batches) the numbers move.
    monkeypatch.setattr(engine, "rotary_scaling_limit", lambda model: None)
    assert np.abs(kernel(model, tokenizer, "fast") - one_pass_each).max() > 1e-2


def test_dynamic_scaling_past_its_length_is_refused(tiny_qwen2):
    model = tiny_llama(tiny_qwen2.tokenizer, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(DeliftInputError, match="dynamic rotary scaling") as err:
        kernel(model, tiny_qwen2.tokenizer, "fast")
    assert err.value.field == "kernel.max_length"
