"""GPU smoke test: every stage with delift, random, selectit and less, on the tiny models and SmolLM2, on CUDA.

    python experiments/gpu_smoke.py                      # everything (minutes on one GPU)
    python experiments/gpu_smoke.py --models tiny_qwen2  # one model

After every step that uses the model (the kernel's Trainer.predict, fine-tuning's Trainer.fit, SelectIT's
ratings, LESS's warm-up, generation) it asserts that every parameter of the model is on the GPU: the
device policy (delift.devices) puts the model back after Lightning's teardown moved it to CPU. It also
checks that the fast and naive kernels agree within the model dtype's rounding, that a Phi-3 style
tokenizer (turns end in <|end|>, EOS <|endoftext|>) stops generation at its end-of-turn token, and real
QLoRA: SmolLM2 loaded in 4-bit NF4 by bitsandbytes through delift's own loader, LoRA-trained with
PEFT's k-bit preparation (the CPU tests can only check that call's contract), its loss going down while
the 4-bit base weights stay as loaded, on the GPU throughout (`--skip-qlora` where bitsandbytes is absent).
Where CUDA is absent it says so and exits 0. Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"
sys.path.insert(0, str(ROOT))

STAGES = {"instruction": [], "task": ["stage.sizes.pool.trivia=20", "stage.sizes.pool.gsm8k=4"],
          "continual": ["stage.sizes.pool.mmlu=56", "stage.sizes.existing.trivia=10"]}
SELECTORS = {"delift": [], "random": [], "selectit": [],
             "less": ["selector.projection_dim=256", "selector.warmup_epochs=1"]}
FAST = ["trainer.max_steps=2", "eval.max_new_tokens=8", "logger=csv", "progress=false"]
# Largest |fast - naive| each dtype's rounding allows on a utility (differences of probabilities).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
PHI3_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>\n' + message['content'] "
                 "+ '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] "
                 "+ '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
                 "{% else %}{{ eos_token }}{% endif %}")


def phi3_style(model, tokenizer):
    """A copy of `tokenizer` made Phi-3 style (EOS <|endoftext|>, turns ending in <|end|>, Phi-3's chat
    template) and `model` with embeddings for its new tokens (tests/test_devices.py uses it too)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>",
                                  "additional_special_tokens": ["<|user|>", "<|assistant|>", "<|end|>"]})
    tokenizer.chat_template = PHI3_TEMPLATE
    model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def on_gpu(model) -> bool:
    return all(p.device.type == "cuda" for p in model.parameters())


class DeviceWatch:
    """Wraps the pipeline's model-using steps: after each (and before generation) the model must be on the GPU."""

    def __init__(self):
        self.checked: list[str] = []
        self.patches = []

    def wrap(self, module, name: str, model_of, when: str = "after"):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            if when == "before":
                self.check(f"{module.__name__}.{name} (before)", model_of(args, kwargs))
            out = original(*args, **kwargs)
            if when == "after":
                self.check(f"{module.__name__}.{name}", model_of(args, kwargs))
            return out

        setattr(module, name, wrapped)
        self.patches.append((module, name, original))

    def check(self, step: str, model) -> None:
        if not on_gpu(model):
            devices = sorted({str(p.device) for p in model.parameters()})
            raise AssertionError(f"after {step} the model's parameters are on {devices}, not the GPU")
        self.checked.append(step)

    def __enter__(self):
        import delift.evaluation
        import delift.pipeline
        import delift.selectors.selectit
        import delift.training
        import delift.utility.kernel
        import delift.utility.sparse

        first = lambda args, kwargs: args[0]  # noqa: E731 - the model is every wrapped function's first argument
        loaded_model = lambda args, kwargs: args[0].model  # noqa: E731 - finetune takes the LoadedModel
        self.wrap(delift.utility.kernel, "run_tiles", first)
        self.wrap(delift.utility.sparse, "run_tiles", first)
        self.wrap(delift.pipeline, "finetune", loaded_model)
        self.wrap(delift.training, "finetune", loaded_model)  # LESS's warm-up imports it from here
        self.wrap(delift.selectors.selectit, "next_token_log_probs", first)
        self.wrap(delift.evaluation, "generate", first, when="before")
        return self

    def __exit__(self, *exc):
        for module, name, original in reversed(self.patches):
            setattr(module, name, original)


