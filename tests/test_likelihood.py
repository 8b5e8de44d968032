"""Likelihood metrics: ref_loss and option log-likelihood against hand computations, on real models."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from delift.data.hub import choice_record
from delift.evaluation import evaluate, record_likelihoods
from delift.generation import continuation_log_probs
from delift.metrics import option_continuations
from delift.prompts import format_prompt, response_token_ids


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _hand_log_probs(model, prompt_ids, continuation_ids):
    """log p of each continuation token from one unpadded forward pass of prompt + continuation."""
    ids = torch.tensor([prompt_ids + continuation_ids])
    log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    start = len(prompt_ids) - 1  # position t predicts token t + 1
    return np.array([log_probs[start + t, token].item() for t, token in enumerate(continuation_ids)])


def _hand_ref_loss(model, tokenizer, prompt, record):
    return -_hand_log_probs(model, _encode(tokenizer, prompt), response_token_ids(tokenizer, record)).mean()


class UnitEmbedder:
    def encode(self, texts):
        return np.ones((len(texts), 2), dtype=np.float32) / np.sqrt(2)


def test_continuations_of_different_lengths_batched_as_one_pass_each(tiny_qwen2):
    model, tokenizer = tiny_qwen2.model, tiny_qwen2.tokenizer
    prompts = [_encode(tokenizer, text) for text in ("Hi", "A much longer prompt than the first one, padded",
                                                     "Middle length prompt")]
    continuations = [_encode(tokenizer, text) for text in (" there, friend", " x", " and a longer continuation")]
    batched = continuation_log_probs(model, tokenizer, prompts, continuations, batch_size=3, progress=False)
    for prompt, continuation, got in zip(prompts, continuations, batched):
        assert got.shape == (len(continuation),)
        np.testing.assert_allclose(got, _hand_log_probs(model, prompt, continuation), atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "phi3", "qwen2+lora"])
def test_continuations_sharing_a_prompt_equal_whole_sequence_scores(smollm2_spec, arch):
    """Prompts of several lengths with 1-4 continuations each (one-token ones too): one prompt pass per
    prompt, its cache reused across chunks of continuations, and the scores of single whole sequences."""
    from peft import LoraConfig, get_peft_model

    from delift.models import TinyRandomModel

    from tests.conftest import TINY_CONFIG

    loaded = TinyRandomModel(name=f"tiny-{arch}", arch=arch.split("+")[0], tokenizer_source=smollm2_spec,
                             config=TINY_CONFIG).load()
    model, tokenizer = loaded.model, loaded.tokenizer
    if arch.endswith("+lora"):
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    texts = {"Question one: which?": [" A", " B. a longer option", " C", " D. the last"],
             "Q2": [" yes, certainly so", " no"],
             "A third, rather longer prompt that needs padding in its batch": [" x y z", " w"]}
    prompts, continuations = [], []
    for prompt, options in texts.items():
        for option in options:
            prompts.append(_encode(tokenizer, prompt))
            continuations.append(_encode(tokenizer, option))
    assert min(map(len, continuations)) == 1
    got = continuation_log_probs(model, tokenizer, prompts, continuations, batch_size=2, progress=False)
    for prompt, continuation, scores in zip(prompts, continuations, got):
        np.testing.assert_allclose(scores, _hand_log_probs(model, prompt, continuation), atol=1e-4)


def test_ref_loss_equals_hand_computation(tiny_qwen2, toy_records):
    model, tokenizer = tiny_qwen2.model, tiny_qwen2.tokenizer
    prompts = [format_prompt(tokenizer, rec) for rec in toy_records]
    metrics, rows = record_likelihoods(model, tokenizer, toy_records, prompts, option_ll=False, batch_size=4,
                                       progress=False)
    expected = [_hand_ref_loss(model, tokenizer, prompt, rec) for prompt, rec in zip(prompts, toy_records)]
    assert [row["ref_loss"] for row in rows] == pytest.approx(expected, abs=1e-4)
    assert metrics == {"ref_loss": pytest.approx(np.mean(expected), abs=1e-4)}  # toy records have no options
    assert all(loss > 0 for loss in expected)


def test_icl_rows_carry_the_loss_of_their_own_prompt(tiny_qwen2, toy_records):
    """In ICL mode the reference is scored after the demonstrations, as the prediction was generated."""
    model, tokenizer = tiny_qwen2.model, tiny_qwen2.tokenizer
    queries, demos = toy_records[:2], [[toy_records[4], toy_records[5]], [toy_records[3]]]
    metrics, rows = evaluate(model, tokenizer, queries, UnitEmbedder(), max_new_tokens=2, progress=False,
                             demonstrations=demos)
    for row, rec, shots in zip(rows, queries, demos):
        assert row["prompt"] == format_prompt(tokenizer, rec, demonstrations=shots)
        assert row["ref_loss"] == pytest.approx(_hand_ref_loss(model, tokenizer, row["prompt"], rec), abs=1e-4)
    assert metrics["ref_loss"] == pytest.approx(np.mean([row["ref_loss"] for row in rows]))
    assert "ll_accuracy" not in metrics and "ll_choice" not in rows[0]


@pytest.mark.parametrize("option_format,normalize", [("letter", "none"), ("text", "char"), ("letter_text", "token")])
def test_option_choice_is_the_argmax_of_hand_computed_scores(tiny_qwen2, option_format, normalize):
    model, tokenizer = tiny_qwen2.model, tiny_qwen2.tokenizer
    options = ["Scurvy", "Vitamin D deficiency", "Anaemia", "Goitre"]
    rec = choice_record("mmlu/rickets", "What causes rickets?", options, 1, source="mmlu", meta={})
    prompt = format_prompt(tokenizer, rec)
    texts = {"letter": list("ABCD"), "text": options,
             "letter_text": [f"{letter}. {text}" for letter, text in zip("ABCD", options)]}[option_format]
    hand = [_hand_log_probs(model, _encode(tokenizer, prompt), _encode(tokenizer, text)) for text in texts]
    scores = [{"none": lp.sum(), "token": lp.mean(), "char": lp.sum() / len(text)}[normalize]
              for lp, text in zip(hand, texts)]
    metrics, rows = record_likelihoods(model, tokenizer, [rec], [prompt], option_format=option_format,
                                       normalize=normalize, progress=False)
    assert rows[0]["ll_choice"] == "ABCD"[int(np.argmax(scores))]
    assert rows[0]["ll_correct"] == (rows[0]["ll_choice"] == "B")
    assert metrics["ll_accuracy"] == float(rows[0]["ll_correct"]) and metrics["n_ll_accuracy"] == 1


class BigramStub(torch.nn.Module):
    """A language model whose likeliest continuation is known: next-token logits are 0 but for +8 on
    the given (previous token, next token) pairs. It needs no context, so its cache stays empty."""

    def __init__(self, vocab_size, pairs):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # parameters() tells the device
        self.vocab_size, self.pairs = vocab_size, pairs

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False,
                cache=None):
        kept = input_ids[:, -logits_to_keep:] if logits_to_keep else input_ids
        logits = torch.zeros(*kept.shape, self.vocab_size)
        for previous, following in self.pairs:
            logits[..., following] += 8.0 * (kept == previous)
        return SimpleNamespace(logits=logits, cache=cache or DynamicCache())


@pytest.mark.parametrize("option_format", ["letter_text", "letter", "text"])
@pytest.mark.parametrize("normalize", ["none", "token", "char"])
def test_option_log_likelihood_picks_the_constructed_right_answer(tiny_qwen2, option_format, normalize):
    """One question, its key C in the first record and A in the second: the model favours C's tokens."""
    tokenizer = tiny_qwen2.tokenizer
    options = ["Banana", "Paris", "Seven", "Blue"]
    records = [choice_record(f"q/{answer}", "Which one?", options, answer, source="t", meta={}) for answer in (2, 0)]
    prompt = format_prompt(tokenizer, records[0])
    assert format_prompt(tokenizer, records[1]) == prompt
    favoured = _encode(tokenizer, prompt)[-1:] + _encode(tokenizer, option_continuations(records[0], option_format)[2])
    model = BigramStub(len(tokenizer), list(zip(favoured, favoured[1:])))
    metrics, rows = record_likelihoods(model, tokenizer, records, [prompt, prompt], ref_loss=False,
                                       option_format=option_format, normalize=normalize, progress=False)
    assert [row["ll_choice"] for row in rows] == ["C", "C"]
    assert [row["ll_correct"] for row in rows] == [True, False]
    assert metrics == {"ll_accuracy": 0.5, "n_ll_accuracy": 2}


