"""The selector interface: a small class, registered by name, that maps a stage's data to indices."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Callable

from delift.devices import place
from delift.errors import DeliftInputError
from delift.schema import Range

SELECTORS: dict[str, type["Selector"]] = {}
# A subset selector's share of the pool; the config schema checks it before anything loads.
Fraction = Annotated[float, Range(0, 1, low_open=True)]


def register(name: str):
    def wrap(cls):
        cls.name = name
        SELECTORS[name] = cls
        return cls

    return wrap


def budget_for(n: int, fraction: float) -> int:
    """round(fraction * n) for a subset selector; a fraction outside (0, 1], or one that rounds to 0
    or to the whole pool (that is `selector=full`), is an error."""
    if not (0.0 < fraction <= 1.0):
        raise DeliftInputError(f"must be in (0, 1], got {fraction}", field="selector.fraction")
    if n == 0:
        raise DeliftInputError("the pool is empty", field="stage.pool")
    budget = int(math.floor(fraction * n + 0.5))
    if budget == 0:
        raise DeliftInputError(f"fraction {fraction} of a pool of {n} rounds to 0 examples", field="selector.fraction")
    if budget >= n:
        raise DeliftInputError(f"fraction {fraction} of a pool of {n} selects all of it; use selector=full",
                               field="selector.fraction")
    return budget


@dataclass
class SelectionContext:
    """Everything a selector may use. Models and embeddings load lazily, at most once."""

    stage: str
    pool: list[dict]
    objective: str | None = None  # the stage's objective (fl, flmi, flcg); selectors may override
    target: list[dict] = field(default_factory=list)
    existing: list[dict] = field(default_factory=list)
    seed: int = 0
    cache_dir: str | None = None
    output_dir: Path | None = None
    model_spec: Any = None
    embedder: Any = None
    kernel_options: dict = field(default_factory=dict)
    train_options: dict = field(default_factory=dict)
    trainer_options: dict = field(default_factory=dict)
    progress: bool = True
    device: str = "auto"  # where models run (delift.devices.resolve_device)
    loader: Callable | None = None  # overrides model_spec.load (tests, the Python API)

    @cached_property
    def model(self):
        """The LoadedModel (model, tokenizer, name, identity), on `device`."""
        if self.loader is not None:
            loaded = self.loader()
            place(loaded.model, self.device)
            return loaded
        if self.model_spec is None:
            raise DeliftInputError("this selector needs a model, and none is configured", field="model")
        return self.model_spec.load(self.device)


@dataclass
class Selection:
    indices: list[int]
    scores: list[float] | None = None  # per selected index, in order: gains or scores
    objective_value: float | None = None
    info: dict = field(default_factory=dict)
    # The raw kernels the objective read, by name (kernel selectors): for the run's plots and kernel
    # artifact, never written to selection.json.
    kernels: dict = field(default_factory=dict, repr=False, compare=False)


class Selector:
    """Base class. Subclasses set `name` through @register and implement `select`."""

    name = "base"
    trains = True  # False for `initial`: evaluate the base model untouched

    def __init__(self, fraction: Fraction = 0.3):
        self.fraction = float(fraction)

    def budget(self, n: int) -> int:
        return budget_for(n, self.fraction)

    def select(self, ctx: SelectionContext) -> Selection:
        raise NotImplementedError

    def config(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")} | {"name": self.name}
