"""DELIFT's submodular objectives and the greedy that maximises them (DESIGN.md 1.2).

Public API
----------
``select(kernel, budget, objective, *, query_kernel=None, private_kernel=None, eta=1.0, nu=1.0,
backend="ours", normalize=True, progress=True, return_details=False) -> list[int] | GreedyResult``
    The selected indices in greedy order (or the whole ``GreedyResult`` with ``return_details``).
``maximize(kernel, budget, objective, *, <same keywords, no return_details>) -> GreedyResult``
    ``GreedyResult(indices, gains, value)``: indices in greedy order, the marginal gain of each
    when it was added, and ``value`` = f(selected) on the normalised kernels (= sum of the gains).
``objective_value(kernel, selected, objective, *, query_kernel=None, private_kernel=None, eta=1.0,
nu=1.0, normalize=True) -> float``
    f(selected) evaluated straight from the formula (float64).
``minmax01(kernel, *, bounds=None) -> np.ndarray`` (float32) and ``kernel_bounds(*kernels) -> (lo, hi)``
    The min-max normalisation to [0, 1]; ``delift.utility`` reuses it.

Orientation
-----------
Every kernel has rows i = the example being helped (covered) and columns j = the candidate
demonstration: ``kernel`` is pool x pool (n x n), ``query_kernel`` pool x target (n x m),
``private_kernel`` pool x existing (n x p). With s = normalised ``kernel``, q = normalised
``query_kernel``, e = normalised ``private_kernel`` and A the selected set (max over an empty set = 0):

- ``fl``    f(A)   = sum_i max_{j in A} s[i, j]
- ``flmi``  f(A)   = sum_i min(max_{j in A} s[i, j], eta * max_t q[i, t])
  (submodlib's FacilityLocationMutualInformationFunction, what the reference code ran: the
  default for the task stage)
- ``fl2mi`` f(A)   = sum_t max_{j in A} q[j, t] + eta * sum_{j in A} max_t q[j, t]
  (the paper's written form; submodlib's FacilityLocationVariantMutualInformationFunction).
  The paper's s_qj is read as q[j, t]: the query kernel is used as given, pool rows x target
  columns. ``kernel`` is not read (None is fine; a pool kernel is only shape-checked).
- ``flcg``  f(A|E) = sum_i max(max_{j in A} s[i, j] - nu * max_e e[i, e], 0)

Normalisation
-------------
One global min-max to [0, 1] taken jointly over all the kernels the objective reads (FLMI takes
a min across ``kernel`` and ``query_kernel``, FLCG a difference across ``kernel`` and
``private_kernel``, so both must stay on one scale). A constant kernel maps to zeros. With
``normalize=False`` the kernels are used as they are and must be non-negative (submodlib
assumes it). Both backends receive the same normalised float32 values.

Backends
--------
``submodlib`` (PyPI submodlib-py 0.0.3, dense mode, LazyGreedy, stop-if-zero/negative-gain off)
copies the kernels into C++ (and, for FLMI/FL2MI/FLCG, through Python lists first: heavy past
~10^4 rows). ``ours`` (default, numpy) makes the same picks in the same order, much faster:

- every candidate's exact gain is kept up to date: adding j only changes the rows whose
  coverage j raises, so a step reads just those kernel rows (in 4 MB blocks) and updates all
  gains at once. The gain terms are the float32 values submodlib sums; the sums are float64,
  compensated, with a count of non-zero terms so that a zero gain is exactly 0;
- submodlib's LazyGreedy is replayed on top: the same stale bounds, popped in (bound, index)
  order, so equal gains are resolved exactly as submodlib resolves them (mostly: to the larger
  index). Like submodlib, per-row query maxima of FLMI/FL2MI are floored at FLT_MIN (1.2e-38)
  instead of 0, which only decides ties among zero gains (eta = 0, or a row whose query entries
  are all the global minimum); ``objective_value`` keeps the plain formula.

Selections agree with submodlib's on every kernel we tested, ties included (tests; and FL on
random kernels up to n = 20,000 in experiments/bench_selection.py); a disagreement would need
two different gains within float64 rounding (~1e-13 relative) of each other. Memory: one
normalised float32 copy of the kernel (n^2 * 4 bytes; none with ``normalize=False`` on a
float32 C-ordered kernel, which may be a read-only memory map) plus a few n-vectors.

Guards: budget < 1, NaN/inf entries, negative entries (normalize=False), wrong shapes or a
missing/unused kernel raise DeliftInputError; budget >= n selects everything (logged), still in
greedy order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from delift.errors import DeliftInputError

log = logging.getLogger(__name__)

OBJECTIVES = ("fl", "flmi", "fl2mi", "flcg")
BACKENDS = ("ours", "submodlib")

# Which kernels each objective reads.
_KERNELS_READ = {
    "fl": ("kernel",),
    "flmi": ("kernel", "query_kernel"),
    "fl2mi": ("query_kernel",),
    "flcg": ("kernel", "private_kernel"),
}

# submodlib starts its per-row query maxima (FLMI, FL2MI) at FLT_MIN, not 0; we do the same so that
# ties among zero gains break identically (it moves f by at most n * 1.2e-38).
_FLT_MIN = float(np.finfo(np.float32).tiny)

# Work blocks hold about this many float32 entries (4 MB), whatever the kernel size.
_BLOCK_ENTRIES = 1 << 20


@dataclass(frozen=True)
class GreedyResult:
    indices: list[int]  # in greedy order
    gains: list[float]  # marginal gain of each index when it was added
    value: float  # f(indices) on the normalised kernels


def select(kernel, budget, objective, *, query_kernel=None, private_kernel=None, eta=1.0, nu=1.0,
           backend="ours", normalize=True, progress=True, return_details=False):
    """Greedy subset of size `budget` maximising `objective`: the indices, or the GreedyResult."""
    result = maximize(kernel, budget, objective, query_kernel=query_kernel, private_kernel=private_kernel,
                      eta=eta, nu=nu, backend=backend, normalize=normalize, progress=progress)
    return result if return_details else result.indices


def maximize(kernel, budget, objective, *, query_kernel=None, private_kernel=None, eta=1.0, nu=1.0,
             backend="ours", normalize=True, progress=True) -> GreedyResult:
    """Run the lazy greedy of `backend` on the (normalised) kernels; see the module docstring."""
    if backend not in BACKENDS:
        raise DeliftInputError(f"unknown backend {backend!r}; expected one of {BACKENDS}", field="backend")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise DeliftInputError(f"must be a positive integer, got {budget!r}", field="budget")
    budget = int(budget)
    problem = _Problem.build(kernel, objective, query_kernel, private_kernel, eta, nu, normalize)
    if budget >= problem.n:
        log.warning("budget %d >= pool size %d: selecting all %d examples", budget, problem.n, problem.n)
        budget = problem.n

    if backend == "ours":
        indices, gains = _lazy_greedy(_CoverageState.build(problem, progress), budget, progress, objective)
    else:
        # submodlib refuses budget >= n: run it to n - 1 and add the one element left.
        indices, gains = [], []
        if problem.n > 1:
            indices, gains = _maximize_submodlib(problem, min(budget, problem.n - 1), progress)
        if budget == problem.n:
            last = (set(range(problem.n)) - set(indices)).pop()
            gains.append(problem.value(list(range(problem.n))) - problem.value(indices))
            indices.append(last)
    return GreedyResult(indices=indices, gains=gains, value=float(np.sum(gains, dtype=np.float64)))


def objective_value(kernel, selected, objective, *, query_kernel=None, private_kernel=None, eta=1.0, nu=1.0,
                    normalize=True) -> float:
    """f(selected) straight from the formula of `objective` (module docstring), in float64."""
    problem = _Problem.build(kernel, objective, query_kernel, private_kernel, eta, nu, normalize)
    chosen = [int(j) for j in selected]
    bad = [j for j in chosen if not 0 <= j < problem.n]
    if bad:
        raise DeliftInputError(f"index {bad[0]} is outside the pool of {problem.n}", field="selected")
    if len(set(chosen)) != len(chosen):
        raise DeliftInputError("contains repeated indices", field="selected")
    return problem.value(chosen)


def kernel_bounds(*kernels) -> tuple[float, float]:
    """Joint (min, max) over `kernels`, scanned in row blocks; NaN/inf raises DeliftInputError."""
    bounds = [_scan_bounds(k, f"kernels[{position}]") for position, k in enumerate(kernels)]
    return min(lo for lo, _ in bounds), max(hi for _, hi in bounds)


def minmax01(kernel, *, bounds=None) -> np.ndarray:
    """A float32 copy of `kernel` mapped to [0, 1] by (x - lo) / (hi - lo); bounds default to its own."""
    kernel = _as_matrix(kernel, "kernel")
    lo, hi = _scan_bounds(kernel, "kernel") if bounds is None else bounds
    out = np.empty(kernel.shape, dtype=np.float32)
    for start, stop in _row_blocks(kernel.shape):
        out[start:stop] = _scale_block(np.asarray(kernel[start:stop]), lo, hi)
    return out


def _scale_block(block: np.ndarray, lo: float, hi: float) -> np.ndarray:
    # Elementwise, so the result does not depend on how the kernel is split into blocks; float64
    # inputs are scaled in float64, everything else in float32.
    if hi <= lo:
        return np.zeros(block.shape, dtype=np.float32)
    dtype = np.float64 if block.dtype == np.float64 else np.float32
    scaled = np.subtract(block, dtype(lo), dtype=dtype)
    np.divide(scaled, dtype(hi - lo), out=scaled)
    return np.clip(scaled, 0.0, 1.0, out=scaled).astype(np.float32, copy=False)


def _row_blocks(shape):
    rows, cols = shape
    step = max(1, _BLOCK_ENTRIES // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _as_matrix(array, name: str) -> np.ndarray:
    # np.asarray keeps a memory map mapped (no copy).
    array = np.asarray(array)
    if array.ndim != 2 or 0 in array.shape:
        raise DeliftInputError(f"must be a non-empty 2-D matrix, got shape {array.shape}", field=name)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DeliftInputError(f"must hold real numbers, got dtype {array.dtype}", field=name)
    return array


def _scan_bounds(array, name: str) -> tuple[float, float]:
    array = _as_matrix(array, name)
    lo, hi = np.inf, -np.inf
    for start, stop in _row_blocks(array.shape):
        block = np.asarray(array[start:stop])
        block_lo, block_hi = block.min(), block.max()
        if not (np.isfinite(block_lo) and np.isfinite(block_hi)):
            i, j = np.argwhere(~np.isfinite(block))[0]
            raise DeliftInputError(f"entry [{start + i}, {j}] is {block[i, j]}; kernels must be finite", field=name)
        lo, hi = min(lo, float(block_lo)), max(hi, float(block_hi))
    return lo, hi


def _first_negative(array, name: str):
    for start, stop in _row_blocks(array.shape):
        block = np.asarray(array[start:stop])
        if (block < 0).any():
            i, j = np.argwhere(block < 0)[0]
            raise DeliftInputError(f"entry [{start + i}, {j}] is {block[i, j]}: with normalize=False every entry "
                                   "must be >= 0 (submodular coverage needs a non-negative kernel)", field=name)


@dataclass
class _Problem:
    """Validated inputs of one objective; hands out normalised float32 rows of its kernels."""

    objective: str
    n: int
    kernels: dict  # name -> raw 2-D array (possibly a memory map)
    eta: float
    nu: float
    bounds: tuple | None  # joint min-max bounds; None when the kernels are used as they are

    @classmethod
    def build(cls, kernel, objective, query_kernel, private_kernel, eta, nu, normalize) -> "_Problem":
        if objective not in OBJECTIVES:
            raise DeliftInputError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}",
                                   field="objective")
        given = {"kernel": kernel, "query_kernel": query_kernel, "private_kernel": private_kernel}
        read = _KERNELS_READ[objective]
        for name, array in given.items():
            if name in read and array is None:
                raise DeliftInputError(f"objective {objective!r} needs {name}", field=name)
            # fl2mi ignores a pool kernel, so callers may pass the same kernels to every objective.
            if name not in read and array is not None and name != "kernel":
                raise DeliftInputError(f"objective {objective!r} does not read {name}; pass None", field=name)
        kernels = {name: _as_matrix(given[name], name) for name in read}
        n = next(iter(kernels.values())).shape[0]
        pool_kernel = kernels.get("kernel", None if kernel is None else _as_matrix(kernel, "kernel"))
        if pool_kernel is not None and pool_kernel.shape != (n, n):
            raise DeliftInputError(f"must be square (pool x pool, {n} x {n}), got shape {pool_kernel.shape}",
                                   field="kernel")
        for name, array in kernels.items():
            if array.shape[0] != n:
                raise DeliftInputError(f"has {array.shape[0]} rows but the pool has {n}", field=name)
        for name, weight in (("eta", eta), ("nu", nu)):
            if not (np.isfinite(weight) and weight >= 0):
                raise DeliftInputError(f"must be a finite number >= 0, got {weight!r}", field=name)

        bounds = [_scan_bounds(array, name) for name, array in kernels.items()]
        lo, hi = min(b[0] for b in bounds), max(b[1] for b in bounds)
        if not normalize and lo < 0:
            for name, array in kernels.items():
                _first_negative(array, name)
        return cls(objective, n, kernels, float(eta), float(nu), (lo, hi) if normalize else None)

    def rows(self, name: str, rows) -> np.ndarray:
        """Float32 rows (a slice or an index array) of kernel `name`, normalised as configured."""
        block = np.asarray(self.kernels[name][rows])
        if self.bounds is None:
            return block.astype(np.float32)
        return _scale_block(block, *self.bounds)

    def row_blocks(self, name: str):
        for start, stop in _row_blocks(self.kernels[name].shape):
            yield start, stop, self.rows(name, slice(start, stop))

    def dense(self, name: str) -> np.ndarray:
        """The whole kernel as a plain C-contiguous float32 array (what submodlib copies from)."""
        out = np.empty(self.kernels[name].shape, dtype=np.float32)
        for start, stop, block in self.row_blocks(name):
            out[start:stop] = block
        return out

    def row_max(self, name: str, weight: float, floor: float = 0.0) -> np.ndarray:
        """max(floor, max_t weight * K[i, t]) per row i, in float32 as submodlib computes it."""
        out = np.empty(self.n, dtype=np.float32)
        for start, stop, block in self.row_blocks(name):
            out[start:stop] = np.maximum((np.float32(weight) * block).max(axis=1), np.float32(floor))
        return out

    def value(self, chosen: list[int]) -> float:
        if self.objective == "fl2mi":
            if not chosen:
                return 0.0
            picked = self.rows("query_kernel", np.asarray(chosen)).astype(np.float64)
            return float(picked.max(axis=0).sum() + self.eta * picked.max(axis=1).sum())
        total = 0.0
        columns = np.asarray(chosen, dtype=np.int64)
        for start, stop, block in self.row_blocks("kernel"):
            covered = block[:, columns].max(axis=1).astype(np.float64) if chosen else np.zeros(stop - start)
            if self.objective == "flmi":
                query = self.rows("query_kernel", slice(start, stop)).max(axis=1).astype(np.float64)
                covered = np.minimum(covered, self.eta * query)
            elif self.objective == "flcg":
                existing = self.rows("private_kernel", slice(start, stop)).max(axis=1).astype(np.float64)
                covered = np.maximum(covered - self.nu * existing, 0.0)
            total += float(covered.sum())
        return total


class _CoverageState:
    """The four objectives as one coverage problem, with every candidate's gain kept up to date.

    `covers[r, j]` is what candidate j offers covered item r: the kernel itself for fl/flmi/flcg
    (covered items = pool rows), the transposed query kernel for fl2mi (covered items = targets).
    A candidate's gain is sum_r term(coverage[r], covers[r, j]) (+ `modular[j]` for fl2mi), with
    term = max(x - c, 0) or, for flmi, min(max(c, x), cap) - min(c, cap), in float32 as submodlib
    computes it. Adding j only changes the terms of the items whose coverage j raises, so each
    step reads just those rows and subtracts their old-minus-new terms from all gains at once.
    """

    def __init__(self, covers, coverage, cap=None, modular=None, progress=True):
        self.covers = covers  # (n_covered, n_candidates) float32, C-contiguous (may be a memory map)
        self.coverage = coverage  # (n_covered,) float32: best value offered so far
        self.cap = cap  # flmi: eta * max_t q[r, t]; coverage beyond it is worth nothing
        self.modular = modular  # fl2mi: eta * max_t q[j, t], added to candidate j's gain
        n_candidates = covers.shape[1]
        # Gains as a compensated float64 sum (high + low part), so thousands of updates do not drift;
        # `positive` counts each candidate's non-zero terms, so a gain of exactly 0 stays exactly 0.
        self.high = np.zeros(n_candidates, dtype=np.float64)
        self.low = np.zeros(n_candidates, dtype=np.float64)
        self.positive = np.zeros(n_candidates, dtype=np.int64)
        # Two reusable work blocks: fresh memory for every block would be slower (page faults).
        size = max(_BLOCK_ENTRIES, n_candidates)
        self._values, self._old = np.empty(size, dtype=np.float32), np.empty(size, dtype=np.float32)
        blocks = list(_row_blocks(covers.shape))
        for start, stop in tqdm(blocks, desc="initial gains", unit="block", disable=not progress or len(blocks) < 2):
            rows = np.arange(start, stop)
            terms = self._terms(self._block(self._old, len(rows)), np.asarray(covers[start:stop]), rows)
            self._accumulate(terms.sum(axis=0, dtype=np.float64))
            self.positive += np.count_nonzero(terms, axis=0)

    @classmethod
    def build(cls, problem: _Problem, progress: bool) -> "_CoverageState":
        if problem.objective == "fl2mi":
            query = problem.dense("query_kernel")
            modular = np.float32(problem.eta) * problem.row_max("query_kernel", 1.0, floor=_FLT_MIN)
            return cls(np.ascontiguousarray(query.T), np.zeros(query.shape[1], dtype=np.float32),
                       modular=modular, progress=progress)
        raw = problem.kernels["kernel"]
        # A float32 C-ordered kernel used as it is (e.g. a memory map) needs no copy.
        use_raw = problem.bounds is None and raw.dtype == np.float32 and raw.flags.c_contiguous
        covers = raw if use_raw else problem.dense("kernel")
        coverage = np.zeros(problem.n, dtype=np.float32)
        if problem.objective == "flmi":
            return cls(covers, coverage, cap=problem.row_max("query_kernel", problem.eta, floor=_FLT_MIN),
                       progress=progress)
        if problem.objective == "flcg":
            # Conditioning on E = starting from the coverage E already provides.
            coverage = np.maximum(problem.row_max("private_kernel", problem.nu), np.float32(0))
        return cls(covers, coverage, progress=progress)

    def _block(self, buffer: np.ndarray, n_rows: int) -> np.ndarray:
        n_candidates = self.covers.shape[1]
        return buffer[:n_rows * n_candidates].reshape(n_rows, n_candidates)

    def _terms(self, out: np.ndarray, values: np.ndarray, rows: np.ndarray, covered=None) -> np.ndarray:
        """Float32 gain terms of covered items `rows` (offered `values`, one row each), written to `out`."""
        covered = (self.coverage[rows] if covered is None else covered)[:, None]
        if self.cap is None:
            np.subtract(values, covered, out=out)
            return np.maximum(out, 0, out=out)
        cap = self.cap[rows][:, None]
        np.maximum(values, covered, out=out)
        np.minimum(out, cap, out=out)
        return np.subtract(out, np.minimum(covered, cap), out=out)

    def _accumulate(self, delta: np.ndarray) -> None:
        # Two-sum: `low` keeps what rounding drops from `high`.
        total = self.high + delta
        back = total - self.high
        self.low += (self.high - (total - back)) + (delta - back)
        self.high = total

    def gains(self) -> np.ndarray:
        gains = np.where(self.positive > 0, self.high + self.low, 0.0)
        return gains if self.modular is None else gains + self.modular

    def add(self, j: int) -> None:
        offered = np.asarray(self.covers[:, j], dtype=np.float32)
        raised = offered > self.coverage
        if self.cap is not None:
            raised &= self.coverage < self.cap  # items already at their cap gain nothing more
        rows = np.flatnonzero(raised)
        step = max(1, _BLOCK_ENTRIES // self.covers.shape[1])
        for start in range(0, len(rows), step):
            block_rows = rows[start:start + step]
            values = self._block(self._values, len(block_rows))
            np.take(self.covers, block_rows, axis=0, out=values)
            old = self._terms(self._block(self._old, len(block_rows)), values, block_rows)
            new = self._terms(values, values, block_rows, covered=offered[block_rows])
            # Terms only shrink as coverage grows: a term leaves the count when it reaches 0.
            self.positive -= np.count_nonzero(old, axis=0) - np.count_nonzero(new, axis=0)
            self._accumulate(new.sum(axis=0, dtype=np.float64) - old.sum(axis=0, dtype=np.float64))
        np.maximum(self.coverage, offered, out=self.coverage)


def _lazy_greedy(state: _CoverageState, budget: int, progress: bool, objective: str):
    """Greedy picks in exactly the order submodlib's LazyGreedy makes them.

    LazyGreedy keeps a max-heap of (stale bound, index) pairs: it pops the largest pair,
    recomputes that candidate's gain and takes it if the gain >= the next bound, else pushes it
    back with the new bound. Which of several equal gains wins depends on those stale bounds, so
    we keep submodlib's bounds too and replay each step's pops (`_replay_lazy_step`), reading the
    gains from `state` instead of recomputing them one by one.
    """
    gains = state.gains()
    bounds = gains.copy()
    taken = np.zeros(len(gains), dtype=bool)
    indices, picked_gains = [], []
    for _ in tqdm(range(budget), desc=f"greedy {objective}", unit="pick", disable=not progress):
        j = _replay_lazy_step(bounds, gains)
        indices.append(j)
        picked_gains.append(float(gains[j]))
        taken[j] = True
        bounds[j] = -np.inf  # out of the heap
        state.add(j)
        gains = state.gains()
        gains[taken] = -np.inf
    return indices, picked_gains


def _replay_lazy_step(bounds: np.ndarray, gains: np.ndarray) -> int:
    """One LazyGreedy step on stale `bounds` (lowered in place as submodlib lowers them) and true `gains`.

    Pops go in decreasing (bound, index) order. At pop k the heap also holds the candidates
    already refreshed in this step; the best of them (R) is popped first if it beats the stale
    head, and is then taken (its fresh gain tops every bound). Otherwise the stale head is
    refreshed and taken if its gain >= max(next stale bound, R's gain). Every candidate whose
    bound is >= the best gain G may be popped; by the first bound below G the candidate holding G
    has been refreshed and wins, so those candidates plus one more (and an empty sentinel) suffice.
    """
    best = gains.max()
    popped = np.flatnonzero(bounds >= best)
    below = np.where(bounds < best, bounds, -np.inf)
    if below.max() > -np.inf:
        popped = np.append(popped, np.flatnonzero(below == below.max()).max())
    order = popped[np.lexsort((-popped, -bounds[popped]))]
    stale = np.append(bounds[order], -np.inf)
    fresh = np.append(gains[order], -np.inf)
    index = np.append(order, -1)

    # R before each pop: running max of (fresh gain, index) over the earlier pops.
    running = np.maximum.accumulate(fresh)
    rises = np.concatenate(([1], (running[1:] > running[:-1]).astype(np.int64))).cumsum()
    width = len(gains) + 1
    tied_index = np.where(fresh == running, index, -1) + 1  # within one running value, the largest index wins
    running_index = np.maximum.accumulate(rises * width + tied_index) % width - 1
    best_before = np.concatenate(([-np.inf], running[:-1]))
    best_before_index = np.concatenate(([-1], running_index[:-1]))

    refreshed_wins = (best_before > stale) | ((best_before == stale) & (best_before_index > index))
    next_stale = np.append(stale[1:], -np.inf)
    head_wins = fresh >= np.maximum(next_stale, best_before)
    k = int(np.flatnonzero(refreshed_wins | head_wins)[0])
    if refreshed_wins[k]:
        chosen, refreshed = int(best_before_index[k]), order[:k]
    else:
        chosen, refreshed = int(index[k]), order[:k + 1]
    bounds[refreshed] = gains[refreshed]
    return chosen


def _maximize_submodlib(problem: _Problem, budget: int, progress: bool):
    from submodlib import (FacilityLocationConditionalGainFunction, FacilityLocationFunction,
                           FacilityLocationMutualInformationFunction,
                           FacilityLocationVariantMutualInformationFunction)

    n = problem.n
    if problem.objective in ("flmi", "flcg") and n * n > 10**8:
        log.warning("submodlib copies the %d x %d kernel through Python lists (about %.0f GB); backend 'ours' "
                    "does not", n, n, n * n * 36 / 2**30)
    if problem.objective == "fl":
        function = FacilityLocationFunction(n=n, mode="dense", sijs=problem.dense("kernel"), separate_rep=False)
    elif problem.objective == "flmi":
        query = problem.dense("query_kernel")
        function = FacilityLocationMutualInformationFunction(n=n, num_queries=query.shape[1],
                                                             data_sijs=problem.dense("kernel"), query_sijs=query,
                                                             magnificationEta=problem.eta)
    elif problem.objective == "fl2mi":
        query = problem.dense("query_kernel")
        function = FacilityLocationVariantMutualInformationFunction(n=n, num_queries=query.shape[1],
                                                                    query_sijs=query,
                                                                    queryDiversityEta=problem.eta)
    else:
        private = problem.dense("private_kernel")
        function = FacilityLocationConditionalGainFunction(n=n, num_privates=private.shape[1],
                                                           data_sijs=problem.dense("kernel"),
                                                           private_sijs=private, privacyHardness=problem.nu)
    picked = function.maximize(budget=budget, optimizer="LazyGreedy", stopIfZeroGain=False,
                               stopIfNegativeGain=False, verbose=False, show_progress=progress)
    return [int(j) for j, _ in picked], [float(g) for _, g in picked]
