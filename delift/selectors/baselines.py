"""Cheap baselines that large-scale studies found hard to beat: a random sample balanced by source,
and the longest responses (Xia et al. 2024, "Rethinking data selection at scale: random selection is
almost all you need")."""

from __future__ import annotations

import numpy as np

from delift.cache import content_hash
from delift.data.stages import proportional_quotas
from delift.generation import response_token_lengths
from delift.selectors.base import Selection, SelectionContext, Selector, register


def source_rng(seed: int, source: str) -> np.random.Generator:
    """A generator per (seed, source): adding or removing a source leaves the others' draws alone."""
    return np.random.default_rng(int(content_hash("random_balanced", int(seed), source)[:15], 16))


@register("random_balanced")
class RandomBalancedSelector(Selector):
    """A seeded random sample in which every `source` keeps its share of the pool."""

    def select(self, ctx: SelectionContext) -> Selection:
        members: dict[str, list[int]] = {}  # source -> pool indices, sources in order of first appearance
        for index, record in enumerate(ctx.pool):
            members.setdefault(record["source"], []).append(index)
        quotas = proportional_quotas({s: len(m) for s, m in members.items()}, self.budget(len(ctx.pool)))
        chosen = []
        for source, indices in members.items():
            # A permutation's prefix: a larger quota extends the sample rather than redrawing it.
            picked = source_rng(ctx.seed, source).permutation(len(indices))[:quotas[source]]
            chosen += [indices[i] for i in picked]
        return Selection(indices=sorted(chosen), info={"per_source": quotas})


@register("longest")
class LongestSelector(Selector):
    """The records with the longest responses in the model's tokens; equal lengths: lower pool index first."""

    def select(self, ctx: SelectionContext) -> Selection:
        lengths = response_token_lengths(ctx.model.tokenizer, ctx.pool)
        order = np.argsort(-lengths, kind="stable")  # stable: equal lengths keep pool order
        chosen = [int(i) for i in order[:self.budget(len(ctx.pool))]]
        return Selection(indices=chosen, scores=[float(lengths[i]) for i in chosen])