def compose(overrides: list[str], output_dir: Path, cache_dir: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "delift" / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = cache_dir
        del cfg["hydra"]
    return cfg


def pipeline_checks(models: list[str], cache_dir: str, scratch: Path) -> list[tuple[str, bool, str]]:
    from delift.pipeline import run

    outcomes = []
    for model in models:
        for stage, stage_options in STAGES.items():
            for selector, selector_options in SELECTORS.items():
                name = f"pipeline {model} {stage} {selector}"
                started = time.perf_counter()
                try:
                    cfg = compose([f"model={model}", f"stage={stage}", f"selector={selector}", f"device={DEVICE}", *FAST,
                                   *stage_options, *selector_options], scratch / name.replace(" ", "_"), cache_dir)
                    with DeviceWatch() as watch:
                        results = run(cfg)
                    detail = (f"{len(watch.checked)} device checks, rouge1 {results['metrics'].get('rouge1', 0):.3f}, "
                              f"{time.perf_counter() - started:.0f} s")
                    outcomes.append((name, True, detail))
                except Exception as err:  # noqa: BLE001 - report every failure, then exit 1
                    traceback.print_exc()
                    outcomes.append((name, False, f"{type(err).__name__}: {err}"))
                print(f"{'ok ' if outcomes[-1][1] else 'FAIL'} {name}: {outcomes[-1][2]}", flush=True)
    return outcomes


def kernel_checks(models: list[str], cache_dir: str) -> list[tuple[str, bool, str]]:
    from hydra.utils import instantiate

    from delift.data.packaged import mixed_sample
    from delift.utility import compute_kernel

    records = mixed_sample(12, 0)
    outcomes = []
    for model in models:
        name = f"fast == naive kernel {model}"
        try:
            loaded = instantiate(compose([f"model={model}"], Path(cache_dir), cache_dir).model).load(DEVICE)
            dtype = next(loaded.model.parameters()).dtype
            kernels = {engine: compute_kernel(loaded.model, loaded.tokenizer, records, engine=engine, progress=False)
                       for engine in ("fast", "naive")}
            assert on_gpu(loaded.model), "the model left the GPU after the kernel"
            gap = float(abs(kernels["fast"] - kernels["naive"]).max())
            ok = gap <= TOLERANCE.get(dtype, 1e-4)
            outcomes.append((name, ok, f"max |fast - naive| = {gap:.2e} ({dtype}, allowed {TOLERANCE.get(dtype, 1e-4)})"))
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            outcomes.append((name, False, f"{type(err).__name__}: {err}"))
        print(f"{'ok ' if outcomes[-1][1] else 'FAIL'} {name}: {outcomes[-1][2]}", flush=True)
    return outcomes


def stop_check(cache_dir: str) -> tuple[str, bool, str]:
    """A Phi-3 style tokenizer on the tiny model, biased to say one word then <|end|>: generation must stop there."""
    from hydra.utils import instantiate

    from delift.generation import generate, stop_token_ids

    name = "Phi-3 style stop at <|end|>"
    try:
        loaded = instantiate(compose(["model=tiny_qwen2"], Path(cache_dir), cache_dir).model).load(DEVICE)
        model, tokenizer = phi3_style(loaded.model, loaded.tokenizer)
        word, end = tokenizer.convert_tokens_to_ids("Paris"), tokenizer.convert_tokens_to_ids("<|end|>")
        model.generation_config.sequence_bias = {(word,): 50.0, (word, end): 100.0}
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Capital of France?"}], tokenize=False,
                                               add_generation_prompt=True)
        out = generate(model, tokenizer, [prompt], max_new_tokens=12, progress=False)
        ok = out == ["Paris"] and end in stop_token_ids(model, tokenizer) and on_gpu(model)
        return name, ok, f"generated {out!r}, stop ids {stop_token_ids(model, tokenizer)}"
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return name, False, f"{type(err).__name__}: {err}"


QLORA_RECORDS = [("What is the capital of France?", "Paris"), ("What colour is the sky on a clear day?", "Blue"),
                 ("How many legs does a spider have?", "Eight"), ("Who wrote Hamlet?", "William Shakespeare"),
                 ("What is 12 times 12?", "144"), ("What gas do plants absorb from the air?", "Carbon dioxide")]


