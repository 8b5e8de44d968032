"""SelectIT: token/sentence/model-level formulas on hand-computed numbers, score token ids, batching, caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from delift.errors import DeliftInputError
from delift.records import make_record
from delift.selectors import SELECTORS, SelectionContext, selectit
from delift.selectors.selectit import (
    SelectITSelector,
    model_level_scores,
    rating_sequences,
    score_token_ids,
    score_token_log_probs,
    sentence_level_scores,
    token_level_scores,
)


def test_token_level_score_matches_hand_computed_values():
    probs = np.array([
        [0.1, 0.2, 0.4, 0.2, 0.1],      # s = 3, gaps .3 .2 0 .2 .3 -> 3 * 1.0 / 4
        [1.0, 2.0, 4.0, 2.0, 1.0],      # same after renormalising
        [0.05, 0.05, 0.1, 0.3, 0.5],    # s = 5, gaps .45 .45 .4 .2 0 -> 5 * 1.5 / 4
        [0.0, 0.0, 0.0, 0.0, 1.0],      # certain 5 -> 5
        [0.2, 0.2, 0.2, 0.2, 0.2],      # no preference -> 0
    ])
    np.testing.assert_allclose(token_level_scores(probs), [0.75, 0.75, 1.875, 5.0, 0.0], atol=1e-12)


def test_sentence_and_model_level_combination():
    # mean 2, population std 1 -> 2 / (1 + 0.2 * 1)
    np.testing.assert_allclose(sentence_level_scores(np.array([[1.0, 3.0], [2.0, 2.0]]), alpha=0.2), [2 / 1.2, 2.0])
    # sizes 1 and 3 -> weights 0.25 and 0.75
    np.testing.assert_allclose(model_level_scores([np.array([1.0, 2.0]), np.array([4.0, 8.0])], [1, 3]), [3.25, 6.5])
    with pytest.raises(DeliftInputError, match="selector.models"):
        model_level_scores([np.array([1.0])], [0])


class _FakeTokenizer:
    """Maps each digit to a fixed id list; `marker` decodes to nothing (a SentencePiece word start)."""

    marker = 29871

    def __init__(self, pieces: dict[str, list[int]]):
        self.pieces = pieces
        self.text = {ids[-1]: digit for digit, ids in pieces.items()}

    def encode(self, text, add_special_tokens=False):
        return list(self.pieces[text])

    def decode(self, ids):
        return "".join("" if i == self.marker else self.text.get(i, "??") for i in ids)


def test_score_token_ids_come_from_the_tokenizer(tiny_qwen2):
    tokenizer = tiny_qwen2.tokenizer
    ids = score_token_ids(tokenizer)
    assert [tokenizer.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    assert ids == [tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    # A word-start marker before the digit is dropped; a digit split into two real tokens is refused.
    sentencepiece = _FakeTokenizer({d: [29871, 29895 + int(d)] for d in "12345"})
    assert score_token_ids(sentencepiece) == [29896, 29897, 29898, 29899, 29900]
    split = _FakeTokenizer({d: [100 + int(d)] for d in "1234"} | {"5": [7, 105]})
    with pytest.raises(DeliftInputError, match="'5' is not a single token"):
        score_token_ids(split)


def test_rating_sequence_ends_at_the_score_question_even_when_truncated(tiny_qwen2, toy_records):
    tokenizer = tiny_qwen2.tokenizer
    full = rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=1024)[0]
    text = tokenizer.decode(full)
    assert "Response: Paris" in text and text.endswith("Score (1-5):<|im_end|>\n<|im_start|>assistant\n")
    short = rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=len(full) - 5)[0]
    assert len(short) == len(full) - 5 and short[:20] == full[:20]
    assert tokenizer.decode(short).endswith("Paris\n\nScore (1-5):<|im_end|>\n<|im_start|>assistant\n") is False
    assert tokenizer.decode(short).endswith("Score (1-5):<|im_end|>\n<|im_start|>assistant\n")
    plain = tokenizer.decode(rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=1024,
                                              use_chat_template=False)[0])
    assert plain.endswith("Score (1-5):\n") and "<|im_start|>" not in plain


def test_batched_rating_equals_one_at_a_time(tiny_qwen2, toy_records):
    sequences = rating_sequences(tiny_qwen2.tokenizer, toy_records, ["Rate it.", "Give a score, please!"],
                                 max_length=1024)
    batched = score_token_log_probs(tiny_qwen2, sequences, batch_size=5, progress=False)
    single = score_token_log_probs(tiny_qwen2, sequences, batch_size=1, progress=False)
    assert len({len(s) for s in sequences}) > 1  # padding is really exercised
    np.testing.assert_allclose(batched, single, atol=1e-5)


class _ConstructedSelectIT(SelectITSelector):
    """Log-probabilities given per record: record i rates 5 with confidence growing with `confidence[i]`."""

    def __init__(self, confidence, **kwargs):
        super().__init__(**kwargs)
        self.confidence = confidence

    def rating_log_probs(self, loaded, records, ctx):
        out = np.zeros((len(records), len(self.rating_prompts), 5), dtype=np.float32)
        out[:, :, 4] = np.asarray(self.confidence, dtype=np.float32)[:, None]
        return out


def test_keeps_the_top_fraction_ties_by_index(tiny_qwen2, toy_records):
    # Confidence 0 -> uniform -> score 0; higher confidence -> higher score. Records 1 and 4 tie.
    selector = _ConstructedSelectIT([0.0, 3.0, 1.0, 0.5, 3.0, 2.0], fraction=0.5)
    ctx = SelectionContext(stage="instruction", pool=toy_records, loader=lambda: tiny_qwen2, progress=False)
    selection = selector.select(ctx)
    assert selection.indices == [1, 4, 5]
    assert selection.scores[0] == selection.scores[1] > selection.scores[2] > 0


def test_end_to_end_on_tiny_model_with_cache_and_model_level(tiny_qwen2, toy_records, tmp_path, monkeypatch):
    assert SELECTORS["selectit"] is SelectITSelector
    prompts = ["Rate it from 1 to 5.", "Score this answer (1-5)."]
    ctx = SelectionContext(stage="instruction", pool=toy_records, loader=lambda: tiny_qwen2, progress=False,
                           cache_dir=str(tmp_path))
    selection = SelectITSelector(fraction=0.3, rating_prompts=prompts).select(ctx)
    scores = np.array(selection.info["all_scores"])
    assert len(selection.indices) == 2
    assert selection.indices == [int(i) for i in np.lexsort((np.arange(6), -scores))[:2]]
    assert len(list(tmp_path.glob("selectit/*/score_log_probs.npy"))) == 1

    # Second run: served from the cache, the model is never run.
    monkeypatch.setattr(selectit, "score_token_log_probs", lambda *a, **k: pytest.fail("cache not used"))
    again = SelectITSelector(fraction=0.3, rating_prompts=prompts).select(ctx)
    assert again.indices == selection.indices

    # Model level: the same model twice (weights 1/2, 1/2) gives the single-model scores back.
    class SameModel:
        def load(self, device=None):
            return tiny_qwen2

    both = SelectITSelector(fraction=0.3, rating_prompts=prompts, extra_models=[SameModel()]).select(ctx)
    np.testing.assert_allclose(both.info["all_scores"], scores)
    assert both.info["model_sizes"][0] == both.info["model_sizes"][1] > 1e6


@pytest.mark.slow
def test_real_model_puts_probability_on_the_score_tokens(smollm2):
    """The prompt layout works on a real instruction model: its next token is mostly a digit 1-5."""
    records = [make_record("q", "Answer the question.", "What is the capital of France?", "Paris")]
    sequences = rating_sequences(smollm2.tokenizer, records, selectit.DEFAULT_RATING_PROMPTS, max_length=1024)
    mass = np.exp(score_token_log_probs(smollm2, sequences, progress=False)).sum(axis=1)
    assert (mass > 0.1).all(), mass


def test_config_file_instantiates_the_selector():
    selector = instantiate(OmegaConf.load(Path(__file__).parents[1] / "conf" / "selector" / "selectit.yaml"))
    assert isinstance(selector, SelectITSelector)
    assert selector.fraction == 0.3 and selector.alpha == 0.2 and len(selector.rating_prompts) == 5
