"""SelectIT: token/sentence/model-level formulas on hand-computed numbers, score token ids, prompt layouts,
4-bit parameter counts, batching, caching."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from delift.errors import DeliftInputError
from delift.generation import score_token_ids
from delift.records import make_record
from delift.selectors import SELECTORS, SelectionContext, selectit
from delift.selectors.selectit import (
    SelectITSelector,
    model_level_scores,
    model_size,
    rating_sequences,
    score_token_log_probs,
    sentence_level_scores,
    token_level_scores,
)
from delift.selectors.selectit_prompts import LAYOUTS, RATING_PROMPTS
from tests.helpers import CONF_DIR


def test_token_level_score_matches_hand_computed_values():
    # Full-vocabulary probabilities of "1".."5" (sum 0.2), as the model gives them.
    # Renormalised: .1 .2 .4 .2 .1; exp: 1.1051709 1.2214028 1.4918247 1.2214028 1.1051709 (sum 6.1449721);
    # renormalised again: .1798496 .1987646 .2427716 .1987646 .1798496; s = 3;
    # gaps to .2427716 sum to 5 * .2427716 - 1 = .2138580; / 4 = .0534645; * 3 = .1603935.
    assert token_level_scores(np.array([0.02, 0.04, 0.08, 0.04, 0.02])) == pytest.approx(0.1603935, abs=1e-7)
    probs = np.array([
        [0.0, 0.0, 0.0, 0.0, 1.0],      # certain 5: exp 1 1 1 1 e -> e / (4 + e) = .4046097 -> 5 * .2557621
        [0.2, 0.2, 0.2, 0.2, 0.2],      # no preference -> 0
        [0.1, 0.2, 0.4, 0.2, 0.1],      # the case above, already renormalised
    ])
    np.testing.assert_allclose(token_level_scores(probs), [1.2788105, 0.0, 0.1603935], atol=1e-7)


def test_the_exp_step_reorders_examples_against_renormalising_alone():
    # Without the exp step (the old formula) the score is s * (5 p_s - 1) / 4:
    # a = "5" with .7 -> 5 * 2.5 / 4 = 3.125 beats b = a certain "3" -> 3 * 4 / 4 = 3.
    # With it, a: exp 1.3498588 1 1 1 2.0137527 (sum 6.3636115) -> p_5 = .3164481 -> 5 * .5822404 / 4 = .7278006;
    # b: exp 1 1 e 1 1 (sum 6.7182818) -> p_3 = .4046097 -> 3 * 1.0230484 / 4 = .7672862: b now beats a.
    a, b = token_level_scores(np.array([[0.3, 0.0, 0.0, 0.0, 0.7], [0.0, 0.0, 1.0, 0.0, 0.0]]))
    assert a == pytest.approx(0.7278006, abs=1e-7) and b == pytest.approx(0.7672862, abs=1e-7)
    assert b > a


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


def test_original_layout_is_the_published_plain_text(tiny_qwen2, toy_records):
    tokenizer = tiny_qwen2.tokenizer
    sequence = rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=1024)[0]
    # The original: prompt line (with its newline) + "\n" + "Instruction:" + ins + "\n" + "Response:" + res
    # + "\nThe answer is: \n", tokenized whole.
    text = ("Rate it.\n\nInstruction:Answer the question.\nWhat is the capital of France?\nResponse:Paris"
            "\nThe answer is: \n")
    assert sequence == tokenizer.encode(text, add_special_tokens=True)
    assert tokenizer.decode(sequence) == text


def test_rating_sequence_ends_at_the_score_question_even_when_truncated(tiny_qwen2, toy_records):
    tokenizer = tiny_qwen2.tokenizer
    ours = {"layout": LAYOUTS["delift"], "use_chat_template": True}
    full = rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=1024, **ours)[0]
    text = tokenizer.decode(full)
    assert "Response: Paris" in text and text.endswith("Score (1-5):<|im_end|>\n<|im_start|>assistant\n")
    short = rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=len(full) - 5, **ours)[0]
    # An over-long record loses the start of its prompt, as under every selector: the response stays whole.
    assert len(full) - 10 <= len(short) <= len(full) - 5 and short[:3] == full[:3]
    assert "Answer the question." not in tokenizer.decode(short)
    assert "Instruction: What is the capital of France?\nResponse: Paris" in tokenizer.decode(short)
    assert tokenizer.decode(short).endswith("Paris\n\nScore (1-5):<|im_end|>\n<|im_start|>assistant\n")
    plain = tokenizer.decode(rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=1024,
                                              layout=LAYOUTS["delift"])[0])
    assert plain.endswith("Score (1-5):\n") and "<|im_start|>" not in plain
    original = rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=1024)[0]
    cut = rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=len(original) - 3)[0]
    assert len(cut) <= len(original) - 3 and tokenizer.decode(cut).endswith("\nResponse:Paris\nThe answer is: \n")
    with pytest.raises(DeliftInputError, match="selector.max_length"):
        rating_sequences(tokenizer, toy_records[:1], ["Rate it."], max_length=4)


def test_prompt_sets_and_layouts_by_name():
    assert SelectITSelector().rating_prompts == list(RATING_PROMPTS["original"])
    assert SelectITSelector().rating_prompts[3].startswith("Evaluate the assistants by the correctness")
    ours = SelectITSelector(rating_prompts="delift", layout="delift")
    assert ours.rating_prompts == list(RATING_PROMPTS["delift"]) and ours.config()["layout"] == "delift"
    with pytest.raises(DeliftInputError, match="selector.rating_prompts"):
        SelectITSelector(rating_prompts="paper")
    with pytest.raises(DeliftInputError, match="selector.rating_prompts"):
        SelectITSelector(rating_prompts=[])
    with pytest.raises(DeliftInputError, match="selector.layout"):
        SelectITSelector(layout="chatml")


class _Packed4bit(torch.nn.Parameter):
    """Stands in for bitsandbytes' quantized Params4bit: two 4-bit values per uint8, the original
    shape kept in `quant_state.shape`."""

    def __new__(cls, weight: torch.Tensor):
        packed = torch.zeros((weight.numel() + 1) // 2, 1, dtype=torch.uint8)
        param = torch.Tensor._make_subclass(cls, packed, False)
        param.quant_state = SimpleNamespace(shape=weight.shape)
        return param


def test_model_size_counts_packed_4bit_weights_unpacked():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 4), torch.nn.Linear(4, 3))
    configured = 10 * 6 + (6 * 4 + 4) + (4 * 3 + 3)
    assert model_size(model) == configured
    model[1].weight = _Packed4bit(model[1].weight.detach())
    assert sum(p.numel() for p in model.parameters()) == configured - 6 * 4 // 2  # what numel() sees
    assert model_size(model) == configured


def test_batched_rating_equals_one_at_a_time(tiny_qwen2, toy_records):
    sequences = rating_sequences(tiny_qwen2.tokenizer, toy_records, ["Rate it.", "Give a score, please!"],
                                 max_length=1024, layout=LAYOUTS["delift"], use_chat_template=True)
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
    """Both prompt sets and layouts work on a real instruction model: much of its next-token mass is on 1-5."""
    records = [make_record("q", "Answer the question.", "What is the capital of France?", "Paris")]
    for name, chat in (("original", False), ("delift", True)):
        sequences = rating_sequences(smollm2.tokenizer, records, RATING_PROMPTS[name], max_length=1024,
                                     layout=LAYOUTS[name], use_chat_template=chat)
        mass = np.exp(score_token_log_probs(smollm2, sequences, progress=False)).sum(axis=1)
        assert (mass > 0.1).all(), (name, mass)


def test_config_file_instantiates_the_selector():
    selector = instantiate(OmegaConf.load(Path(CONF_DIR) / "selector" / "selectit.yaml"))
    assert isinstance(selector, SelectITSelector)
    assert selector.fraction == 0.3 and selector.alpha == 0.2 and selector.use_chat_template is False
    assert selector.rating_prompts == list(RATING_PROMPTS["original"]) and selector.layout == "original"
