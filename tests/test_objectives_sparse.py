"""Sparse (scipy.sparse) kernels in the objectives: min-max over stored entries, unstored = 0,
the same picks as the dense greedy on the densified normalised kernels, O(nnz) on backend "ours"."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import delift.objectives as objectives
from delift.errors import DeliftInputError
from delift.objectives import kernel_bounds, maximize, minmax01, objective_value, select

READS = {"fl": ("kernel",), "flmi": ("kernel", "query_kernel"), "fl2mi": ("query_kernel",),
         "flcg": ("kernel", "private_kernel")}


def sparse_kernel(rng, shape, density, levels=None, empty_rows=0, empty_cols=0, duplicate_cols=0):
    """Random CSR with a random pattern, some rows and columns with nothing stored, some columns
    copied onto others (identical candidates), values on `levels` distinct levels if given."""
    mask = rng.random(shape) < density
    values = rng.random(shape)
    if levels:
        values = np.round(values * (levels - 1)) / (levels - 1)
    values = values * rng.uniform(0.5, 3) - rng.uniform(0, 2)  # negative entries too: normalisation matters
    mask[rng.choice(shape[0], empty_rows, replace=False)] = False
    mask[:, rng.choice(shape[1], empty_cols, replace=False)] = False
    for _ in range(duplicate_cols):
        source, target = rng.choice(shape[1], 2, replace=False)
        mask[:, target], values[:, target] = mask[:, source], values[:, source]
    rows, cols = np.nonzero(mask)
    return sp.csr_array((values[rows, cols].astype(np.float32), (rows, cols)), shape=shape)


def densified(kernels: dict) -> dict:
    """The kernels normalised jointly (sparse: over stored entries), as dense float32, 0 where unstored."""
    bounds = kernel_bounds(*kernels.values())
    out = {}
    for name, kernel in kernels.items():
        scaled = minmax01(kernel, bounds=bounds)
        out[name] = scaled.toarray() if sp.issparse(scaled) else scaled
    return out


def problem(seed, objective, n, density, levels, layout):
    """The kernels `objective` reads; `layout` says which are sparse ("s") or dense ("d")."""
    rng = np.random.default_rng(seed)
    # FL2MI's query kernel is target x pool: the pool (the candidates) is its columns.
    shapes = {"kernel": (n, n), "query_kernel": (6, n) if objective == "fl2mi" else (n, 6), "private_kernel": (n, 4)}
    kernels = {}
    for name, kind in zip(READS[objective], layout):
        rows, cols = shapes[name]
        duplicates = n // 6 if cols == n else 1  # identical candidates: equal gains
        kernel = sparse_kernel(rng, shapes[name], density, levels, empty_rows=max(1, rows // 8),
                               empty_cols=max(1, cols // 8), duplicate_cols=duplicates)
        kernels[name] = kernel if kind == "s" else kernel.toarray() * 0.5 + 0.1  # dense: every entry counts
    return kernels


CASES = [  # seed, n, density, levels, eta, nu, budget
    (0, 60, 0.15, None, 1.0, 1.0, 20),
    (1, 50, 0.3, 3, 1.0, 1.0, 50),   # few levels: many exactly equal gains; budget = n
    (2, 40, 0.08, 2, 0.5, 2.0, 100),  # very sparse, 0/1 values: most gains reach 0; budget > n
    (3, 45, 0.25, 5, 0.0, 0.0, 30),  # eta = nu = 0
]
LAYOUTS = {"fl": ["s"], "flmi": ["ss", "sd", "ds"], "fl2mi": ["s"], "flcg": ["ss", "sd", "ds"]}


@pytest.mark.parametrize("objective, layout", [(o, lay) for o, lays in LAYOUTS.items() for lay in lays])
@pytest.mark.parametrize("seed, n, density, levels, eta, nu, budget", CASES)
def test_sparse_picks_equal_dense_picks_on_the_densified_normalised_kernels(objective, layout, seed, n, density,
                                                                              levels, eta, nu, budget):
    kernels = problem(seed, objective, n, density, levels, layout)
    dense = densified(kernels)
    kw = dict(budget=budget, objective=objective, eta=eta, nu=nu, progress=False)
    if objective == "fl2mi":
        kernels, dense = {"kernel": None, **kernels}, {"kernel": None, **dense}
    ours = maximize(**kernels, **kw)
    reference = maximize(**dense, normalize=False, **kw)
    assert ours.indices == reference.indices
    assert ours.gains == pytest.approx(reference.gains, rel=1e-5, abs=1e-9)
    assert ours.value == pytest.approx(reference.value, rel=1e-5, abs=1e-9)
    assert len(ours.indices) == min(budget, n) and len(set(ours.indices)) == len(ours.indices)
    assert ours.value == pytest.approx(objective_value(selected=ours.indices, objective=objective, eta=eta, nu=nu,
                                                       **kernels), rel=1e-5, abs=1e-9)


def test_ties_are_exercised_and_resolved_like_dense():
    # Guard on the cases above: equal gains do occur (so tie-breaking is what is being compared).
    kernels = problem(1, "fl", 50, 0.3, 3, "s")
    gains = maximize(**kernels, budget=50, objective="fl", progress=False).gains
    assert len(gains) - len(set(gains)) > 10
    assert gains.count(0.0) > 0


@pytest.mark.parametrize("objective, layout", [("fl", "s"), ("flmi", "sd"), ("fl2mi", "s"), ("flcg", "ss")])
def test_objective_value_is_the_dense_formula_on_the_densified_kernels(objective, layout):
    kernels = problem(5, objective, 30, 0.2, None, layout)
    dense = densified(kernels)
    if objective == "fl2mi":
        kernels, dense = {"kernel": None, **kernels}, {"kernel": None, **dense}
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 30):
        chosen = list(rng.choice(30, size, replace=False))
        expected = objective_value(selected=chosen, objective=objective, normalize=False, eta=0.7, nu=0.6, **dense)
        got = objective_value(selected=chosen, objective=objective, eta=0.7, nu=0.6, **kernels)
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert size < 7 or got > 0  # one candidate may store nothing (an empty column)


def test_minmax01_scales_the_stored_entries_and_keeps_the_structure():
    kernel = sp.coo_array((np.array([1.0, 3.0, 2.0, 5.0, 9.0]), (np.array([0, 0, 0, 1, 2]), np.array([2, 0, 2, 1, 0]))),
                          shape=(3, 3))  # [0, 2] stored twice: summed to 3
    scaled = minmax01(kernel)
    assert isinstance(scaled, sp.csr_array) and scaled.dtype == np.float32 and scaled.nnz == 4
    assert scaled.toarray() == pytest.approx(np.array([[0.0, 0.0, 0.0], [0.0, 1 / 3, 0.0], [1.0, 0.0, 0.0]]))
    # The stored 3 maps to 0 (it is the minimum) and stays stored; unstored entries were never read.
    assert kernel_bounds(kernel) == (3.0, 9.0)
    assert kernel_bounds(kernel, np.array([[4.0, 11.0]])) == (3.0, 11.0)  # jointly with a dense one
    assert minmax01(kernel, bounds=(1.0, 5.0)).toarray()[2, 0] == 1.0  # clipped
    assert kernel_bounds(sp.csr_array((2, 2)), np.array([[4.0]])) == (4.0, 4.0)  # nothing stored: no bounds
    # A caller's matrix with duplicates is not modified in place.
    raw = sp.csr_matrix((np.array([1.0, 2.0, 4.0]), np.array([1, 1, 0]), np.array([0, 2, 3])), shape=(2, 2))
    minmax01(raw)
    assert raw.nnz == 3 and list(raw.data) == [1.0, 2.0, 4.0]


def test_fully_stored_sparse_kernel_gives_the_dense_selection():
    # With every entry stored, "min-max over stored entries" is the dense min-max.
    rng = np.random.default_rng(3)
    kernel = (rng.random((40, 40)) * 4 - 1).astype(np.float32)
    query = (rng.random((40, 5)) * 2).astype(np.float32)
    expected = select(kernel, 15, "flmi", query_kernel=query, progress=False)
    for matrix in (sp.csr_array(kernel), sp.csc_matrix(kernel), sp.coo_array(kernel)):
        assert select(matrix, 15, "flmi", query_kernel=sp.csr_array(query), progress=False) == expected
    # float64 stays float64 until scaled, as a dense float64 kernel does.
    kernel64 = kernel.astype(np.float64) / 3
    assert select(sp.csr_array(kernel64), 15, "fl", progress=False) == select(kernel64, 15, "fl", progress=False)


def test_empty_sparse_kernel_is_all_zero_gains():
    result = maximize(sp.csr_array((5, 5), dtype=np.float32), 5, "fl", progress=False)
    assert result.indices == [4, 3, 2, 1, 0] and result.gains == [0.0] * 5 and result.value == 0.0


def test_ours_never_densifies_a_sparse_kernel(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("densified a sparse kernel")

    monkeypatch.setattr(objectives._Problem, "rows", refuse)
    monkeypatch.setattr(objectives._Problem, "dense", refuse)
    monkeypatch.setattr(sp.csr_array, "toarray", refuse)
    monkeypatch.setattr(sp.csr_array, "todense", refuse)
    for objective in READS:
        kernels = problem(7, objective, 50, 0.1, None, "ss")
        if objective == "fl2mi":
            kernels["kernel"] = None
        result = maximize(**kernels, budget=20, objective=objective, progress=False)
        assert len(result.indices) == 20
        assert result.value == pytest.approx(objective_value(selected=result.indices, objective=objective, **kernels),
                                             rel=1e-5)


@pytest.mark.parametrize("objective, layout", [("fl", "s"), ("flmi", "sd"), ("flcg", "ss")])
def test_submodlib_backend_densifies_a_sparse_kernel(objective, layout):
    # (flmi with empty query rows is left out: their caps are FLT_MIN, and submodlib's FLT_MIN-sized
    # gains are below the float64 rounding of either greedy's sums: dense kernels share that.)
    kernels = problem(8, objective, 40, 0.2, 3, layout)
    ours = maximize(**kernels, budget=15, objective=objective, progress=False)
    theirs = maximize(**kernels, budget=15, objective=objective, backend="submodlib", progress=False)
    assert ours.indices == theirs.indices
    assert ours.gains == pytest.approx(theirs.gains, rel=1e-6, abs=1e-9)


def test_non_finite_stored_entries_are_named():
    kernel = sp.csr_array(np.array([[1.0, 0.0, 0.5], [0.0, 1.0, np.nan], [0.0, 0.3, 0.8]]))
    with pytest.raises(DeliftInputError, match=r"field 'kernel'.*entry \[1, 2\] is nan"):
        select(kernel, 1, "fl", progress=False)
    query = sp.coo_array((np.array([0.5, np.inf]), (np.array([0, 2]), np.array([1, 0]))), shape=(3, 2))
    with pytest.raises(DeliftInputError, match=r"field 'query_kernel'.*entry \[2, 0\] is inf"):
        objective_value(np.eye(3), [0], "flmi", query_kernel=query)
    with pytest.raises(DeliftInputError, match=r"entry \[1, 2\] is nan"):
        minmax01(kernel)


def test_negative_stored_entries_need_normalisation():
    kernel = sp.csr_array((np.array([1.0, -0.5, 0.3]), (np.array([0, 1, 1]), np.array([0, 0, 1]))), shape=(2, 2))
    with pytest.raises(DeliftInputError, match=r"entry \[1, 0\] is -0.5.*normalize=False"):
        select(kernel, 1, "fl", normalize=False, progress=False)
    assert select(kernel, 1, "fl", progress=False) == [0]  # normalised: 1 -> 1, -0.5 -> 0, 0.3 -> 0.53


@pytest.mark.parametrize("call, message", [
    (lambda: select(sp.csr_array((3, 2)), 1, "fl"), "must be square"),
    (lambda: select(sp.csr_array(np.eye(3)), 1, "flmi", query_kernel=sp.csr_array((2, 2))), "has 2 rows"),
    (lambda: select(sp.csr_array((0, 0)), 1, "fl"), "non-empty"),
    (lambda: select(sp.csr_array(np.eye(2, dtype=bool)), 1, "fl"), "real numbers"),
])
def test_bad_sparse_arguments_raise_input_errors(call, message):
    with pytest.raises(DeliftInputError, match=message):
        call()


# --- The zero-gain shortcut: once every gain is 0 for good, the rest of the order is derived at once.

@pytest.mark.parametrize("seed", range(40))
def test_zero_gain_tail_is_what_the_replay_would_pick(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 25))
    # Stale bounds with ties, zeros, a few negatives (rounding); some candidates already taken.
    bounds = rng.choice([0.0, 0.0, 0.25, 0.5, 0.5, 1.0, -1e-17], n) if seed % 2 else rng.random(n) * (seed % 3)
    taken = rng.random(n) < 0.3
    bounds[taken] = -np.inf
    expected, replayed = [], bounds.copy()
    for _ in range(int((~taken).sum())):
        gains = np.where(replayed == -np.inf, -np.inf, 0.0)
        j = objectives._replay_lazy_step(replayed, gains)
        expected.append(j)
        replayed[j] = -np.inf
    assert list(objectives._zero_gain_tail(bounds, taken)) == expected


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("objective", ["fl", "flmi", "fl2mi", "flcg"])
def test_zero_gain_shortcut_keeps_the_pick_order(kind, objective, monkeypatch):
    # 0/1 kernels, sparse and with duplicated columns: every gain reaches exactly 0 well before the end.
    kernels = problem(11, objective, 45, 0.06, 2, "ss")
    if kind == "dense":
        kernels = densified(kernels)
    if objective == "fl2mi":
        kernels["kernel"] = None
    kw = dict(budget=45, objective=objective, eta=0.0 if objective == "fl2mi" else 1.0, progress=False)
    tails = []
    tail = objectives._zero_gain_tail
    monkeypatch.setattr(objectives, "_zero_gain_tail", lambda bounds, taken: tails.append(tail(bounds, taken))
                        or tails[-1])
    fast = maximize(**kernels, **kw)
    assert len(tails) == 1 and len(tails[0]) >= 10  # the shortcut did take over, for 10+ picks
    monkeypatch.setattr(objectives, "_ZERO_GAIN_SHORTCUT", False)
    slow = maximize(**kernels, **kw)
    assert fast.indices == slow.indices and fast.gains == slow.gains
    assert slow.gains[-len(tails[0]):] == [0.0] * len(tails[0])
