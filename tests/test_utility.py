"""The DELIFT utility kernel: exactness of the fast engine, orientation, the d formula, caching,
resuming, truncation and bad input (the approximate engines: test_approximate.py).

Numbers are checked on the real offline SmolLM2 (utilities ~0.01-0.5); the tiny random model
(utilities ~1e-6) only carries plumbing tests.
"""

from __future__ import annotations

import copy
import math
import os

import lightning as L
import numpy as np
import pytest
import torch

from delift.errors import DeliftInputError
from delift.records import make_record
from delift.utility import UtilityTemplate, compute_kernel, normalize_kernel
from delift.utility import kernel as kernel_module
from delift.utility.engine import FORCE_GQA, BlockCache, shared_heads
from delift.utility.formatting import UtilityInputs

# One xdist worker takes the whole module (make test: --dist loadgroup): its module fixture is computed once.
pytestmark = pytest.mark.xdist_group("test_utility")

ANSWER = "The secret code word is quartz-falcon."
# Row 1's demonstration carries row 0's answer under another question: the orientation check.
RECORDS = [
    make_record("code", "Answer the question.", "What is the secret code word?", ANSWER),
    make_record("briefing", "Repeat the code word from the briefing.", "", ANSWER),
    make_record("capital", "Answer the question.", "What is the capital of France?", "Paris"),
    make_record("sky", "Explain briefly.", "Why is the sky blue?",
                "Air scatters blue sunlight much more than red sunlight."),
]


@pytest.fixture(scope="module")
def exact_kernels(smollm2):
    naive = compute_kernel(smollm2.model, smollm2.tokenizer, RECORDS, engine="naive", progress=False)
    fast = compute_kernel(smollm2.model, smollm2.tokenizer, RECORDS, engine="fast", tile_size=3, progress=False)
    return naive, fast


def test_fast_engine_equals_naive_oracle(exact_kernels, smollm2):
    naive, fast = exact_kernels
    # "code" and "capital" open with the same instruction: the fast engine shares those tokens too.
    inputs = UtilityInputs(smollm2.tokenizer, RECORDS, RECORDS, UtilityTemplate(), 1024)
    assert [members for _, members in shared_heads(inputs.query)] == [[0, 2]]
    assert naive.shape == fast.shape == (4, 4) and fast.dtype == np.float32
    assert np.abs(naive).max() > 0.05  # real utilities, not ~0 from a random model
    assert np.abs(fast - naive).max() <= 1e-5
    assert FORCE_GQA not in os.environ  # the fast engine's CPU attention switch does not leak out


def test_demonstration_with_the_answer_helps_its_row(exact_kernels):
    _, fast = exact_kernels
    # Row "code" is helped most by the "briefing" demonstration, whose response is its answer.
    assert fast[0, 1] > 0.05
    assert fast[0, 1] > fast[0, 2] and fast[0, 1] > fast[0, 3]
    # ...and each record as its own demonstration helps itself.
    assert all(fast[i, i] == fast[i].max() for i in (2, 3))


def _direct_distance(model, tokenizer, prompt: str, response: str) -> float:
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    prompt_ids, targets = encode(prompt) + [eos], encode(response) + [eos]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + targets])).logits[0].double()
    probabilities = torch.softmax(logits, dim=-1)
    p = torch.stack([probabilities[len(prompt_ids) - 1 + t, token] for t, token in enumerate(targets)])
    return float(torch.linalg.vector_norm(p - 1) / math.sqrt(len(targets)))


def test_utility_matches_a_direct_computation_of_d(exact_kernels, smollm2):
    _, fast = exact_kernels
    row, col = RECORDS[2], RECORDS[0]
    prompt = lambda r: f"Instruction: {r['instruction']}\nInput: {r['input']}\n"  # noqa: E731
    zero_shot = f"Instruction: Please generate a response to the following query.\n\n\nQuery: {prompt(row)}\n"
    one_shot = ("Instruction:\nUse the following example as a guide to answer the query in the same format and "
                "style, providing a clear and concise response.\n\n\nExample:\n"
                f"{prompt(col)}\n {col['output']}\n\n\nQuery:\n{prompt(row)}\n")
    expected = (_direct_distance(smollm2.model, smollm2.tokenizer, zero_shot, " " + row["output"])
                - _direct_distance(smollm2.model, smollm2.tokenizer, one_shot, " " + row["output"]))
    assert fast[2, 0] == pytest.approx(expected, abs=1e-5)


