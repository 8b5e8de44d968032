"""Where models run and which process writes: one device policy for every step, rank 0 under DDP.

- `device: auto` (config) is CUDA when present, else CPU; under DDP each process takes the GPU of
  its local rank. Models are placed once when loaded (`place`); 4-bit models are placed by
  bitsandbytes when loaded and never moved.
- Every Trainer call (the kernel's `predict`, fine-tuning's `fit`) runs inside `kept_in_place`:
  Lightning's strategy teardown moves the module to CPU afterwards, and the model must be back
  where it was for what follows (ICL evaluation, generation, SelectIT, the judge).
- A Trainer follows its model (`trainer_arguments`): `accelerator: auto` is the model's device
  type, and `precision: auto` is bf16-mixed on CUDA GPUs that have bf16, 16-mixed on older ones,
  32-true on CPU. Inference Trainers (the kernel) take no precision plugin: the model runs in its
  own dtype, which the kernel cache key records.
- `is_global_zero()` is known before any process group exists (Lightning's launcher passes it in the
  environment), so a re-launched rank can skip writing from its first line.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from delift.errors import DeliftInputError


def resolve_device(name=None) -> torch.device:
    """`auto` / None: CUDA when present (the local rank's GPU under DDP), else CPU; or a torch device name."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise DeliftInputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N", field="device") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeliftInputError(f"device {name!r} needs CUDA, which this machine lacks; use device=auto or cpu",
                                   field="device")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return device


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def is_quantized(model) -> bool:
    """A bitsandbytes (4/8-bit) model: placed when loaded, cannot be moved."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def place(model, device=None):
    """Move `model` to `device` (see `resolve_device`); a quantised model stays where it was loaded."""
    if not is_quantized(model):
        model.to(resolve_device(device))
    return model


@contextmanager
def kept_in_place(model):
    """Run a Trainer call and put `model` back on the device it was on before (Lightning's teardown
    moves the module to CPU)."""
    device = model_device(model)
    try:
        yield
    finally:
        place(model, device)


def resolve_precision(precision, accelerator: str) -> str:
    """`auto`: bf16-mixed on CUDA GPUs with bf16, 16-mixed on older GPUs, 32-true on CPU."""
    if precision not in (None, "auto"):
        return str(precision)
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def trainer_arguments(options: dict | None, device: torch.device, *, inference: bool = False) -> dict:
    """Lightning Trainer arguments from the trainer config, for a model on `device`."""
    options = dict(options or {})
    if options.get("accelerator", "auto") == "auto":
        options["accelerator"] = "gpu" if device.type == "cuda" else "cpu"
    if device.type == "cuda" and options["accelerator"] in ("gpu", "cuda") and process_count(options) == 1:
        options["devices"] = [device.index or 0]  # the model's own GPU, not always the first
    precision = options.pop("precision", "auto")
    if not inference:
        options["precision"] = resolve_precision(precision, options["accelerator"])
    return options


def _built(value):
    """A config value with its `_target_` nodes (a callback, a profiler, a plugin) instantiated."""
    from hydra.utils import instantiate

    if isinstance(value, dict) and "_target_" in value:
        return instantiate(value)
    if isinstance(value, (list, tuple)):
        return [_built(item) for item in value]
    return value


def build_trainer(options: dict, **arguments):
    """The configured Trainer class (`_target_`, default Lightning's) from `trainer_arguments` output and
    delift's own `arguments`: the configured callbacks first, then delift's."""
    from hydra.utils import get_class

    options = {key: _built(value) for key, value in options.items()}
    trainer_class = get_class(options.pop("_target_", "lightning.pytorch.Trainer"))
    callbacks = list(options.pop("callbacks", None) or []) + list(arguments.pop("callbacks", None) or [])
    return trainer_class(**options, **arguments, callbacks=callbacks)


def process_count(options: dict) -> int:
    """How many processes a Trainer with these arguments runs (devices x nodes)."""
    devices = options.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif devices in (-1, "-1", "auto"):
        gpu = options.get("accelerator", "auto") in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        count = torch.cuda.device_count() if gpu else (1 if devices == "auto" else os.cpu_count() or 1)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    else:
        count = int(devices)
    return count * int(options.get("num_nodes", 1))


def is_global_zero() -> bool:
    """Whether this process writes the run's files: rank 0, or no distributed run. Read from the
    environment that Lightning's launcher, torchrun or SLURM set, so it is known before any process
    group exists (a re-launched rank must not write from its first line)."""
    keys = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
    return all(int(os.environ.get(key) or 0) == 0 for key in keys)