def qlora_check(cache_dir: str, scratch: Path) -> tuple[str, bool, str]:
    """Real 4-bit QLoRA: SmolLM2 (converted from its GGUF into a transformers folder) loaded by
    delift.models.HubModel with load_in_4bit=true (bitsandbytes NF4, placed on the GPU as it loads), then
    delift.training.finetune (PEFT's prepare_model_for_kbit_training, LoRA, Lightning bf16-mixed)."""
    from hydra.utils import instantiate

    from delift.devices import is_quantized
    from delift.models import HubModel
    from delift.records import make_record
    from delift.training import collate, encode_example, finetune

    name = "QLoRA 4-bit training (bitsandbytes NF4 + LoRA)"
    try:
        import bitsandbytes as bnb

        records = [make_record(f"toy/{i}", "Answer the question.", q, a, source="toy")
                   for i, (q, a) in enumerate(QLORA_RECORDS)]
        spec = instantiate(compose(["model=smollm2"], Path(cache_dir), cache_dir).model)
        folder = spec.convert()  # a transformers folder: what a hub model is loaded from
        loaded = HubModel(name=str(folder), dtype="bfloat16", load_in_4bit=True).load(DEVICE)
        model = loaded.model
        four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert is_quantized(model) and four_bit, "the model did not load in 4-bit"
        assert on_gpu(model), "bitsandbytes did not place the 4-bit model on the GPU"
        frozen = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

        def loss(m) -> float:
            batch = collate([encode_example(loaded.tokenizer, r, 128) for r in records], loaded.tokenizer.pad_token_id)
            with torch.no_grad():
                return float(m(**{k: v.to(DEVICE) for k, v in batch.items()}).loss)

        before = loss(model)
        result = finetune(loaded, records, lora={"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                          optim={"lr": 2e-3, "epochs": 4, "batch_size": 2, "max_length": 128},
                          trainer_options={"enable_progress_bar": False}, output_dir=scratch / "qlora", seed=0,
                          gradient_checkpointing=True)
        after = loss(result.model)
        assert on_gpu(result.model), "the QLoRA model left the GPU after fine-tuning"
        assert (scratch / "qlora" / "adapter" / "adapter_model.safetensors").is_file(), "no adapter written"
        # LoRA wraps each 4-bit layer (its `base_layer`): the packed NF4 weights are the ones loaded.
        trained = {n.replace(".base_layer", ""): m.weight.detach()
                   for n, m in result.model.get_base_model().named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        assert trained.keys() == frozen.keys(), "4-bit layers lost or added in training"
        changed = [n for n, weight in frozen.items() if not torch.equal(trained[n], weight)]
        assert not changed, f"4-bit base weights changed in training: {changed[:3]}"
        lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "the LoRA weights did not train"
        assert after < before - 0.3, f"the loss did not go down: {before:.3f} -> {after:.3f}"
        return name, True, (f"{len(four_bit)} Linear4bit layers, loss {before:.3f} -> {after:.3f}, "
                            f"{torch.cuda.max_memory_allocated() / 2 ** 20:.0f} MiB peak")
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        return name, False, f"{type(err).__name__}: {err}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["tiny_qwen2", "tiny_phi3", "smollm2"])
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder (converted models too)")
    parser.add_argument("--skip-qlora", action="store_true", help="no 4-bit QLoRA check (needs bitsandbytes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_smoke: CUDA is not available on this machine; nothing was run.")
        return 0
    print(f"gpu_smoke on {torch.cuda.get_device_name()} (torch {torch.__version__})", flush=True)
    with tempfile.TemporaryDirectory(prefix="delift-gpu-smoke-") as scratch:
        cache_dir = args.cache_dir or str(Path(scratch) / "cache")
        outcomes = [stop_check(cache_dir)]
        print(f"{'ok ' if outcomes[0][1] else 'FAIL'} {outcomes[0][0]}: {outcomes[0][2]}", flush=True)
        if not args.skip_qlora:
            outcomes.append(qlora_check(cache_dir, Path(scratch)))
            print(f"{'ok ' if outcomes[-1][1] else 'FAIL'} {outcomes[-1][0]}: {outcomes[-1][2]}", flush=True)
        outcomes += kernel_checks(args.models, cache_dir)
        outcomes += pipeline_checks(args.models, cache_dir, Path(scratch))
    failed = [name for name, ok, _ in outcomes if not ok]
    print(f"\n{len(outcomes) - len(failed)} of {len(outcomes)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