def test_boundary_merges_fall_back_to_whole_string_tokens(smollm2):
    # Queries starting with blank lines merge with the block's closing "\n" under SmolLM2's BPE.
    template = {"prompt": "{input}\n", "one_shot": "Example:\n{prompt_j}{response_j}\nQuery:\n{prompt_i}"}
    records = [make_record("plain", "", "Capital of France?", "Paris"),
               make_record("newlines", "", "\n\nCapital of Italy?", "Rome"),
               make_record("spaced", "", "\n\n  Capital of Spain?", "Madrid")]
    inputs = UtilityInputs(smollm2.tokenizer, records, records, UtilityTemplate.from_config(template), 256)
    safe = inputs.boundary_safe(range(3), range(3))
    assert safe[0].all() and not safe[1:].any()
    whole = inputs.one_shot_sequences([(1, 0)])[0].context[:-1]
    assert whole != inputs.demo[0] + inputs.query[1]  # the parts really would have been wrong
    naive = compute_kernel(smollm2.model, smollm2.tokenizer, records, template=template, engine="naive",
                           progress=False)
    fast = compute_kernel(smollm2.model, smollm2.tokenizer, records, template=template, progress=False)
    assert np.abs(naive).max() > 0.01
    assert np.abs(fast - naive).max() <= 1e-5


class StopAfter(L.Callback):
    """Simulates a killed run: raises after `tiles` finished tiles; counts the tiles it saw."""

    def __init__(self, tiles: int | None = None):
        self.tiles, self.seen = tiles, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen += 1
        if self.seen == self.tiles:
            raise RuntimeError("killed")


def _tiny_kernel(tiny, records, cache_dir, **options):
    return compute_kernel(tiny.model, tiny.tokenizer, records, cache_dir=cache_dir, tile_size=2, progress=False,
                          model_identity=tiny.identity, **options)


def test_killed_run_resumes_from_its_tiles_bitwise(tiny_qwen2, tmp_path):
    reference = _tiny_kernel(tiny_qwen2, RECORDS, tmp_path / "uninterrupted")
    with pytest.raises(RuntimeError, match="killed"):
        _tiny_kernel(tiny_qwen2, RECORDS, tmp_path / "run", trainer_options={"callbacks": [StopAfter(3)]})
    (folder,) = (tmp_path / "run" / "utility_kernel").iterdir()
    finished = {p.name: p.stat().st_mtime_ns for p in folder.glob("*_r*.npy")}
    assert len(finished) == 3 and not (folder / "kernel.npy").exists()  # 2 zero-shot + 4 one-shot tiles planned

    counter = StopAfter()
    resumed = _tiny_kernel(tiny_qwen2, RECORDS, tmp_path / "run", trainer_options={"callbacks": [counter]})
    assert counter.seen == 3  # only the missing tiles ran
    assert all((folder / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    assert np.array_equal(resumed, reference)


def test_unreadable_tile_is_recomputed_and_kernel_reused(tiny_qwen2, tmp_path, monkeypatch):
    first = _tiny_kernel(tiny_qwen2, RECORDS, tmp_path)
    (folder,) = (tmp_path / "utility_kernel").iterdir()
    assert (folder / "key.json").exists() and len(list(folder.glob("*_r*.npy"))) == 6
    tile = sorted(folder.glob("one_shot_*.npy"))[0]
    tile.write_bytes(tile.read_bytes()[:40])  # a torn write
    (folder / "kernel.npy").unlink()
    counter = StopAfter()
    again = _tiny_kernel(tiny_qwen2, RECORDS, tmp_path, trainer_options={"callbacks": [counter]})
    assert counter.seen == 1 and np.array_equal(again, first)

    def no_compute(*args, **kwargs):
        raise AssertionError("the cached kernel should have been returned")

    monkeypatch.setattr(kernel_module, "run_tiles", no_compute)
    assert np.array_equal(_tiny_kernel(tiny_qwen2, RECORDS, tmp_path, engine="naive"), first)  # engine not in key


def test_long_prompts_are_truncated_from_the_left_with_one_warning(tiny_qwen2):
    inputs = UtilityInputs(tiny_qwen2.tokenizer, RECORDS, RECORDS, UtilityTemplate(), max_length=40)
    sequence = inputs.one_shot_sequences([(3, 0)])[0]
    whole = inputs.demo[0] + inputs.query[3]
    assert sequence.targets == inputs.targets[3]  # the scored response is whole
    assert len(sequence.context) + len(sequence.targets) == 40
    assert sequence.context == whole[-(len(sequence.context) - 1):] + [inputs.eos_id]
    tokens = lambda text: len(tiny_qwen2.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    template = UtilityTemplate()
    over = sum(tokens(template.zero_shot_prompt(r)) + len(inputs.targets[i]) + 1 > 40 for i, r in enumerate(RECORDS))
    over += sum(tokens(template.one_shot_prompt(r, c)) + len(inputs.targets[i]) + 1 > 40
                for i, r in enumerate(RECORDS) for c in RECORDS)
    assert 16 < over < 20  # every one-shot pair, and some zero-shot prompts
    with pytest.warns(UserWarning, match=rf"^{over} utility sequence\(s\) exceed kernel.max_length=40") as caught:
        kernel = compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, RECORDS, max_length=40, progress=False)
    assert len([w for w in caught if "max_length" in str(w.message)]) == 1
    assert np.isfinite(kernel).all()
    with pytest.raises(DeliftInputError, match=r"record code, field 'output': the response is 10 tokens.*max_length=8"):
        compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, RECORDS, max_length=8, progress=False)


def test_non_finite_utility_names_the_pair(tiny_qwen2):
    rows = RECORDS[2:]
    cols = [RECORDS[2], make_record("odd", "Answer.", "Say zyzzyva.", "Zyzzyva xylophone")]
    inputs = UtilityInputs(tiny_qwen2.tokenizer, rows, cols, UtilityTemplate(), 1024)
    elsewhere = {t for ids in inputs.zero_shot + inputs.query + inputs.targets + [inputs.demo[0]] for t in ids}
    poison = next(t for t in inputs.demo[1] if t not in elsewhere)
    model = copy.deepcopy(tiny_qwen2.model)
    with torch.no_grad():
        model.get_input_embeddings().weight[poison] = float("nan")
    with pytest.raises(DeliftInputError, match=r"record capital \(row\) x odd \(column\)"):
        compute_kernel(model, tiny_qwen2.tokenizer, rows, cols, progress=False)


def test_bad_input_is_named(tiny_qwen2):
    empty = [RECORDS[0], make_record("blank", "Answer.", "Anything?", "  ")]
    with pytest.raises(DeliftInputError, match=r"record blank, field 'output'"):
        compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, empty, progress=False)
    no_eos = copy.deepcopy(tiny_qwen2.tokenizer)
    no_eos.eos_token = None
    with pytest.raises(DeliftInputError, match="no EOS"):
        compute_kernel(tiny_qwen2.model, no_eos, RECORDS, progress=False)
    no_pad = copy.deepcopy(tiny_qwen2.tokenizer)
    no_pad.pad_token = None
    assert UtilityInputs(no_pad, RECORDS, RECORDS, UtilityTemplate(), 64).pad_id == no_pad.eos_token_id
    with pytest.raises(DeliftInputError, match=r"kernel.template.one_shot"):
        UtilityTemplate.from_config({"one_shot": "Query:\n{prompt_i}\nExample:\n{prompt_j}\n{response_j}"})


