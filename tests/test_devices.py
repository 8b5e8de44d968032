"""The device policy, the Trainer arguments it implies, generation's stop ids, rank-0-only writing,
QLoRA's preparation and gradient checkpointing (what can be checked on a CPU)."""

import contextlib
import copy
import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch

from delift import devices
from delift.errors import DeliftInputError
from delift.generation import end_of_turn_token_id, generate, stop_token_ids
from delift.pipeline import run
from delift.training import EpochSeededShuffle, finetune, prepare_for_training
from tests.helpers import compose_config, isolated_cache

# The Phi-3 style tokenizer the GPU smoke script also checks generation with.
_spec = importlib.util.spec_from_file_location("gpu_smoke", Path(__file__).resolve().parents[1] / "experiments"
                                               / "gpu_smoke.py")
gpu_smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_smoke)


def test_auto_is_cuda_where_present_else_cpu_and_cuda_without_cuda_is_a_clear_error(monkeypatch):
    # Both sides of the policy on any machine: CUDA's presence is patched, not read.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.resolve_device(None) == torch.device("cpu")
    with pytest.raises(DeliftInputError, match="needs CUDA") as err:
        devices.resolve_device("cuda")
    assert err.value.field == "device"
    with pytest.raises(DeliftInputError, match="unknown device"):
        devices.resolve_device("gpu-please")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert devices.resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")  # under DDP: the local rank's GPU
    assert devices.resolve_device(None) == torch.device("cuda", 1)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("fails", [False, True])
def test_kept_in_place_moves_the_model_back_to_where_it_was(fails, monkeypatch):
    """A spy on the model's own `to`: after the Trainer call (which may fail) the model goes back to the
    device it was on before, here a (pretended) second GPU, whatever the call did to it."""
    model = torch.nn.Linear(2, 2)
    moves = []
    monkeypatch.setattr(model, "to", lambda *args, **kwargs: moves.append(args or tuple(kwargs.values())) or model)
    monkeypatch.setattr(devices, "model_device", lambda m: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="trainer broke") if fails else contextlib.nullcontext():
        with devices.kept_in_place(model):
            assert moves == []  # nothing moves before the call
            if fails:
                raise RuntimeError("trainer broke")
    assert moves == [(torch.device("cuda", 1),)]
    model.is_loaded_in_4bit = True  # bitsandbytes placed it when it loaded: never moved
    with devices.kept_in_place(model):
        pass
    assert moves == [(torch.device("cuda", 1),)]


def test_trainer_follows_the_models_device_and_precision(monkeypatch):
    cpu = devices.trainer_arguments({"accelerator": "auto", "precision": "auto", "devices": 1}, torch.device("cpu"))
    assert cpu["accelerator"] == "cpu" and cpu["precision"] == "32-true" and cpu["devices"] == 1
    inference = devices.trainer_arguments({"precision": "bf16-mixed"}, torch.device("cpu"), inference=True)
    assert "precision" not in inference  # the kernel runs in the model's own dtype
    assert devices.trainer_arguments({"precision": "16-mixed"}, torch.device("cpu"))["precision"] == "16-mixed"
    # On a CUDA machine: the model's own GPU, bf16-mixed where the GPU has bf16, 16-mixed where not.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    gpu = devices.trainer_arguments({"accelerator": "auto", "precision": "auto"}, torch.device("cuda", 1))
    assert gpu == {"accelerator": "gpu", "devices": [1], "precision": "bf16-mixed"}
    ddp = devices.trainer_arguments({"strategy": "ddp", "devices": 4}, torch.device("cuda", 0))
    assert ddp["devices"] == 4  # several processes: Lightning gives each rank its GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert devices.resolve_precision("auto", "gpu") == "16-mixed"


def test_process_count():
    assert devices.process_count({"devices": 2, "num_nodes": 3}) == 6
    assert devices.process_count({"devices": [0, 1]}) == 2
    assert devices.process_count({"devices": "0,1,2"}) == 3
    assert devices.process_count({}) == 1


