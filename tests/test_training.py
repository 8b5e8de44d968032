import json

import pytest
import torch
from safetensors.torch import load_file

from delift.generation import generate, stop_token_ids
from delift.models import TinyRandomModel
from delift.training import IGNORE_INDEX, collate, encode_example, finetune
from tests.conftest import TINY_CONFIG

LORA = {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def test_encode_masks_the_prompt_and_ends_with_eos(tiny_qwen2, toy_records):
    tok = tiny_qwen2.tokenizer
    ex = encode_example(tok, toy_records[0], max_length=256)
    response = tok(toy_records[0]["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n_prompt = len(ex["input_ids"]) - len(response)
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["labels"][n_prompt:] == response == ex["input_ids"][n_prompt:]


def test_truncation_cuts_the_prompt_never_the_response(tiny_qwen2, toy_records):
    record = dict(toy_records[3], input="word " * 400)
    ex = encode_example(tiny_qwen2.tokenizer, record, max_length=64)
    assert len(ex["input_ids"]) == 64 and ex["cut"]
    assert not encode_example(tiny_qwen2.tokenizer, toy_records[3], max_length=64)["cut"]
    kept = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert tiny_qwen2.tokenizer.decode(kept[:-1]) == record["output"]


def test_collate_pads_right_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [9], "labels": [9]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [9, -100, -100]]


def _fresh_tiny(smollm2_spec):
    return TinyRandomModel(name="tiny", arch="qwen2", tokenizer_source=smollm2_spec, config=TINY_CONFIG).load()


def _loss(model, tokenizer, records):
    batch = collate([encode_example(tokenizer, r, 128) for r in records], tokenizer.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_finetune_learns_and_writes_adapter_and_epoch_checkpoints(smollm2_spec, toy_records, tmp_path):
    loaded = _fresh_tiny(smollm2_spec)
    before = _loss(loaded.model, loaded.tokenizer, toy_records)
    result = finetune(loaded, toy_records, lora=LORA, optim={"lr": 5e-3, "epochs": 3, "batch_size": 2,
                                                             "max_length": 128},
                      trainer_options={"enable_progress_bar": False, "accelerator": "cpu"},
                      output_dir=tmp_path, seed=0, save_epoch_checkpoints=True)
    after = _loss(result.model, loaded.tokenizer, toy_records)
    assert after < before - 0.5, (before, after)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert [p.name for p in result.epoch_checkpoints] == ["epoch_1", "epoch_2", "epoch_3"]
    assert result.epoch_lrs == [pytest.approx(5e-3)] * 3
    state = json.loads((result.epoch_checkpoints[-1] / "state.json").read_text())
    assert state["epoch"] == 3 and state["step"] == 9
    moments = load_file(str(result.epoch_checkpoints[-1] / "optimizer.safetensors"))
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert {k.split("/", 1)[1] for k in moments} == trainable
    assert all(torch.all(v >= 0) for k, v in moments.items() if k.startswith("exp_avg_sq/"))


def test_every_epoch_trains_on_every_batch_when_accumulation_does_not_divide_them(smollm2_spec, toy_records,
                                                                                   tmp_path):
    """6 records, batch 2, grad_accum 2: 3 batches and 2 optimizer steps per epoch (the last one short).
    The second epoch once skipped a batch, and with grad_accum above the batches (LESS's warm-up of a
    small pool) every batch, leaving no learning rate to average."""
    import lightning as L

    seen = []

    class CountBatches(L.Callback):
        def on_train_batch_start(self, trainer, *args):
            seen.append(trainer.current_epoch)

    result = finetune(_fresh_tiny(smollm2_spec), toy_records, lora=LORA,
                      optim={"lr": 5e-3, "epochs": 2, "batch_size": 2, "grad_accum": 2, "max_length": 128},
                      trainer_options={"enable_progress_bar": False, "accelerator": "cpu",
                                       "callbacks": [CountBatches()]},
                      output_dir=tmp_path, seed=0, save_epoch_checkpoints=True)
    assert seen == [0, 0, 0, 1, 1, 1]
    assert json.loads((result.epoch_checkpoints[-1] / "state.json").read_text())["step"] == 4
    assert result.epoch_lrs == [pytest.approx(5e-3)] * 2


def test_finetune_is_seeded(smollm2_spec, toy_records, tmp_path):
    def adapter(seed, folder):
        loaded = _fresh_tiny(smollm2_spec)
        finetune(loaded, toy_records, lora=dict(LORA, dropout=0.1), optim={"lr": 1e-3, "epochs": 1,
                                                                            "batch_size": 2, "max_length": 128},
                 trainer_options={"enable_progress_bar": False, "accelerator": "cpu"}, output_dir=folder, seed=seed)
        return load_file(str(folder / "adapter" / "adapter_model.safetensors"))

    a, b, c = adapter(0, tmp_path / "a"), adapter(0, tmp_path / "b"), adapter(1, tmp_path / "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batched_greedy_generation_equals_one_at_a_time(tiny_qwen2):
    prompts = ["Hello there", "A much longer prompt about the weather in spring", "Hi"]
    batched = generate(tiny_qwen2.model, tiny_qwen2.tokenizer, prompts, max_new_tokens=8, batch_size=3,
                       progress=False)
    single = [generate(tiny_qwen2.model, tiny_qwen2.tokenizer, [p], max_new_tokens=8, progress=False)[0]
              for p in prompts]
    assert batched == single
    assert all(isinstance(text, str) for text in batched)


def test_repetition_penalty_on_one_prompt_equals_hf_generate_s(tiny_qwen2):
    # Below 1 the penalty rewards repeats: a random model, which never repeats by itself, then does.
    model, tokenizer = tiny_qwen2.model, tiny_qwen2.tokenizer
    ids = tokenizer("Hello there", add_special_tokens=False, return_tensors="pt")["input_ids"]
    plain = generate(model, tokenizer, ["Hello there"], max_new_tokens=8, progress=False)
    penalised = generate(model, tokenizer, ["Hello there"], max_new_tokens=8, repetition_penalty=0.5, progress=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             repetition_penalty=0.5, eos_token_id=stop_token_ids(model, tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
    assert penalised == [tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()]
    words, rewarded = plain[0].split(), penalised[0].split()
    assert len(set(words)) == len(words) and len(set(rewarded)) < len(rewarded)


def test_repetition_penalty_does_not_count_left_padding_as_seen(tiny_qwen2):
    """The short prompt is padded with the very token it continues with: were the padding penalised,
    its batched continuation would change."""
    model, tokenizer = tiny_qwen2.model, tiny_qwen2.tokenizer
    short, long = "Hi", "A much longer prompt about the weather in spring"
    with torch.no_grad():
        first = int(model(tokenizer(short, add_special_tokens=False, return_tensors="pt")["input_ids"]).logits[0, -1]
                    .argmax())
    pad_token = tokenizer.pad_token
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(first)
    try:
        single = generate(model, tokenizer, [short], max_new_tokens=4, repetition_penalty=50.0, progress=False)
        batched = generate(model, tokenizer, [short, long], max_new_tokens=4, repetition_penalty=50.0,
                           progress=False)
    finally:
        tokenizer.pad_token = pad_token
    assert tokenizer.pad_token_id != first
    assert batched[0] == single[0] and single[0].startswith(tokenizer.decode([first]).strip())


def test_linear_schedule_with_warmup_as_hf_trainer(smollm2_spec, toy_records, tmp_path):
    """6 records, batch 2, 3 epochs: 9 optimizer steps; warm-up ceil(0.2 x 9) = 2 steps (factors 0, 1/2),
    then linear decay (9 - k) / 7 for steps k = 2..8. Each epoch's mean lr is what LESS weights by."""
    result = finetune(_fresh_tiny(smollm2_spec), toy_records, lora=LORA,
                      optim={"lr": 5e-3, "epochs": 3, "batch_size": 2, "max_length": 128, "schedule": "linear",
                             "warmup_ratio": 0.2},
                      trainer_options={"enable_progress_bar": False, "accelerator": "cpu"},
                      output_dir=tmp_path, seed=0, save_epoch_checkpoints=True)
    factors = [(0 + 1 / 2 + 7 / 7) / 3, (6 / 7 + 5 / 7 + 4 / 7) / 3, (3 / 7 + 2 / 7 + 1 / 7) / 3]
    assert result.epoch_lrs == pytest.approx([5e-3 * f for f in factors])


def test_an_unknown_schedule_names_the_field(smollm2_spec, toy_records, tmp_path):
    from delift.errors import DeliftInputError

    with pytest.raises(DeliftInputError) as err:
        finetune(_fresh_tiny(smollm2_spec), toy_records, lora=LORA,
                 optim={"lr": 5e-3, "epochs": 1, "batch_size": 2, "max_length": 128, "schedule": "cosine"},
                 output_dir=tmp_path)
    assert err.value.field == "train.optim.schedule"
