"""DEFT-UCS (Das & Khetan, 2023): unsupervised core-set selection by clustering sentence embeddings.

k-means (K = 7) on the sentence embeddings of the pool, then a quota of examples per cluster:
within a cluster, `alpha` of its quota are "easy" examples (closest to the centroid) and the rest
"hard" (farthest). The paper sweeps this easy/hard mix; alpha = 0.5 is the balanced default here.

`per_cluster` sets the quotas:
- "paper" (default): the same count A from every cluster, as DEFT-UCS's UCS algorithm samples A
  per cluster (the DELIFT reference port: A = int(fraction * n / K)). Here A = budget / K so that
  the subset has the budget's size, like every other selector's: the K * A rounding remainder
  goes one example each to the largest clusters (ties to the lower index), and a cluster smaller
  than its share is taken whole, the rest shared equally among the others.
- "proportional": shares proportional to cluster size (largest remainders get the leftover
  examples, ties to the lower cluster index).
Indices returned are positions in the pool (the reference port returned positions inside each
cluster).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, get_args

import numpy as np
from sklearn.cluster import KMeans

from delift.data.stages import proportional_quotas as split_proportionally
from delift.errors import DeliftInputError
from delift.embeddings import encode_records
from delift.schema import Range
from delift.selectors.base import Fraction, Selection, SelectionContext, Selector, register

PerCluster = Literal["paper", "proportional"]
PER_CLUSTER = get_args(PerCluster)


def _check_budget(sizes: list[int], budget: int) -> None:
    if not 0 <= budget <= sum(sizes):
        raise DeliftInputError(f"budget {budget} is not within the pool size {sum(sizes)}", field="selector.fraction")


def equal_quotas(sizes, budget: int) -> list[int]:
    """Split `budget` equally over clusters (DEFT-UCS's A per cluster), taking whole any cluster
    smaller than its share and sharing what it leaves among the others; the remainder of the
    division goes one each to the largest clusters (ties to the lower index)."""
    sizes = [int(s) for s in sizes]
    _check_budget(sizes, budget)
    quotas = [0] * len(sizes)
    open_, left = list(range(len(sizes))), budget
    while open_:
        share = left // len(open_)
        small = [c for c in open_ if sizes[c] <= share]
        if not small:
            # Every open cluster holds more than `share`, so share + 1 still fits in each.
            for c in open_:
                quotas[c] = share
            for c in sorted(open_, key=lambda cluster: (-sizes[cluster], cluster))[: left - share * len(open_)]:
                quotas[c] += 1
            break
        for c in small:
            quotas[c] = sizes[c]
            left -= sizes[c]
        open_ = [c for c in open_ if c not in small]
    return quotas


def proportional_quotas(sizes, budget: int) -> list[int]:
    """Split `budget` over clusters in proportion to `sizes` (largest remainders, ties to the lower index).

    With budget <= sum(sizes) no share exceeds its cluster: floor(b s / n) + 1 <= s whenever b s / n
    is fractional and below s.
    """
    sizes = [int(s) for s in sizes]
    _check_budget(sizes, budget)
    quotas = split_proportionally(dict(enumerate(sizes)), budget)
    return [quotas[c] for c in range(len(sizes))]


def easy_hard_pick(distances: np.ndarray, members: np.ndarray, quota: int, alpha: float) -> tuple[list[int], list[int]]:
    """From one cluster's `members` (dataset indices), the round(alpha * quota) closest to the
    centroid and the remaining quota farthest from it; ties in distance go to the lower index."""
    n_easy = int(math.floor(alpha * quota + 0.5))
    n_hard = quota - n_easy
    order = members[np.lexsort((members, distances))]  # nearest first
    easy = [int(i) for i in order[:n_easy]]
    far_first = members[np.lexsort((members, -distances))]
    taken = set(easy)  # equal distances can put one example at both ends
    hard = [int(i) for i in far_first if int(i) not in taken][:n_hard]
    return easy, hard


def deft_ucs_select(embeddings: np.ndarray, labels: np.ndarray, centroids: np.ndarray, budget: int,
                    alpha: float, per_cluster: str = "paper") -> tuple[list[int], dict]:
    """Dataset indices of the core-set, given a clustering; and per-cluster bookkeeping."""
    labels = np.asarray(labels)
    n_clusters = centroids.shape[0]
    sizes = [int((labels == c).sum()) for c in range(n_clusters)]
    quotas = (equal_quotas if per_cluster == "paper" else proportional_quotas)(sizes, budget)
    picked, easy_all, hard_all = [], [], []
    for c in range(n_clusters):
        members = np.flatnonzero(labels == c)
        if quotas[c] == 0:
            continue
        distances = np.linalg.norm(embeddings[members] - centroids[c], axis=1)
        easy, hard = easy_hard_pick(distances, members, quotas[c], alpha)
        easy_all += easy
        hard_all += hard
        picked += easy + hard
    info = {"cluster_sizes": sizes, "quotas": quotas, "easy": sorted(easy_all), "hard": sorted(hard_all)}
    return sorted(picked), info


@register("deft_ucs")
class DeftUCSSelector(Selector):
    """`alpha`: share of each cluster's quota taken from its easy end (the rest from its hard end);
    `per_cluster`: "paper" (equal quotas) or "proportional" (module docstring)."""

    def __init__(self, fraction: Fraction = 0.3, n_clusters: Annotated[int, Range(1)] = 7,
                 alpha: Annotated[float, Range(0, 1)] = 0.5, n_init: Annotated[int, Range(1)] = 10,
                 per_cluster: PerCluster = "paper"):
        super().__init__(fraction)
        if not 0.0 <= alpha <= 1.0:
            raise DeliftInputError(f"must be in [0, 1], got {alpha}", field="selector.alpha")
        if n_clusters < 1:
            raise DeliftInputError(f"must be at least 1, got {n_clusters}", field="selector.n_clusters")
        if per_cluster not in PER_CLUSTER:
            raise DeliftInputError(f"must be one of {list(PER_CLUSTER)}, got {per_cluster!r}",
                                   field="selector.per_cluster")
        self.n_clusters = int(n_clusters)
        self.alpha = float(alpha)
        self.n_init = int(n_init)
        self.per_cluster = per_cluster

    def select(self, ctx: SelectionContext) -> Selection:
        if ctx.embedder is None:
            raise DeliftInputError("DEFT-UCS needs a sentence embedder, and none is configured", field="embedder")
        budget = self.budget(len(ctx.pool))
        embeddings = np.asarray(encode_records(ctx.embedder, ctx.pool), dtype=np.float64)
        n_clusters = min(self.n_clusters, len(ctx.pool))  # k-means needs at least K points
        kmeans = KMeans(n_clusters=n_clusters, n_init=self.n_init, random_state=ctx.seed).fit(embeddings)
        indices, info = deft_ucs_select(embeddings, kmeans.labels_, kmeans.cluster_centers_, budget, self.alpha,
                                        self.per_cluster)
        return Selection(indices=indices, info=info | {"n_clusters": n_clusters})
