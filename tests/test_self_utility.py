"""Self-utility and normalisation as choices: hand-computed kernels where the diagonal dominates, the
row and source min-max formulas, and the knn graph's own pair beside k *other* neighbours."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hydra.utils import instantiate

from delift.errors import DeliftInputError
from delift.objectives import maximize, objective_value, select, self_coverage_share
from delift.records import make_record
from delift.selectors import SelectionContext
from delift.selectors.delift import KernelObjectiveSelector
from delift.utility.graph import candidate_graph
from tests.helpers import compose_config

# Row i = the record helped, column j = the demonstration. Records 0-2 copy their own answers well (a large
# diagonal) and help nobody; record 3 helps 0, 1 and 4, record 4 helps 2 and 3.
DOMINANT = np.array([
    [0.95, 0.0, 0.0, 0.3, 0.0],
    [0.0, 0.8, 0.0, 0.3, 0.0],
    [0.0, 0.0, 0.7, 0.0, 0.3],
    [0.0, 0.0, 0.0, 0.1, 0.2],
    [0.0, 0.0, 0.0, 0.2, 0.1],
])
# One target (FLMI) and one existing record (FLCG), chosen so that neither changes the picks: FLMI's caps
# (0.95, the kernel's top) never bind; the existing record helps nobody.
TARGET = np.full((5, 1), 0.95)
EXISTING = np.zeros((5, 1))
SIDE = {"fl": {}, "flmi": {"query_kernel": TARGET}, "flcg": {"private_kernel": EXISTING}}


def every_entry(dense: np.ndarray) -> sp.csr_array:
    """A sparse kernel storing every entry, zeros included: read exactly as the dense one."""
    rows, cols = np.indices(dense.shape)
    return sp.csr_array((dense.ravel(), (rows.ravel(), cols.ravel())), shape=dense.shape)


@pytest.mark.parametrize("objective", ["fl", "flmi", "flcg"])
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("backend", ["ours", "submodlib"])
def test_include_takes_the_top_diagonal_and_exclude_the_covering_records(objective, sparse, backend):
    as_kernel = every_entry if sparse else np.asarray
    side = {name: as_kernel(k) for name, k in SIDE[objective].items()}
    # include (scale 0..0.95): f({0}) = 0.95 / 0.95 = 1 beats f({3}) = (0.3 + 0.3 + 0.1 + 0.2) / 0.95; then
    # record 1's own 0.8 beats 3's or 4's gain on the others (0.6): the two largest diagonal entries.
    include = maximize(as_kernel(DOMINANT), 2, objective, self_utility="include", backend=backend, progress=False,
                       **side)
    assert include.indices == [0, 1]
    assert include.value == pytest.approx((0.95 + 0.8) / 0.95, rel=1e-6)
    # exclude: only the others count. f({3}) = 0.3 + 0.3 + 0.2 beats f({4}) = 0.3 + 0.2 (on the
    # flmi scale 0..0.95 as above; on fl and flcg the off-diagonal range 0..0.3).
    exclude = maximize(as_kernel(DOMINANT), 2, objective, self_utility="exclude", backend=backend, progress=False,
                       **side)
    assert exclude.indices == [3, 4]
    top = 0.95 if objective == "flmi" else 0.3
    assert exclude.value == pytest.approx((0.8 + 0.5) / top, rel=1e-6)
    assert objective_value(as_kernel(DOMINANT), [3, 4], objective, self_utility="exclude",
                           **side) == pytest.approx(exclude.value, rel=1e-6)


def test_a_sparse_kernel_without_explicit_zeros_selects_as_its_densified_normalised_kernel():
    stored = sp.csr_array(DOMINANT)  # zeros unstored: the min-max runs over the stored entries
    for self_utility, lo in (("include", 0.1), ("exclude", 0.2)):
        densified = np.where(DOMINANT > 0, np.clip((DOMINANT - lo) / (0.95 - lo if self_utility == "include"
                                                                      else 0.3 - lo), 0, 1), 0.0)
        if self_utility == "exclude":
            np.fill_diagonal(densified, 0.0)
        expected = select(densified, 3, "fl", normalize=False, progress=False)
        assert select(stored, 3, "fl", self_utility=self_utility, progress=False) == expected
    assert DOMINANT[0, 0] == 0.95 and stored.nnz == 10  # the caller's kernels are untouched


def test_self_coverage_share_is_the_value_the_diagonal_adds():
    # {0, 1}: all of f comes from the two records covering themselves.
    assert self_coverage_share(DOMINANT, [0, 1], "fl") == pytest.approx(1.0)
    # {0, 3}: f = (0.95 + 0.3 + 0.1 + 0.2) / 0.95; without the diagonal (0.3 + 0.3 + 0.2) / 0.95.
    assert self_coverage_share(DOMINANT, [0, 3], "fl") == pytest.approx(1 - 0.8 / 1.55)
    assert self_coverage_share(every_entry(DOMINANT), [0, 3], "fl") == pytest.approx(1 - 0.8 / 1.55)
    assert self_coverage_share(DOMINANT, [2], "flcg", private_kernel=EXISTING) == pytest.approx(1.0)
    assert self_coverage_share(None, [0], "fl2mi", query_kernel=TARGET.T) is None


K = np.array([[1.0, 3.0, 5.0],
              [2.0, 2.0, 6.0],
              [0.0, 4.0, 8.0]])


@pytest.mark.parametrize("normalize, self_utility, groups, values", [
    # one scale 0..8: f({j}) = column sum / 8
    ("global", "include", None, [3 / 8, 9 / 8, 19 / 8]),
    # each row by its own range: row 0 (1..5) [0, .5, 1], row 1 (2..6) [0, 0, 1], row 2 (0..8) [0, .5, 1]
    ("row", "include", None, [0.0, 1.0, 3.0]),
    # the diagonal left out of both the range and the coverage: row 0 (3..5) [., 0, 1], row 1 (2..6) [0, ., 1],
    # row 2 (0..4) [0, 1, .]
    ("row", "exclude", None, [0.0, 1.0, 2.0]),
    # per source: rows 0-1 (source a) share 1..6: [0, .4, .8] and [.2, .2, 1]; row 2 (b) 0..8: [0, .5, 1]
    ("source", "include", ["a", "a", "b"], [0.2, 1.1, 2.8]),
    # per source without the diagonal: a's off-diagonal entries 3, 5, 2, 6 (2..6): [., .25, .75], [0, ., 1];
    # b's 0, 4 (0..4): [0, 1, .]
    ("source", "exclude", ["a", "a", "b"], [0.0, 1.25, 1.75]),
])
def test_row_and_source_normalisation_equal_their_formulas(normalize, self_utility, groups, values):
    for j, expected in enumerate(values):
        got = objective_value(K, [j], "fl", normalize=normalize, self_utility=self_utility, groups=groups)
        assert got == pytest.approx(expected)
        assert objective_value(every_entry(K), [j], "fl", normalize=normalize, self_utility=self_utility,
                               groups=groups) == pytest.approx(expected)


def test_row_normalisation_spans_every_kernel_a_row_is_read_in():
    query = np.array([[9.0], [0.0], [4.0]])
    # Row 0 over K and the query: 1..9, so K reads [0, .25, .5] and its cap 1; row 1: 0..6, [1/3, 1/3, 1],
    # cap 0; row 2: 0..8, [0, .5, 1], cap .5. FLMI f({2}) = min(.5, 1) + min(1, 0) + min(1, .5).
    assert objective_value(K, [2], "flmi", query_kernel=query, normalize="row") == pytest.approx(1.0)
    assert objective_value(K, [1], "flmi", query_kernel=query, normalize="row") == pytest.approx(0.75)


def test_source_normalisation_needs_a_group_per_row():
    with pytest.raises(DeliftInputError, match="one group"):
        objective_value(K, [0], "fl", normalize="source", groups=["a", "b"])
    with pytest.raises(DeliftInputError, match="self_utility"):
        objective_value(K, [0], "fl", self_utility="sometimes")


def test_knn_graph_holds_each_row_and_k_other_neighbours():
    angles = np.radians([0, 10, 20, 90, 100])
    vectors = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    graph = candidate_graph(vectors, vectors, 2, self_pairs=True)
    rows = [graph.indices[graph.indptr[i]:graph.indptr[i + 1]].tolist() for i in range(5)]
    # Row 0's nearest others are 1 (10 deg) and 2 (20 deg); row 3's are 4 (10 deg) and 2 (70 deg).
    assert rows == [[0, 1, 2], [0, 1, 2], [0, 1, 2], [2, 3, 4], [2, 3, 4]]
    plain = candidate_graph(vectors, vectors, 2)  # different record sets: the 2 nearest, whatever they are
    assert plain.indices[plain.indptr[0]:plain.indptr[1]].tolist() == [0, 1]


class TableSelector(KernelObjectiveSelector):
    def pairwise(self, ctx, rows, cols, details):
        return DOMINANT


def test_the_selector_passes_self_utility_and_normalisation_through():
    pool = [make_record(f"r{i}", f"question {i}", "", f"answer {i}", source="s") for i in range(5)]
    ctx = SelectionContext(stage="instruction", pool=pool, progress=False)
    picks = {choice: TableSelector(fraction=0.4, self_utility=choice).select(ctx) for choice in ("include", "exclude")}
    assert picks["include"].indices == [0, 1] and picks["exclude"].indices == [3, 4]
    assert picks["exclude"].info["self_utility"] == "exclude" and picks["exclude"].info["normalize"] == "global"
    with pytest.raises(DeliftInputError, match="selector.self_utility"):
        TableSelector(self_utility="maybe")


@pytest.mark.parametrize("name, self_utility, normalize", [
    ("delift", "exclude", "global"), ("delift_reference", "include", "separate"),
    ("delift_include_global", "include", "global"), ("delift_exclude_global", "exclude", "global"),
    ("delift_exclude_row", "exclude", "row"), ("delift_se", "include", "global"),
])
def test_the_delift_variants_compose(name, self_utility, normalize):
    selector = instantiate(compose_config([f"selector={name}"]).selector)
    assert (selector.self_utility, selector.normalize) == (self_utility, normalize)