def test_results_and_predictions_carry_the_likelihood_scores_in_both_modes(tmp_path):
    """The task stage evaluates on MMLU: every row has ref_loss, ll_choice and ll_correct, in ICL and fine-tuned."""
    import json

    from delift.pipeline import run
    from tests.helpers import compose_config

    cfg = compose_config(["stage=task", "selector=random", "model=tiny_qwen2", "eval.mode=both", "trainer.max_steps=1",
                          "eval.max_new_tokens=2", "logger=csv", "stage.sizes.pool.trivia=20",
                          "stage.sizes.pool.gsm8k=4"], output_dir=tmp_path)
    results = run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    for mode in ("icl", "finetune"):
        metrics, mode_rows = results["metrics_by_mode"][mode], [row for row in rows if row["mode"] == mode]
        assert len(mode_rows) == metrics["n_ll_accuracy"] == 24
        assert metrics["ref_loss"] == pytest.approx(np.mean([row["ref_loss"] for row in mode_rows]))
        assert metrics["ll_accuracy"] == pytest.approx(np.mean([row["ll_correct"] for row in mode_rows]))
        assert all(row["ll_choice"] in "ABCD" and row["ref_loss"] > 0 for row in mode_rows)
    off = compose_config(["stage=task", "selector=initial", "model=tiny_qwen2", "eval.max_new_tokens=2", "logger=csv",
                          "eval.likelihood.ref_loss=false", "eval.likelihood.options=false"],
                         output_dir=tmp_path / "off")
    assert not {"ref_loss", "ll_accuracy"} & set(run(off)["metrics"])
