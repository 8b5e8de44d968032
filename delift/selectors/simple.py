"""The reference points: a seeded random subset, all the data, and no fine-tuning at all."""

from __future__ import annotations

import numpy as np

from delift.errors import DeliftInputError
from delift.selectors.base import Selection, SelectionContext, Selector, register


@register("random")
class RandomSelector(Selector):
    def select(self, ctx: SelectionContext) -> Selection:
        rng = np.random.default_rng(ctx.seed)
        picked = rng.choice(len(ctx.pool), size=self.budget(len(ctx.pool)), replace=False)
        return Selection(indices=[int(i) for i in picked])


@register("full")
class FullSelector(Selector):
    def __init__(self, fraction: float = 1.0):
        super().__init__(fraction)

    def budget(self, n: int) -> int:
        if n == 0:
            raise DeliftInputError("the pool is empty", field="stage.pool")
        return n

    def select(self, ctx: SelectionContext) -> Selection:
        return Selection(indices=list(range(len(ctx.pool))))


@register("initial")
class InitialSelector(Selector):
    """The base model, untouched: nothing is selected and nothing is trained."""

    trains = False

    def __init__(self, fraction: float = 0.0):
        self.fraction = float(fraction)

    def select(self, ctx: SelectionContext) -> Selection:
        return Selection(indices=[])
