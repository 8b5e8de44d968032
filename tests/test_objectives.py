"""The submodular objectives: formulas on hand-made kernels, our greedy against submodlib, guards;
the FL2MI kernel's orientation and global vs separate normalisation, through the DELIFT selector too."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import scipy.sparse as sp

from delift.errors import DeliftInputError
from delift.objectives import kernel_bounds, maximize, minmax01, objective_value, select
from delift.records import make_record
from delift.selectors import SelectionContext
from delift.selectors.delift import KernelObjectiveSelector

# Asymmetric on purpose: reading it transposed changes every value below.
K = np.array([[1.0, 0.2, 0.5],
              [0.4, 1.0, 0.1],
              [0.0, 0.3, 0.8]])
Q = np.array([[0.6, 0.2],  # pool x target (FLMI); FL2MI reads target x pool, Q.T
              [0.3, 0.9],
              [0.1, 0.4]])
P = np.array([[0.5],  # pool x existing
              [0.2],
              [0.9]])


def value(selected, objective, **kw):
    kernel = None if objective == "fl2mi" else K
    return objective_value(kernel, selected, objective, normalize=False, **kw)


@pytest.mark.parametrize("objective, kw, selected, expected", [
    # fl: sum over rows of the best selected column.
    ("fl", {}, [0], 1.0 + 0.4 + 0.0),
    ("fl", {}, [1, 2], 0.5 + 1.0 + 0.8),
    ("fl", {}, [], 0.0),
    # flmi: row caps eta * max_t Q[i, t] = 0.6, 0.9, 0.4.
    ("flmi", {"query_kernel": Q}, [0], 0.6 + 0.4 + 0.0),
    ("flmi", {"query_kernel": Q}, [1, 2], 0.5 + 0.9 + 0.4),
    ("flmi", {"query_kernel": Q, "eta": 0.5}, [1, 2], 0.3 + 0.45 + 0.2),
    # fl2mi on q = Q.T (target x pool): sum_t max_{j in A} q[t, j] + eta * sum_{j in A} max_t q[t, j].
    ("fl2mi", {"query_kernel": Q.T}, [0], (0.6 + 0.2) + 0.6),
    ("fl2mi", {"query_kernel": Q.T}, [1, 2], (0.3 + 0.9) + (0.9 + 0.4)),
    ("fl2mi", {"query_kernel": Q.T, "eta": 0.5}, [1, 2], (0.3 + 0.9) + 0.5 * (0.9 + 0.4)),
    # flcg: rows already covered by E = 0.5, 0.2, 0.9 (times nu).
    ("flcg", {"private_kernel": P}, [0], 0.5 + 0.2 + 0.0),
    ("flcg", {"private_kernel": P}, [1, 2], 0.0 + 0.8 + 0.0),
    ("flcg", {"private_kernel": P, "nu": 0.5}, [1, 2], 0.25 + 0.9 + 0.35),
])
def test_objective_values_match_the_formulas(objective, kw, selected, expected):
    assert value(selected, objective, **kw) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_normalisation_is_one_joint_min_max():
    assert minmax01(np.array([[1.0, 3.0], [5.0, 9.0]])) == pytest.approx(np.array([[0.0, 0.25], [0.5, 1.0]]))
    assert kernel_bounds(2 * K + 1, 2 * Q + 1) == (1.0, 3.0)
    # K spans [0, 1] and Q [0.1, 0.9]: one min-max over both maps 2x+1 back to exactly K and Q,
    # where separate min-maxes would stretch Q to [0, 1] and change the value.
    assert objective_value(2 * K + 1, [1, 2], "flmi", query_kernel=2 * Q + 1) == pytest.approx(1.8, rel=1e-6)
    assert np.all(minmax01(np.full((3, 3), 7.0)) == 0)


def random_problem(seed: int, n: int, levels: int | None):
    rng = np.random.default_rng(seed)

    def draw(shape):
        x = rng.random(shape)
        if levels:  # a few distinct values: many exactly equal gains, so tie-breaking is exercised
            x = np.round(x * (levels - 1)) / (levels - 1)
        return (x * rng.uniform(0.5, 3) - rng.uniform(0, 2)).astype(np.float32)

    return draw((n, n)), draw((n, 6)), draw((n, 4))


def kernels_for(objective, kernel, query, private):
    return {"fl": dict(kernel=kernel),
            "flmi": dict(kernel=kernel, query_kernel=query),
            "fl2mi": dict(kernel=None, query_kernel=query.T),
            "flcg": dict(kernel=kernel, private_kernel=private)}[objective]


@pytest.mark.parametrize("objective", ["fl", "flmi", "fl2mi", "flcg"])
@pytest.mark.parametrize("seed, n, levels, eta, nu", [
    (0, 60, None, 1.0, 1.0), (1, 97, None, 0.5, 2.0), (2, 80, 3, 1.0, 1.0), (3, 45, 5, 2.0, 0.5), (4, 70, 2, 0.0, 0.0),
])
def test_both_backends_pick_the_same_sequence(objective, seed, n, levels, eta, nu):
    kernel, query, private = random_problem(seed, n, levels)
    kernels = kernels_for(objective, kernel, query, private)
    budget = int(0.3 * n)
    ours = maximize(budget=budget, objective=objective, eta=eta, nu=nu, progress=False, **kernels)
    theirs = maximize(budget=budget, objective=objective, eta=eta, nu=nu, backend="submodlib", progress=False,
                      **kernels)
    assert ours.indices == theirs.indices
    assert ours.gains == pytest.approx(theirs.gains, rel=1e-9, abs=1e-12)
    assert ours.value == pytest.approx(objective_value(objective=objective, selected=ours.indices, eta=eta, nu=nu,
                                                       **kernels), rel=1e-6, abs=1e-9)
    assert all(a >= b for a, b in zip(ours.gains, ours.gains[1:]))  # submodular: gains never grow


@pytest.mark.parametrize("objective", ["fl", "flmi", "fl2mi", "flcg"])
def test_submodlib_reads_the_kernels_in_our_orientation(objective):
    from submodlib import (FacilityLocationConditionalGainFunction, FacilityLocationFunction,
                           FacilityLocationMutualInformationFunction,
                           FacilityLocationVariantMutualInformationFunction)

    k, q, p = K.astype(np.float32), Q.astype(np.float32), P.astype(np.float32)
    function = {
        "fl": lambda: FacilityLocationFunction(n=3, mode="dense", sijs=k, separate_rep=False),
        "flmi": lambda: FacilityLocationMutualInformationFunction(n=3, num_queries=2, data_sijs=k, query_sijs=q,
                                                                  magnificationEta=1.0),
        "fl2mi": lambda: FacilityLocationVariantMutualInformationFunction(n=3, num_queries=2, query_sijs=q,
                                                                          queryDiversityEta=1.0),
        "flcg": lambda: FacilityLocationConditionalGainFunction(n=3, num_privates=1, data_sijs=k, private_sijs=p,
                                                                privacyHardness=1.0),
    }[objective]()
    kw = {"flmi": {"query_kernel": Q}, "fl2mi": {"query_kernel": Q.T}, "flcg": {"private_kernel": P}}.get(objective, {})
    for selected in ([0], [2], [1, 2], [0, 1, 2]):
        assert function.evaluate(set(selected)) == pytest.approx(value(selected, objective, **kw), rel=1e-6)


def test_fl2mi_ignores_a_pool_kernel():
    kernel, query, _ = random_problem(7, 30, None)
    with_kernel = select(kernel, 9, "fl2mi", query_kernel=query.T, progress=False)
    assert with_kernel == select(None, 9, "fl2mi", query_kernel=query.T, progress=False)


@pytest.mark.parametrize("backend", ["ours", "submodlib"])
def test_equal_gains_go_to_the_larger_index_like_submodlib(backend):
    # A constant kernel normalises to zeros: every gain is 0 and the heap pops the largest index.
    assert select(np.ones((5, 5)), 3, "fl", backend=backend, progress=False) == [4, 3, 2]


@pytest.mark.parametrize("backend", ["ours", "submodlib"])
def test_budget_of_the_whole_pool_takes_everything_in_greedy_order(backend, caplog):
    kernel, query, _ = random_problem(5, 12, None)
    with caplog.at_level(logging.WARNING, logger="delift.objectives"):
        result = select(kernel, 50, "flmi", query_kernel=query, backend=backend, progress=False, return_details=True)
    assert "selecting all 12" in caplog.text
    assert sorted(result.indices) == list(range(12))
    assert result.indices[:11] == select(kernel, 11, "flmi", query_kernel=query, progress=False)
    assert result.value == pytest.approx(objective_value(kernel, range(12), "flmi", query_kernel=query), rel=1e-6)


def test_memory_mapped_kernel_gives_the_same_selection(tmp_path):
    kernel, _, _ = random_problem(6, 50, None)
    kernel = minmax01(kernel)
    np.save(tmp_path / "kernel.npy", kernel)
    mapped = np.load(tmp_path / "kernel.npy", mmap_mode="r")
    expected = select(kernel, 15, "fl", progress=False)
    assert select(mapped, 15, "fl", normalize=False, progress=False) == expected
    assert select(mapped, 15, "fl", progress=False) == expected


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_budget_must_be_a_positive_integer(budget):
    with pytest.raises(DeliftInputError, match="budget"):
        select(K, budget, "fl", progress=False)


def test_non_finite_entries_are_named():
    kernel = K.copy()
    kernel[1, 2] = np.nan
    with pytest.raises(DeliftInputError, match=r"field 'kernel'.*entry \[1, 2\] is nan"):
        select(kernel, 1, "fl", progress=False)
    query = Q.copy()
    query[2, 0] = np.inf
    with pytest.raises(DeliftInputError, match=r"field 'query_kernel'.*entry \[2, 0\] is inf"):
        objective_value(K, [0], "flmi", query_kernel=query)


def test_negative_entries_need_normalisation():
    with pytest.raises(DeliftInputError, match=r"entry \[0, 1\] is -0.5.*normalize=False"):
        select(np.array([[1.0, -0.5], [0.2, 0.3]]), 1, "fl", normalize=False, progress=False)
    assert select(np.array([[1.0, -0.5], [0.2, 0.3]]), 1, "fl", progress=False) == [0]


@pytest.mark.parametrize("call, message", [
    (lambda: select(K, 1, "fl3"), "unknown objective"),
    (lambda: select(K, 1, "fl", backend="torch"), "unknown backend"),
    (lambda: select(K, 1, "flmi"), "needs query_kernel"),
    (lambda: select(K[:2, :2], 1, "fl2mi", query_kernel=Q.T), r"must be square \(pool x pool, 3 x 3\)"),
    (lambda: select(K, 1, "fl", private_kernel=P), "does not read private_kernel"),
    (lambda: select(K[:, :2], 1, "fl"), "must be square"),
    (lambda: select(K, 1, "flmi", query_kernel=Q[:2]), "has 2 rows but the pool has 3"),
    (lambda: select(K, 1, "flmi", query_kernel=Q, eta=-1.0), "field 'eta'"),
    (lambda: select(K, 1, "flmi", query_kernel=Q, normalize="per_row"), "field 'normalize'"),
    (lambda: objective_value(K, [0, 3], "fl"), "index 3 is outside"),
    (lambda: objective_value(K, [1, 1], "fl"), "repeated"),
])
def test_bad_arguments_raise_input_errors(call, message):
    with pytest.raises(DeliftInputError, match=message):
        call()


# UF of five records, UF[row][col] = how much demonstration `col` helps `row`; not symmetric.
# Targets helped by the pool (what FL2MI covers), target x pool:
#   t0: p0 1.0, p1 0.0, p2 0.3     t1: p0 0.8, p1 0.2, p2 0.4
# Pool helped by the targets (the other direction, what a pool x target kernel holds):
#   p0: t0 0.1, t1 0.0     p1: t0 1.0, t1 0.9     p2: t0 0.3, t1 0.2
UF = {"t0": {"p0": 1.0, "p1": 0.0, "p2": 0.3}, "t1": {"p0": 0.8, "p1": 0.2, "p2": 0.4},
      "p0": {"t0": 0.1, "t1": 0.0}, "p1": {"t0": 1.0, "t1": 0.9}, "p2": {"t0": 0.3, "t1": 0.2}}


class TableSelector(KernelObjectiveSelector):
    """A kernel selector whose pairwise kernel is looked up in a table of UF by record id."""

    def __init__(self, table, **options):
        super().__init__(**options)
        self.table, self.shapes = table, {}

    def pairwise(self, ctx, rows, cols, details):
        cols = rows if cols is None else cols
        kernel = np.array([[self.table[r["id"]][c["id"]] for c in cols] for r in rows])
        self.shapes[(rows[0]["id"][0], cols[0]["id"][0])] = kernel.shape
        return kernel


def records(*ids):
    return [make_record(i, f"question {i}", "", f"answer {i}") for i in ids]


@pytest.mark.parametrize("backend", ["ours", "submodlib"])
def test_fl2mi_covers_the_targets_with_a_target_x_pool_kernel(backend):
    ctx = SelectionContext(stage="task", pool=records("p0", "p1", "p2"), target=records("t0", "t1"), progress=False)
    selector = TableSelector(UF, fraction=0.6, objective="fl2mi", backend=backend)  # budget round(1.8) = 2
    selection = selector.select(ctx)
    assert selector.shapes == {("t", "p"): (2, 3)}  # rows = the targets helped, columns = the pool
    # The kernel spans [0, 1], so normalisation keeps it. First pick: f({j}) = sum_t q[t, j] + max_t q[t, j]:
    # p0 (1.0 + 0.8) + 1.0 = 2.8, p1 (0.0 + 0.2) + 0.2 = 0.4, p2 (0.3 + 0.4) + 0.4 = 1.1.
    # Then the targets are covered at 1.0, 0.8: p1 adds 0 + 0.2, p2 adds 0 + 0.4.
    assert selection.indices == [0, 2]
    assert selection.scores == pytest.approx([2.8, 0.4], rel=1e-6)
    assert selection.objective_value == pytest.approx((1.0 + 0.8) + (1.0 + 0.4), rel=1e-6)
    # Reading the pool x target kernel instead (UF_p(t) as if it were UF_t(p)) picks p1 first:
    # p0 (0.1 + 0.0) + 0.1 = 0.2, p1 (1.0 + 0.9) + 1.0 = 2.9, p2 (0.3 + 0.2) + 0.3 = 0.8.
    pool_x_target = np.array([[UF[p][t] for t in ("t0", "t1")] for p in ("p0", "p1", "p2")])
    transposed = maximize(None, 2, "fl2mi", query_kernel=pool_x_target.T, backend=backend, progress=False)
    assert transposed.indices[0] == 1 and transposed.gains[0] == pytest.approx(2.9, rel=1e-6)


# Joint and separate min-max differ when the query kernel spans less than the pool kernel. Raw
# kernels 2x + 1 of: S (pool x pool, spans [0, 1]) and C (pool x target, spans [0, 0.5]).
S = np.array([[1.0, 0.0, 0.0],
              [1.0, 0.5, 0.0],
              [0.0, 0.4, 0.2]])
C = np.array([[0.0], [0.5], [0.25]])
RAW_S, RAW_C = 2 * S + 1, 2 * C + 1


@pytest.mark.parametrize("normalize, values, picked", [
    # global: bounds (1, 3) over both give back S and C; FLMI caps = C = 0, 0.5, 0.25.
    #   f({0}) = 0 + min(1, 0.5) + 0 = 0.5; f({1}) = 0 + 0.5 + min(0.4, 0.25) = 0.75; f({2}) = 0 + 0 + 0.2.
    ("global", [0.5, 0.75, 0.2], 1),
    # separate: S keeps (1, 3) -> S, C its own (1, 2) -> 2C, caps 0, 1, 0.5.
    #   f({0}) = 0 + 1 + 0 = 1.0; f({1}) = 0 + 0.5 + 0.4 = 0.9; f({2}) = 0 + 0 + 0.2.
    ("separate", [1.0, 0.9, 0.2], 0),
])
@pytest.mark.parametrize("backend", ["ours", "submodlib"])
def test_global_and_separate_normalisation_pick_differently(normalize, values, picked, backend):
    for j, expected in enumerate(values):
        assert objective_value(RAW_S, [j], "flmi", query_kernel=RAW_C, normalize=normalize) == pytest.approx(expected)
    result = maximize(RAW_S, 1, "flmi", query_kernel=RAW_C, normalize=normalize, backend=backend, progress=False)
    assert result.indices == [picked] and result.value == pytest.approx(max(values), rel=1e-6)
    # A sparse kernel storing every entry is normalised the same way.
    assert select(sp.csr_array(RAW_S), 1, "flmi", query_kernel=sp.csr_array(RAW_C), normalize=normalize,
                  backend=backend, progress=False) == [picked]


def test_global_is_the_default_and_the_selector_passes_normalize_through():
    assert select(RAW_S, 1, "flmi", query_kernel=RAW_C, progress=False) == [1]
    assert select(RAW_S, 1, "flmi", query_kernel=RAW_C, normalize=True, progress=False) == [1]
    table = {f"p{i}": {f"p{j}": RAW_S[i, j] for j in range(3)} | {"t0": RAW_C[i, 0]} for i in range(3)}
    ctx = SelectionContext(stage="task", pool=records("p0", "p1", "p2"), target=records("t0"), progress=False)
    picks = {normalize: TableSelector(table, fraction=0.3, normalize=normalize).select(ctx)  # budget round(0.9) = 1
             for normalize in ("global", "separate")}
    assert picks["global"].info["objective"] == "flmi"  # the task stage's objective
    assert picks["global"].indices == [1] and picks["separate"].indices == [0]
    assert picks["separate"].objective_value == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(DeliftInputError, match="selector.normalize"):
        TableSelector(table, normalize="per_kernel")


class SparseTableSelector(TableSelector):
    """The table's kernels as CSR matrices, read as DELIFT reads approximate kernels."""

    def __init__(self, table, missing, **options):
        super().__init__(table, **options)
        self.missing = missing

    def pairwise(self, ctx, rows, cols, details):
        return sp.csr_matrix(super().pairwise(ctx, rows, cols, details))

    def reading(self, ctx, objective, kernels):
        from delift.utility.kernel import similarity_floor

        return super().reading(ctx, objective, kernels) | {"floor": similarity_floor(kernels, self.missing)}


def test_separate_on_approximate_kernels_reads_each_from_zero_with_missing_neutral():
    table = {f"p{i}": {f"p{j}": RAW_S[i, j] for j in range(3)} | {"t0": RAW_C[i, 0]} for i in range(3)}
    ctx = SelectionContext(stage="task", pool=records("p0", "p1", "p2"), target=records("t0"), progress=False)
    # missing=bottom leaves the min-max to the objectives: every entry is stored, so the dense picks.
    bottom = SparseTableSelector(table, "bottom", fraction=0.3, normalize="separate").select(ctx)
    assert bottom.indices == [0] and bottom.objective_value == pytest.approx(1.0, rel=1e-6)
    # missing=neutral maps UF 0 to 0 and each kernel's own maximum to 1: RAW_S / 3 and RAW_C / 2 = caps
    # 0.5, 1, 0.75; f({0}) = min(1, .5) + min(1, 1) + min(1/3, .75) = 11/6 (f({1}) = 1.6, f({2}) = 17/15).
    neutral = SparseTableSelector(table, "neutral", fraction=0.3, normalize="separate").select(ctx)
    assert neutral.indices == [0] and neutral.objective_value == pytest.approx(11 / 6, rel=1e-6)