def test_normalize_kernel_is_one_global_min_max():
    kernel = np.array([[-0.2, 0.0], [0.3, 0.8]], dtype=np.float32)
    assert np.allclose(normalize_kernel(kernel), [[0.0, 0.2], [0.5, 1.0]])
    assert np.array_equal(normalize_kernel(np.full((2, 3), 0.4)), np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(DeliftInputError, match="must be finite"):
        normalize_kernel(np.array([[np.nan]]))


def test_block_cache_gives_each_batch_its_blocks_right_aligned_after_zeros():
    lengths = [3, 1, 2]
    blocks = [(torch.randn(2, n, 4), torch.randn(2, n, 4)) for n in lengths]
    cached = BlockCache(lengths)
    for b, (keys, values) in enumerate(blocks):
        for layer in range(2):
            cached.store(b, layer, keys + layer, values - layer)
    cache, mask = cached.for_batch([2, 0, 1], room=5)
    assert mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]
    for layer, computed in enumerate(cache.layers):
        assert computed.keys.shape == (3, 2, 3 + 5, 4) and computed.get_seq_length() == 3
        for row, b in enumerate([2, 0, 1]):
            pad = 3 - lengths[b]
            assert torch.equal(computed.keys[row, :, pad:3], blocks[b][0] + layer)
            assert torch.equal(computed.values[row, :, pad:3], blocks[b][1] - layer)
            assert not computed.keys[row, :, :pad].any() and not computed.values[row, :, :pad].any()
    # New tokens land after the blocks, in place, and the stored blocks stay untouched.
    layer = cache.layers[0]
    keys, values = layer.update(torch.ones(3, 2, 2, 4), torch.ones(3, 2, 2, 4))
    assert keys.shape == (3, 2, 5, 4) and bool((keys[:, :, 3:] == 1).all()) and layer.get_seq_length() == 5
    assert torch.equal(cached.for_batch([0], room=0)[0].layers[0].keys[0], blocks[0][0])


def test_the_kernel_key_does_not_depend_on_where_the_tokenizer_was_loaded_from(tiny_qwen2, tmp_path):
    from transformers import AutoTokenizer

    from delift.utility.formatting import tokenizer_identity
    from delift.utility.tiles import kernel_key

    copies = []
    for name in ("cache_a", "cache_b"):
        tiny_qwen2.tokenizer.save_pretrained(tmp_path / name)
        copies.append(AutoTokenizer.from_pretrained(tmp_path / name))
    assert copies[0].name_or_path != copies[1].name_or_path
    assert tokenizer_identity(copies[0]) == tokenizer_identity(copies[1])
    records = [make_record("a", "Say yes.", "", "Yes.")]
    keys = [kernel_key(model=tiny_qwen2.model, tokenizer=t, rows=records, cols=records, template=UtilityTemplate(),
                       max_length=64, model_identity={"name": "tiny"})[0] for t in copies]
    assert keys[0] == keys[1]
    # A different vocabulary is a different tokenizer, whatever its name.
    copies[1].add_tokens(["<extra_token>"])
    assert tokenizer_identity(copies[0])["vocab"] != tokenizer_identity(copies[1])["vocab"]
