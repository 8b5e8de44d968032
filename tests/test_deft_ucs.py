"""DEFT-UCS: equal (the paper's) or size-proportional cluster quotas, easy/hard shares, dataset
(not in-cluster) indices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from delift.embeddings import Embedder
from delift.errors import DeliftInputError
from delift.records import make_record
from delift.selectors import SELECTORS, SelectionContext
from delift.selectors.deft_ucs import DeftUCSSelector, deft_ucs_select, equal_quotas, proportional_quotas
from tests.helpers import CONF_DIR


def test_quotas_are_proportional_with_deterministic_remainders():
    assert proportional_quotas([5, 3, 2], 5) == [3, 1, 1]  # 2.5, 1.5, 1.0: the .5 tie goes to cluster 0
    assert proportional_quotas([7] * 7, 10) == [2, 2, 2, 1, 1, 1, 1]
    assert proportional_quotas([0, 4], 3) == [0, 3]  # an empty cluster gets nothing
    assert proportional_quotas([1, 1, 9], 11) == [1, 1, 9]  # the whole pool: every cluster given in full
    with pytest.raises(DeliftInputError, match="selector.fraction"):
        proportional_quotas([2, 2], 5)


@pytest.mark.parametrize("sizes, budget, equal, proportional", [
    # 6 / 2 = 3 each; by size 6 * 10/15 = 4 and 6 * 5/15 = 2.
    ([10, 5], 6, [3, 3], [4, 2]),
    # share 8 / 2 = 4 > 2: the small cluster is taken whole, the other gets the 6 left;
    # by size 8 * 10/12 = 6.67 and 1.33: 6 + 1 (larger remainder), 1.
    ([10, 2], 8, [6, 2], [7, 1]),
    # share 3: cluster 0 (3) whole; 7 left over two: 3 each, the 1 left to the larger (ties: lower index).
    ([3, 8, 8], 10, [3, 4, 3], [2, 4, 4]),
    # 10 = 7 x 1 + 3: the 3 extra go to the largest, here all equal: the lowest indices.
    ([7] * 7, 10, [2, 2, 2, 1, 1, 1, 1], [2, 2, 2, 1, 1, 1, 1]),
    ([9, 0, 4], 6, [3, 0, 3], [4, 0, 2]),  # an empty cluster gets nothing
    ([1, 1, 9], 11, [1, 1, 9], [1, 1, 9]),  # the whole pool
])
def test_equal_quotas_are_the_papers_count_per_cluster(sizes, budget, equal, proportional):
    assert equal_quotas(sizes, budget) == equal and sum(equal) == budget
    assert proportional_quotas(sizes, budget) == proportional
    with pytest.raises(DeliftInputError, match="selector.fraction"):
        equal_quotas(sizes, sum(sizes) + 1)


def _two_clusters():
    """1-d points: cluster A around 0 (10 points), cluster B around 100 (5), interleaved in the dataset."""
    offsets_a = np.arange(1, 11, dtype=float)  # distance to centroid 0: 1..10
    offsets_b = np.arange(1, 6, dtype=float)
    # dataset order: b5 a1 a10 b1 a2 a9 b4 a3 a8 b2 a4 a7 b3 a5 a6
    layout = [("b", 5), ("a", 1), ("a", 10), ("b", 1), ("a", 2), ("a", 9), ("b", 4), ("a", 3), ("a", 8),
              ("b", 2), ("a", 4), ("a", 7), ("b", 3), ("a", 5), ("a", 6)]
    embeddings = np.array([[offsets_a[k - 1]] if c == "a" else [100 + offsets_b[k - 1]] for c, k in layout])
    labels = np.array([0 if c == "a" else 1 for c, _ in layout])
    centroids = np.array([[0.0], [100.0]])
    index = {item: i for i, item in enumerate(layout)}
    return embeddings, labels, centroids, index


def test_easy_and_hard_shares_return_dataset_indices():
    embeddings, labels, centroids, index = _two_clusters()
    # proportional: budget 6 -> quotas 4 (A) and 2 (B); alpha 0.5 -> A: 2 easy + 2 hard, B: 1 easy + 1 hard
    picked, info = deft_ucs_select(embeddings, labels, centroids, budget=6, alpha=0.5, per_cluster="proportional")
    assert info["quotas"] == [4, 2]
    expected_easy = sorted([index["a", 1], index["a", 2], index["b", 1]])
    expected_hard = sorted([index["a", 10], index["a", 9], index["b", 5]])
    assert info["easy"] == expected_easy == [1, 3, 4]
    assert info["hard"] == expected_hard == [0, 2, 5]
    assert picked == sorted(expected_easy + expected_hard)

    # alpha 1: all easy; alpha 0: all hard; alpha 0.25 of 4 -> 1 easy 3 hard in A
    assert deft_ucs_select(embeddings, labels, centroids, 6, 1.0, "proportional")[1]["hard"] == []
    assert deft_ucs_select(embeddings, labels, centroids, 6, 0.0, "proportional")[1]["easy"] == []
    quarter = deft_ucs_select(embeddings, labels, centroids, 6, 0.25, "proportional")[1]
    assert sorted(quarter["easy"]) == sorted([index["a", 1], index["b", 1]])  # B: round(0.5) = 1 easy


def test_paper_quotas_take_the_same_count_from_each_cluster():
    embeddings, labels, centroids, index = _two_clusters()
    # budget 6 over 2 clusters -> 3 each (the default); alpha 0.5 -> round(1.5) = 2 easy + 1 hard in each
    picked, info = deft_ucs_select(embeddings, labels, centroids, budget=6, alpha=0.5)
    assert info["quotas"] == [3, 3]
    assert info["easy"] == sorted([index["a", 1], index["a", 2], index["b", 1], index["b", 2]]) == [1, 3, 4, 9]
    assert info["hard"] == sorted([index["a", 10], index["b", 5]]) == [0, 2]
    assert picked == [0, 1, 2, 3, 4, 9]


def test_a_cluster_taken_whole_never_repeats_an_example():
    embeddings, labels, centroids, _ = _two_clusters()
    picked, info = deft_ucs_select(embeddings, labels, centroids, budget=15, alpha=0.5)
    assert picked == list(range(15)) and info["quotas"] == [10, 5]
    assert deft_ucs_select(embeddings, labels, centroids, 15, 0.5, "proportional")[0] == list(range(15))


class _FixedEmbedder:
    """Returns given vectors, one per pool record, whatever the texts."""

    def __init__(self, vectors):
        self.vectors = np.asarray(vectors, dtype=np.float32)

    def encode(self, texts):
        assert len(texts) == len(self.vectors)
        return self.vectors


@pytest.mark.parametrize("per_cluster, counts", [
    # budget 10 over groups of 12, 4, 4: paper 10 // 3 = 3 each, the 1 left to the largest group;
    # proportional 10 * 12/20 = 6 and 10 * 4/20 = 2, 2.
    ("paper", [4, 3, 3]),
    ("proportional", [6, 2, 2]),
])
def test_end_to_end_with_kmeans_on_constructed_groups(per_cluster, counts):
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(3), [12, 4, 4])
    vectors = np.eye(3)[groups] * 10 + rng.normal(scale=0.5, size=(20, 3))
    order = rng.permutation(20)  # groups interleaved in the dataset
    embedder = _FixedEmbedder(vectors[order])
    pool = [make_record(f"r{i}", "Say something.", "", f"text {i}") for i in range(20)]
    ctx = SelectionContext(stage="instruction", pool=pool, embedder=embedder, seed=0, progress=False)
    selection = DeftUCSSelector(fraction=0.5, n_clusters=3, alpha=0.5, per_cluster=per_cluster).select(ctx)
    assert sorted(selection.info["cluster_sizes"]) == [4, 4, 12]
    assert len(selection.indices) == 10 == len(set(selection.indices))
    # each group contributes its quota, counted on dataset indices
    assert np.bincount(groups[order][selection.indices], minlength=3).tolist() == counts
    again = DeftUCSSelector(fraction=0.5, n_clusters=3, per_cluster=per_cluster).select(ctx)
    assert again.indices == selection.indices  # seeded


def test_runs_on_real_embeddings_and_needs_an_embedder(toy_records, tmp_path):
    assert SELECTORS["deft_ucs"] is DeftUCSSelector
    embedder = Embedder("all-MiniLM-L6-v2", packaged=True, cache_dir=str(tmp_path))
    ctx = SelectionContext(stage="instruction", pool=toy_records, embedder=embedder, seed=0, progress=False)
    selection = DeftUCSSelector(fraction=0.5).select(ctx)  # K = 7 > 6 records: one cluster per record
    assert selection.info["n_clusters"] == 6 and len(selection.indices) == 3
    assert all(0 <= i < len(toy_records) for i in selection.indices)
    with pytest.raises(DeliftInputError, match="embedder"):
        DeftUCSSelector().select(SelectionContext(stage="instruction", pool=toy_records))
    with pytest.raises(DeliftInputError, match="selector.alpha"):
        DeftUCSSelector(alpha=1.5)
    with pytest.raises(DeliftInputError, match="selector.per_cluster"):
        DeftUCSSelector(per_cluster="equal")


def test_config_file_instantiates_the_selector():
    selector = instantiate(OmegaConf.load(Path(CONF_DIR) / "selector" / "deft_ucs.yaml"))
    assert isinstance(selector, DeftUCSSelector)
    assert selector.fraction == 0.3 and selector.n_clusters == 7 and selector.alpha == 0.5
    assert selector.per_cluster == "paper"