@pytest.mark.parametrize("key", ["LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID"])
def test_any_nonzero_rank_variable_means_not_rank_zero(key, monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert devices.is_global_zero()
    monkeypatch.setenv(key, "0")
    assert devices.is_global_zero()
    monkeypatch.setenv(key, "1")
    assert not devices.is_global_zero()


def test_the_pipeline_puts_the_model_back_after_every_trainer_call(monkeypatch, tmp_path):
    """Lightning's teardown moves its module to CPU after predict / fit; the model must go back to the
    configured device before anything else uses it. A spy records the order of placements."""
    from transformers import PreTrainedModel

    events = []
    original_to, original_cpu = torch.nn.Module.to, torch.nn.Module.cpu

    def spy_to(self, *args, **kwargs):
        if isinstance(self, PreTrainedModel) or type(self).__name__.startswith("Peft"):
            events.append(("to", str(args[0]) if args else str(kwargs.get("device"))))
        return original_to(self, *args, **kwargs)

    def spy_cpu(self):
        if isinstance(self, L.LightningModule):
            events.append(("lightning_cpu", type(self).__name__))
        return original_cpu(self)

    def recorded(name, method):
        def call(trainer, *args, **kwargs):
            out = method(trainer, *args, **kwargs)
            events.append(("trainer_done", name))
            return out
        return call

    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    monkeypatch.setattr(torch.nn.Module, "cpu", spy_cpu)
    monkeypatch.setattr(L.Trainer, "fit", recorded("fit", L.Trainer.fit))
    monkeypatch.setattr(L.Trainer, "predict", recorded("predict", L.Trainer.predict))
    cfg = compose_config(["model=tiny_qwen2", "selector=delift", "device=cpu", "trainer.max_steps=1",
                          "eval.max_new_tokens=2", "logger=csv", "kernel.tile_size=64"],
                         output_dir=tmp_path / "run", cache_dir=isolated_cache(tmp_path))
    run(cfg)
    done = [k for k, e in enumerate(events) if e[0] == "trainer_done"]
    assert [events[k][1] for k in done] == ["predict", "fit"]  # the kernel, then fine-tuning
    # Lightning's teardown moved each module to CPU inside the call ...
    assert [e for e in events[:done[0]] if e[0] == "lightning_cpu"] == [("lightning_cpu", "UtilityKernelModule")]
    assert ("lightning_cpu", "LoRAFineTuner") in events[done[0]:done[1]]
    # ... and the model went back to the configured device right after it.
    for k in done:
        assert events[k + 1] == ("to", "cpu"), events[k - 2:k + 3]


@pytest.fixture
def phi3_style(tiny_qwen2):
    """The tiny model with a Phi-3 style tokenizer: EOS <|endoftext|>, turns ending in <|end|>, and a
    generation config that lists two stop ids of its own."""
    model, tokenizer = gpu_smoke.phi3_style(copy.deepcopy(tiny_qwen2.model), tiny_qwen2.tokenizer)
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|user|>"), 2]
    return model, tokenizer


def test_stop_ids_are_the_union_of_config_eos_and_end_of_turn(phi3_style, tiny_qwen2):
    model, tokenizer = phi3_style
    ids = tokenizer.convert_tokens_to_ids
    assert end_of_turn_token_id(tokenizer) == ids("<|end|>")
    assert stop_token_ids(model, tokenizer) == [ids("<|user|>"), 2, ids("<|endoftext|>"), ids("<|end|>")]
    # ChatML (SmolLM2): the end of turn is the EOS itself; no template: no end-of-turn token.
    assert end_of_turn_token_id(tiny_qwen2.tokenizer) == tiny_qwen2.tokenizer.eos_token_id == 2
    plain = copy.deepcopy(tiny_qwen2.tokenizer)
    plain.chat_template = None
    assert end_of_turn_token_id(plain) is None


def test_generation_stops_at_the_end_of_turn_token(phi3_style):
    """A model that says one word and then <|end|>, forced by a sequence bias: generation must stop
    there, not run on to max_new_tokens (as it did with the tokenizer's EOS alone)."""
    model, tokenizer = phi3_style
    word, end = tokenizer.convert_tokens_to_ids("Paris"), tokenizer.convert_tokens_to_ids("<|end|>")
    model.generation_config.sequence_bias = {(word,): 50.0, (word, end): 100.0}
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Capital of France?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert generate(model, tokenizer, [prompt], max_new_tokens=12, progress=False) == ["Paris"]
    model.generation_config.eos_token_id = None
    tokenizer.chat_template = None  # no end-of-turn token known: only <|endoftext|> stops it
    assert generate(model, tokenizer, [prompt], max_new_tokens=12, progress=False) == ["Paris" * 6]


def test_a_rank_other_than_zero_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCAL_RANK", "1")
    out = tmp_path / "run"
    selected = run(compose_config(["task=select", "selector=random"], output_dir=out))
    assert selected["n_selected"] > 0 and not out.exists()
    evaluated = run(compose_config(["selector=initial", "model=tiny_qwen2", "eval.max_new_tokens=2", "logger=csv"],
                                   output_dir=out))
    assert evaluated == {"rank_zero": False} and not out.exists()


def test_qlora_call_contract_peft_kbit_preparation_is_called_on_a_4bit_flagged_model(monkeypatch, tiny_qwen2):
    """The call contract only: bitsandbytes needs CUDA, so a stand-in flag marks the model 4-bit and PEFT's
    preparation is a stub; this checks that delift calls it, with which arguments, and never moves the model.
    Real 4-bit QLoRA training (bitsandbytes NF4 weights, a LoRA step, the loss going down) is checked on a
    GPU by experiments/gpu_smoke.py."""
    import peft

    calls = []
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training",
                        lambda model, **kwargs: calls.append(kwargs) or model)
    model = copy.copy(tiny_qwen2.model)
    model.is_loaded_in_4bit = True
    assert devices.is_quantized(model)
    assert prepare_for_training(model, gradient_checkpointing=True) is model
    assert calls == [{"use_gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}]
    placed = devices.place(model, "cpu")  # a 4-bit model is never moved
    assert placed is model


def test_gradient_checkpointing_trains_the_same_adapter(smollm2_spec, toy_records, tmp_path):
    from delift.models import TinyRandomModel
    from tests.conftest import TINY_CONFIG

    def adapter(checkpointing):
        loaded = TinyRandomModel(name="tiny-qwen2", arch="qwen2", tokenizer_source=smollm2_spec,
                                 config=TINY_CONFIG).load()
        result = finetune(loaded, toy_records, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                          optim={"lr": 1e-2, "epochs": 1, "batch_size": 2, "max_length": 64},
                          trainer_options={"enable_progress_bar": False}, output_dir=tmp_path / str(checkpointing),
                          gradient_checkpointing=checkpointing)
        assert loaded.model.is_activation_checkpointing == checkpointing
        return {n: p.detach().clone() for n, p in result.model.named_parameters() if "lora_" in n}

    plain, checkpointed = adapter(False), adapter(True)
    assert plain.keys() == checkpointed.keys() and plain
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in plain.items() if "lora_B" in n)  # it trained
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [10, 9, 3])
def test_ranks_together_hold_the_batches_of_one_process(n):
    batch, world = 4, 2
    single = list(EpochSeededShuffle(n, seed=5))
    shards = []
    for rank in range(world):
        sampler = EpochSeededShuffle(n, seed=5)
        sampler.shard(rank, world)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler)
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    per_rank = batch // world
    for step in range(-(-n // batch)):
        together = [i for s in shards for i in s[step * per_rank:(step + 1) * per_rank] if i != n]
        assert sorted(together) == sorted(single[step * batch:(step + 1) * batch])


def test_trainer_class_callbacks_and_profiler_come_from_config():
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.profilers import SimpleProfiler

    ours = ModelCheckpoint()
    options = {"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1, "logger": False,
               "callbacks": [{"_target_": "lightning.pytorch.callbacks.LearningRateMonitor",
                              "logging_interval": "step"}],
               "profiler": {"_target_": "lightning.pytorch.profilers.SimpleProfiler"}}
    trainer = devices.build_trainer(options, callbacks=[ours])
    configured = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
    assert len(configured) == 1 and configured[0].logging_interval == "step"
    assert trainer.callbacks.index(configured[0]) < trainer.callbacks.index(ours)  # the configured ones first
    assert isinstance(trainer.profiler, SimpleProfiler)
