"""DELIFT's submodular objectives and the greedy that maximises them (DELIFT, ICLR 2025).

Public API
----------
``select(kernel, budget, objective, *, query_kernel=None, private_kernel=None, eta=1.0, nu=1.0,
backend="ours", normalize="global", self_utility="include", groups=None, floor="min", progress=True,
return_details=False) -> list[int] | GreedyResult``
    The selected indices in greedy order (or the whole ``GreedyResult`` with ``return_details``).
``maximize(kernel, budget, objective, *, <same keywords, no return_details>) -> GreedyResult``
    ``GreedyResult(indices, gains, value)``: indices in greedy order, the marginal gain of each
    when it was added, and ``value`` = f(selected) on the normalised kernels (= sum of the gains).
``objective_value(kernel, selected, objective, *, query_kernel=None, private_kernel=None, eta=1.0,
nu=1.0, normalize="global", self_utility="include", groups=None, floor="min") -> float``
    f(selected) evaluated straight from the formula (float64).
``self_coverage_share(kernel, selected, objective, *, <the same keywords but self_utility>) -> float | None``
    The share of f(selected), read with the diagonal included, that records earn by covering
    themselves (None for fl2mi).
``minmax01(kernel, *, bounds=None) -> np.ndarray`` (float32) and ``kernel_bounds(*kernels) -> (lo, hi)``
    The min-max normalisation to [0, 1]; ``delift.utility`` reuses it.

Every kernel may be a dense array (or memory map) or a ``scipy.sparse`` matrix/array of any
format, in any combination (e.g. a sparse kNN pool kernel with a dense query kernel). A sparse
kernel is read as canonical CSR (a copy unless it is one: duplicates summed; float64 kept, else float32);
an entry it does not store means similarity 0 after normalisation (as in submodlib's sparse
mode). ``minmax01`` of a sparse kernel is a float32 ``scipy.sparse.csr_array`` with the same
stored entries.

Orientation
-----------
Every kernel has rows i = the example being helped (covered) and columns j = the candidate
demonstration, as ``delift.utility.compute_kernel(rows, cols)`` returns it (UF[i, j] = how much
demonstration j helps example i; UF is not symmetric): ``kernel`` is pool x pool (n x n),
``query_kernel`` pool x target (n x m) for FLMI but target x pool (m x n) for FL2MI (there the
targets are the covered items), ``private_kernel`` pool x existing (n x p). With s = normalised
``kernel``, q = normalised ``query_kernel``, e = normalised ``private_kernel`` and A the selected
set (max over an empty set = 0):

- ``fl``    f(A)   = sum_i max_{j in A} s[i, j]
- ``flmi``  f(A)   = sum_i min(max_{j in A} s[i, j], eta * max_t q[i, t])
  (submodlib's FacilityLocationMutualInformationFunction, what the reference code ran: the
  default for the task stage)
- ``fl2mi`` f(A)   = sum_t max_{j in A} q[t, j] + eta * sum_{j in A} max_t q[t, j]
  (the paper's written form, sum_{q in Q} max_{j in A} s_qj + eta sum_{j in A} max_{q in Q} s_qj,
  with s_qj = UF_q(j): how much pool example j helps target q). This is submodlib's
  FacilityLocationVariantMutualInformationFunction exactly: it takes one query kernel
  ``query_sijs`` of shape n x num_queries (ground-set rows, query columns) and computes
  sum_q max_{j in A} K[j][q] + eta * sum_{j in A} max_q K[j][q] (cpp/smi/
  FacilityLocationVariantMutualInformation.cpp, ``evaluate``), so both terms read the same entry
  per pair; backend ``submodlib`` is given q transposed. ``kernel`` is not read (None is fine; a
  pool kernel is only shape-checked).
- ``flcg``  f(A|E) = sum_i max(max_{j in A} s[i, j] - nu * max_e e[i, e], 0)

Self-utility
------------
A pool kernel's diagonal is each record's utility as its own demonstration, UF_i(i): with itself in
the prompt the model can copy its answer, so it is the largest entry of nearly every row, and FL with
it ranks records by how copyable they are rather than by how they help the others.
``self_utility="exclude"`` takes it out of the objective: s[i, i] is read as 0 (a sparse kernel's
stored diagonal is dropped) and left out of the normalisation's ranges, so a row is covered only by
*other* selected records. ``"include"`` (the reference code) keeps it. Only the pool kernel has a
diagonal: the query and existing kernels pair different records, and fl2mi reads no pool kernel.

Normalisation
-------------
Every kernel is min-maxed to [0, 1] before the greedy, s = clip((x - lo) / (hi - lo), 0, 1) (0 where
hi <= lo), with the ranges taken over the entries the objective reads (the diagonal left out under
exclude):

- ``"global"`` (default; ``True`` means the same): one (lo, hi) over all the kernels. FLMI takes a
  min across ``kernel`` and ``query_kernel``, FLCG a difference across ``kernel`` and
  ``private_kernel``: one common increasing affine map keeps those comparisons as they are on the
  raw kernels, so eta and nu weigh values on one scale whatever the data.
- ``"separate"``: each kernel over its own range, as the DELIFT reference code does
  (subset_selection/subset_fl.py); it stretches a kernel of narrow range (e.g. a query kernel whose
  values all sit below the pool kernel's) to [0, 1], which changes which FLMI cap binds or how much
  of the FLCG coverage the existing data already gives. FL and FL2MI read one kernel, so there it
  equals global.
- ``"row"``: each covered row i over its own range (lo_i, hi_i), taken across every kernel the row
  is read in (so FLMI's min and FLCG's difference stay on one scale within the row): every
  record's coverage counts alike, whatever the scale of its source's utilities.
- ``"source"``: rows grouped by ``groups`` (their source), each group over its range.
- ``False``: the kernels are used as they are and must be non-negative (submodlib assumes it).

``floor="zero"`` fixes lo at 0 (UF 0, "no help", maps to 0 and harmful pairs are clipped to it):
how the DELIFT selector reads approximate kernels with ``missing="neutral"``. Both backends receive
the same normalised float32 values.

Sparse kernels: the min-max runs over the stored entries only (jointly with every entry of the
dense kernels read, or per kernel, row or source as configured), a stored x becomes
clip((x - lo) / (hi - lo), 0, 1) and an unstored entry stays 0, whatever lo is. So a sparse
kernel gives exactly the selection (same indices, same order, gains equal to float rounding) of
the dense kernel that holds its normalised entries and 0 elsewhere, run with
``normalize=False``; a sparse kernel that stores every entry gives the dense result. With
``normalize=False`` the stored entries must be >= 0. A sparse kernel storing nothing adds no
bounds (``kernel_bounds`` of it alone is (inf, -inf); every gain is then 0).

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
  are all the global minimum, or 0: with a sparse query kernel, any row storing none); such
  FLT_MIN-sized gains sit below the rounding of the float64 sums, so there submodlib's order
  among near-zero gains may differ. ``objective_value`` keeps the plain formula;
- once every gain left is exactly 0 for good (no non-zero term, no FL2MI modular part), the
  rest of LazyGreedy's order is derived at once (`_zero_gain_tail`) instead of one replay per
  pick; the picks are the same;
- a sparse kernel (the pool kernel; for FL2MI the query kernel) is kept as CSR twice, by
  covered item and by candidate, and only stored entries have gain terms (an unstored one's is
  exactly 0): a step reads the rows of the items the new pick covers better and touches only
  the candidates stored there (`_SparseCoverageState`). ``submodlib`` on a sparse kernel copies
  it dense first (n^2 memory, like any kernel there).

Selections agree with submodlib's on every kernel we tested, ties included (tests; and FL on
random kernels up to n = 20,000 in experiments/bench_selection.py); a disagreement would need
two different gains within float64 rounding (~1e-13 relative) of each other. Memory: one
normalised float32 copy of the kernel (n^2 * 4 bytes; none with ``normalize=False`` on a
float32 C-ordered kernel, which may be a read-only memory map) plus a few n-vectors. A sparse
kernel costs O(nnz) instead: a CSR copy, its normalised float32 CSR and the transposed CSR
(about 3 x nnz x 8 bytes) plus a few n-vectors; no n x n array is ever built on backend
``ours`` (FL, n = 100,000, 16 stored entries a row, budget 30,000: 44 s, 0.18 GB peak RSS on
this 2-core machine).

Guards: budget < 1, NaN/inf entries, negative entries (normalize=False), wrong shapes, a
missing/unused kernel, an unknown ``normalize``, ``self_utility`` or ``floor``, or ``groups`` that do
not match the rows under ``normalize="source"`` raise DeliftInputError; budget >= n selects
everything (logged), still in greedy order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np
import scipy.sparse
from tqdm.auto import tqdm

from delift.errors import DeliftInputError

log = logging.getLogger(__name__)

Objective = Literal["fl", "flmi", "fl2mi", "flcg"]
Backend = Literal["ours", "submodlib"]
Normalization = Literal["global", "separate", "row", "source"]
SelfUtility = Literal["include", "exclude"]
Floor = Literal["min", "zero"]  # what maps to 0: each range's minimum, or UF 0 (negatives clipped)
Missing = Literal["neutral", "bottom"]  # how an approximate (sparse) kernel's unmeasured pair is read
OBJECTIVES, BACKENDS, NORMALIZATIONS = get_args(Objective), get_args(Backend), get_args(Normalization)
SELF_UTILITIES, FLOORS = get_args(SelfUtility), get_args(Floor)

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
           backend="ours", normalize="global", self_utility="include", groups=None, floor="min", progress=True,
           return_details=False):
    """Greedy subset of size `budget` maximising `objective`: the indices, or the GreedyResult."""
    result = maximize(kernel, budget, objective, query_kernel=query_kernel, private_kernel=private_kernel,
                      eta=eta, nu=nu, backend=backend, normalize=normalize, self_utility=self_utility,
                      groups=groups, floor=floor, progress=progress)
    return result if return_details else result.indices


def maximize(kernel, budget, objective, *, query_kernel=None, private_kernel=None, eta=1.0, nu=1.0,
             backend="ours", normalize="global", self_utility="include", groups=None, floor="min",
             progress=True) -> GreedyResult:
    """Run the lazy greedy of `backend` on the (normalised) kernels; see the module docstring."""
    if backend not in BACKENDS:
        raise DeliftInputError(f"unknown backend {backend!r}; expected one of {BACKENDS}", field="backend")
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise DeliftInputError(f"must be a positive integer, got {budget!r}", field="budget")
    budget = int(budget)
    problem = _Problem.build(kernel, objective, query_kernel, private_kernel, eta, nu, normalize, self_utility,
                             groups, floor)
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
                    normalize="global", self_utility="include", groups=None, floor="min") -> float:
    """f(selected) straight from the formula of `objective` (module docstring), in float64."""
    problem = _Problem.build(kernel, objective, query_kernel, private_kernel, eta, nu, normalize, self_utility,
                             groups, floor)
    return problem.value(_checked_selection(selected, problem.n))


def self_coverage_share(kernel, selected, objective, *, query_kernel=None, private_kernel=None, eta=1.0, nu=1.0,
                        normalize="global", groups=None, floor="min") -> float | None:
    """The share of f(selected), read as the reference code reads it (every record's own entry
    included), that comes from selected records covering themselves: 1 - f'(selected) / f(selected),
    where f' is the same objective on the same normalised kernel with its diagonal set to 0. None for
    fl2mi (no pool kernel) and where f(selected) is 0."""
    if objective == "fl2mi":
        return None
    problem = _Problem.build(kernel, objective, query_kernel, private_kernel, eta, nu, normalize, "include",
                             groups, floor)
    chosen = _checked_selection(selected, problem.n)
    total = problem.value(chosen)
    if total <= 0:
        return None
    return 1.0 - problem.without_diagonal().value(chosen) / total


def _checked_selection(selected, n: int) -> list[int]:
    chosen = [int(j) for j in selected]
    bad = [j for j in chosen if not 0 <= j < n]
    if bad:
        raise DeliftInputError(f"index {bad[0]} is outside the pool of {n}", field="selected")
    if len(set(chosen)) != len(chosen):
        raise DeliftInputError("contains repeated indices", field="selected")
    return chosen


def kernel_bounds(*kernels) -> tuple[float, float]:
    """Joint (min, max) over `kernels`, scanned in row blocks; NaN/inf raises DeliftInputError.

    A sparse kernel contributes its stored entries only (one with none contributes nothing: alone
    it gives (inf, -inf), which `minmax01` maps to zeros).
    """
    bounds = [_scan_bounds(k, f"kernels[{position}]") for position, k in enumerate(kernels)]
    return min(lo for lo, _ in bounds), max(hi for _, hi in bounds)


def minmax01(kernel, *, bounds=None):
    """A float32 copy of `kernel` mapped to [0, 1] by (x - lo) / (hi - lo); bounds default to its own.

    A scipy.sparse kernel gives a float32 ``csr_array`` with the same stored entries, each scaled
    and clipped to [0, 1]; unstored entries stay unstored (similarity 0).
    """
    kernel = _as_matrix(kernel, "kernel")
    lo, hi = _scan_bounds(kernel, "kernel") if bounds is None else bounds
    if scipy.sparse.issparse(kernel):
        return _scaled_csr(kernel, lo, hi, copy=True)
    out = np.empty(kernel.shape, dtype=np.float32)
    for start, stop in _row_blocks(kernel.shape):
        out[start:stop] = _scale_block(np.asarray(kernel[start:stop]), lo, hi)
    return out


def _scale_block(block: np.ndarray, lo, hi) -> np.ndarray:
    """(block - lo) / (hi - lo) clipped to [0, 1], float32; 0 where hi <= lo. `lo` and `hi` are numbers,
    or arrays that broadcast against `block` (per-row bounds: one value per row, or per stored entry)."""
    # Elementwise, so the result does not depend on how the kernel is split into blocks; float64
    # inputs are scaled in float64, everything else in float32.
    dtype = np.float64 if block.dtype == np.float64 else np.float32
    if np.ndim(lo) == 0:
        if hi <= lo:
            return np.zeros(block.shape, dtype=np.float32)
        scaled = np.subtract(block, dtype(lo), dtype=dtype)
        np.divide(scaled, dtype(hi - lo), out=scaled)
        return np.clip(scaled, 0.0, 1.0, out=scaled).astype(np.float32, copy=False)
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    empty = ~(hi > lo)  # a range of one value, or a row with no entries (lo = inf)
    span = np.where(empty, 1.0, hi - lo).astype(dtype)
    scaled = np.subtract(block, np.where(empty, 0.0, lo).astype(dtype), dtype=dtype)
    np.divide(scaled, span, out=scaled)
    scaled = np.clip(scaled, 0.0, 1.0, out=scaled)
    scaled[np.broadcast_to(empty, scaled.shape)] = 0.0
    return scaled.astype(np.float32, copy=False)


def _scaled_csr(kernel, lo, hi, copy: bool = False):
    """Canonical CSR `kernel` with its stored entries min-max scaled (float32); same sparsity structure.
    Per-row bounds (arrays over the rows) are applied to each row's stored entries."""
    indices, indptr = (kernel.indices.copy(), kernel.indptr.copy()) if copy else (kernel.indices, kernel.indptr)
    if np.ndim(lo) != 0:
        rows = _entry_rows(kernel.indptr)
        lo, hi = np.asarray(lo)[rows], np.asarray(hi)[rows]
    return scipy.sparse.csr_array((_scale_block(kernel.data, lo, hi), indices, indptr), shape=kernel.shape)


def _entry_rows(indptr: np.ndarray) -> np.ndarray:
    """The row of each stored entry of a CSR matrix."""
    return np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))


def _without_diagonal(kernel):
    """A CSR copy of square `kernel` without its stored diagonal entries."""
    off = _entry_rows(kernel.indptr) != kernel.indices
    kept = np.concatenate(([0], np.cumsum(off)))[kernel.indptr]
    return scipy.sparse.csr_array((kernel.data[off], kernel.indices[off], kept), shape=kernel.shape)


def _csr_row_max(values: np.ndarray, indptr: np.ndarray, n_rows: int) -> np.ndarray:
    """Per-row max of CSR `values`; 0 for a row with no stored entries (stored entries are >= 0 here)."""
    out = np.zeros(n_rows, dtype=values.dtype)
    nonempty = np.flatnonzero(np.diff(indptr))
    if nonempty.size:
        # Between two non-empty rows only empty ones lie, so each segment is exactly one row.
        out[nonempty] = np.maximum.reduceat(values, indptr[nonempty])
    return out


def _entry_position(kernel, position: int) -> tuple[int, int]:
    """(row, column) of the `position`-th stored entry of a CSR kernel."""
    row = int(np.searchsorted(kernel.indptr, position, side="right")) - 1
    return row, int(kernel.indices[position])


def _row_blocks(shape):
    rows, cols = shape
    step = max(1, _BLOCK_ENTRIES // max(cols, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _as_matrix(array, name: str):
    if scipy.sparse.issparse(array):
        return _as_sparse(array, name)
    # np.asarray keeps a memory map mapped (no copy).
    array = np.asarray(array)
    if array.ndim != 2 or 0 in array.shape:
        raise DeliftInputError(f"must be a non-empty 2-D matrix, got shape {array.shape}", field=name)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DeliftInputError(f"must hold real numbers, got dtype {array.dtype}", field=name)
    return array


def _as_sparse(array, name: str):
    """A scipy.sparse kernel as a canonical CSR array (sorted indices, duplicates summed), float64 kept
    (scaled in float64 like a dense float64 kernel), anything else float32. Never modified in place."""
    if len(array.shape) != 2 or 0 in array.shape:
        raise DeliftInputError(f"must be a non-empty 2-D matrix, got shape {array.shape}", field=name)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise DeliftInputError(f"must hold real numbers, got dtype {array.dtype}", field=name)
    dtype = np.float64 if array.dtype == np.float64 else np.float32
    if isinstance(array, scipy.sparse.csr_array) and array.dtype == dtype and array.has_canonical_format:
        return array
    csr = scipy.sparse.csr_array(array, dtype=dtype, copy=True)
    csr.sum_duplicates()  # also sorts the indices
    return csr


def _normalization(normalize) -> str | None:
    """"global", "separate", "row", "source" or None (kernels used as they are) from `normalize`."""
    if isinstance(normalize, (bool, np.bool_)):
        return "global" if normalize else None
    if normalize not in NORMALIZATIONS:
        raise DeliftInputError(f"must be one of {NORMALIZATIONS}, True or False, got {normalize!r}",
                               field="normalize")
    return normalize


def _row_bounds(array, name: str, mask_diagonal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-row (min, max) of `array` as float64 vectors (a sparse kernel: over its stored entries; a row
    with none gives (inf, -inf)); with `mask_diagonal` the entries [i, i] are left out. NaN/inf raises."""
    if scipy.sparse.issparse(array):
        _scan_bounds(array, name)  # the finiteness check, naming the first bad entry
        lo, hi = np.full(array.shape[0], np.inf), np.full(array.shape[0], -np.inf)
        nonempty = np.flatnonzero(np.diff(array.indptr))
        if nonempty.size:
            lo[nonempty] = np.minimum.reduceat(array.data, array.indptr[nonempty])
            hi[nonempty] = np.maximum.reduceat(array.data, array.indptr[nonempty])
        return lo, hi
    lo, hi = np.empty(array.shape[0]), np.empty(array.shape[0])
    for start, stop in _row_blocks(array.shape):
        block = np.asarray(array[start:stop])
        if not (np.isfinite(block.min()) and np.isfinite(block.max())):
            i, j = np.argwhere(~np.isfinite(block))[0]
            raise DeliftInputError(f"entry [{start + i}, {j}] is {block[i, j]}; kernels must be finite", field=name)
        if mask_diagonal:
            block = block.astype(np.float64)
            local = np.arange(stop - start)
            block[local, start + local] = np.inf
            lo[start:stop] = block.min(axis=1)
            block[local, start + local] = -np.inf
            hi[start:stop] = block.max(axis=1)
        else:
            lo[start:stop], hi[start:stop] = block.min(axis=1), block.max(axis=1)
    return lo, hi


def _normalization_bounds(row_bounds: dict, normalization: str, groups, floor: str) -> dict:
    """Kernel name -> (lo, hi) of the min-max: numbers (global, separate) or per-row vectors (row, source)."""
    lo_rows = np.minimum.reduce([lo for lo, _ in row_bounds.values()])
    hi_rows = np.maximum.reduce([hi for _, hi in row_bounds.values()])
    if normalization == "global":
        bounds = dict.fromkeys(row_bounds, (float(lo_rows.min()), float(hi_rows.max())))
    elif normalization == "separate":
        bounds = {name: (float(lo.min()), float(hi.max())) for name, (lo, hi) in row_bounds.items()}
    elif normalization == "row":
        bounds = dict.fromkeys(row_bounds, (lo_rows, hi_rows))
    else:
        if groups is None or len(groups) != len(lo_rows):
            raise DeliftInputError(f"normalize='source' needs one group (source) per covered row ({len(lo_rows)}), "
                                   f"got {None if groups is None else len(groups)}", field="groups")
        _, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        group_lo, group_hi = np.full(codes.max() + 1, np.inf), np.full(codes.max() + 1, -np.inf)
        np.minimum.at(group_lo, codes, lo_rows)
        np.maximum.at(group_hi, codes, hi_rows)
        bounds = dict.fromkeys(row_bounds, (group_lo[codes], group_hi[codes]))
    if floor == "zero":  # UF 0 (no help) maps to 0 and harmful pairs are clipped to it
        bounds = {name: (0.0 if np.ndim(lo) == 0 else np.zeros_like(lo), hi) for name, (lo, hi) in bounds.items()}
    return bounds


def _scan_bounds(array, name: str) -> tuple[float, float]:
    array = _as_matrix(array, name)
    if scipy.sparse.issparse(array):
        data = array.data
        if data.size == 0:
            return np.inf, -np.inf
        lo, hi = data.min(), data.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            position = int(np.flatnonzero(~np.isfinite(data))[0])
            i, j = _entry_position(array, position)
            raise DeliftInputError(f"entry [{i}, {j}] is {data[position]}; kernels must be finite", field=name)
        return float(lo), float(hi)
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
    if scipy.sparse.issparse(array):
        negative = np.flatnonzero(array.data < 0)
        if negative.size:
            i, j = _entry_position(array, int(negative[0]))
            raise DeliftInputError(f"entry [{i}, {j}] is {array.data[negative[0]]}: with normalize=False every "
                                   "stored entry must be >= 0 (submodular coverage needs a non-negative kernel)",
                                   field=name)
        return
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
    kernels: dict  # name -> raw 2-D array (possibly a memory map) or canonical CSR array
    eta: float
    nu: float
    # name -> min-max (lo, hi): numbers, or per-row vectors (normalize row/source); None: used as they are
    bounds: dict | None
    mask_diagonal: bool = False  # a dense pool kernel read with its diagonal as 0 (self-utility excluded)

    @classmethod
    def build(cls, kernel, objective, query_kernel, private_kernel, eta, nu, normalize, self_utility="include",
              groups=None, floor="min") -> "_Problem":
        if objective not in OBJECTIVES:
            raise DeliftInputError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}",
                                   field="objective")
        if self_utility not in SELF_UTILITIES:
            raise DeliftInputError(f"must be one of {SELF_UTILITIES}, got {self_utility!r}", field="self_utility")
        if floor not in FLOORS:
            raise DeliftInputError(f"must be one of {FLOORS}, got {floor!r}", field="floor")
        given = {"kernel": kernel, "query_kernel": query_kernel, "private_kernel": private_kernel}
        read = _KERNELS_READ[objective]
        for name, array in given.items():
            if name in read and array is None:
                raise DeliftInputError(f"objective {objective!r} needs {name}", field=name)
            # fl2mi ignores a pool kernel, so callers may pass the same kernels to every objective.
            if name not in read and array is not None and name != "kernel":
                raise DeliftInputError(f"objective {objective!r} does not read {name}; pass None", field=name)
        normalization = _normalization(normalize)
        kernels = {name: _as_matrix(given[name], name) for name in read}
        if objective == "fl2mi":
            # Target x pool: the pool is the columns, the candidates (the kernel's orientation rule).
            n = kernels["query_kernel"].shape[1]
            pool_kernel = None if kernel is None else _as_matrix(kernel, "kernel")
        else:
            n = kernels["kernel"].shape[0]
            pool_kernel = kernels["kernel"]
        if pool_kernel is not None and pool_kernel.shape != (n, n):
            raise DeliftInputError(f"must be square (pool x pool, {n} x {n}), got shape {pool_kernel.shape}",
                                   field="kernel")
        for name, array in kernels.items():
            if objective != "fl2mi" and array.shape[0] != n:
                raise DeliftInputError(f"has {array.shape[0]} rows but the pool has {n}", field=name)
        for name, weight in (("eta", eta), ("nu", nu)):
            if not (np.isfinite(weight) and weight >= 0):
                raise DeliftInputError(f"must be a finite number >= 0, got {weight!r}", field=name)

        # Self-utility excluded: only the pool kernel has a diagonal (the others pair different records). A
        # sparse one loses its diagonal entries (unstored = 0); a dense one is read with 0 there. Either
        # way the diagonal takes no part in the normalisation's ranges either.
        mask_diagonal = False
        if self_utility == "exclude" and "kernel" in kernels:
            if scipy.sparse.issparse(kernels["kernel"]):
                kernels["kernel"] = _without_diagonal(kernels["kernel"])
            else:
                mask_diagonal = True
        row_bounds = {name: _row_bounds(array, name, mask_diagonal and name == "kernel")
                      for name, array in kernels.items()}
        if normalization is None:
            if min(float(lo.min()) for lo, _ in row_bounds.values()) < 0:
                for name, array in kernels.items():
                    _first_negative(array, name)
            return cls(objective, n, kernels, float(eta), float(nu), None, mask_diagonal)
        bounds = _normalization_bounds(row_bounds, normalization, groups, floor)
        return cls(objective, n, kernels, float(eta), float(nu), bounds, mask_diagonal)

    def without_diagonal(self) -> "_Problem":
        """The same problem, normalised as it is, with the pool kernel's diagonal read as 0."""
        if scipy.sparse.issparse(self.kernels["kernel"]):
            return replace(self, kernels=self.kernels | {"kernel": _without_diagonal(self.kernels["kernel"])})
        return replace(self, mask_diagonal=True)

    def scaled(self, name: str, values: np.ndarray, rows=None) -> np.ndarray:
        """Float32 `values` of kernel `name`, normalised as configured; `rows` (an index array) says
        which row each row of a 2-D `values`, or each entry of a 1-D one, belongs to (per-row bounds)."""
        if self.bounds is None:
            return values.astype(np.float32)
        lo, hi = self.bounds[name]
        if np.ndim(lo) != 0:
            lo, hi = lo[rows], hi[rows]
            if values.ndim == 2:
                lo, hi = lo[:, None], hi[:, None]
        return _scale_block(values, lo, hi)

    def is_sparse(self, name: str) -> bool:
        return scipy.sparse.issparse(self.kernels[name])

    def sparse(self, name: str):
        """Sparse kernel `name` normalised as configured: a float32 CSR array, unstored entries still 0."""
        raw = self.kernels[name]
        if self.bounds is None:
            return scipy.sparse.csr_array((raw.data.astype(np.float32), raw.indices, raw.indptr), shape=raw.shape)
        return _scaled_csr(raw, *self.bounds[name])

    def rows(self, name: str, rows) -> np.ndarray:
        """Float32 rows (a slice or an index array) of kernel `name`, normalised as configured.

        Rows of a sparse kernel come dense, 0 where nothing is stored (only `dense`, i.e. the
        submodlib backend, reads a sparse kernel this way).
        """
        numbers = np.arange(self.kernels[name].shape[0])[rows]
        if self.is_sparse(name):
            block = self.kernels[name][rows]
            data = self.scaled(name, block.data, numbers[_entry_rows(block.indptr)])
            return scipy.sparse.csr_array((data, block.indices, block.indptr), shape=block.shape).toarray()
        out = self.scaled(name, np.asarray(self.kernels[name][rows]), numbers)
        if self.mask_diagonal and name == "kernel":
            out[np.arange(len(numbers)), numbers] = 0.0
        return out

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
        if self.is_sparse(name):
            # Unstored entries are 0 and stored ones >= 0: the max over the stored ones (0 if none).
            kernel = self.sparse(name)
            row_max = _csr_row_max(np.float32(weight) * kernel.data, kernel.indptr, self.n)
            return np.maximum(row_max, np.float32(floor))
        out = np.empty(self.n, dtype=np.float32)
        for start, stop, block in self.row_blocks(name):
            out[start:stop] = np.maximum((np.float32(weight) * block).max(axis=1), np.float32(floor))
        return out

    def column_max(self, name: str, floor: float = 0.0) -> np.ndarray:
        """max(floor, max_t K[t, j]) per column j, in float32 (FL2MI's per-candidate query maxima)."""
        out = np.full(self.kernels[name].shape[1], np.float32(floor), dtype=np.float32)
        if self.is_sparse(name):
            # Unstored entries are 0 <= floor: the stored ones decide.
            kernel = self.sparse(name)
            np.maximum.at(out, kernel.indices, kernel.data)
            return out
        for _, _, block in self.row_blocks(name):
            np.maximum(out, block.max(axis=0), out=out)
        return out

    def value(self, chosen: list[int]) -> float:
        if self.objective == "fl2mi":
            if not chosen:
                return 0.0
            if self.is_sparse("query_kernel"):
                return self._sparse_fl2mi_value(chosen)
            columns = np.asarray(chosen, dtype=np.int64)
            per_target, per_chosen = 0.0, np.zeros(len(chosen))
            for _, _, block in self.row_blocks("query_kernel"):
                picked = block[:, columns].astype(np.float64)
                per_target += float(picked.max(axis=1).sum())
                np.maximum(per_chosen, picked.max(axis=0), out=per_chosen)
            return per_target + self.eta * float(per_chosen.sum())
        total = 0.0
        columns = np.asarray(chosen, dtype=np.int64)
        if any(self.is_sparse(name) for name in self.kernels):
            return self._mixed_value(columns)
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

    def _sparse_fl2mi_value(self, chosen: list[int]) -> float:
        # The chosen columns of the (target x pool) query kernel, unstored entries 0: the dense maxima.
        query = self.kernels["query_kernel"][:, np.asarray(chosen, dtype=np.int64)]
        data = self.scaled("query_kernel", query.data, _entry_rows(query.indptr))
        per_target = _csr_row_max(data, query.indptr, query.shape[0])
        per_chosen = np.zeros(query.shape[1], dtype=np.float32)
        np.maximum.at(per_chosen, query.indices, data)
        return float(per_target.astype(np.float64).sum() + self.eta * per_chosen.astype(np.float64).sum())

    def _mixed_value(self, columns: np.ndarray) -> float:
        # fl/flmi/flcg with at least one sparse kernel: whole n-vectors, never an n x n block.
        if self.is_sparse("kernel"):
            if columns.size:
                picked = self.kernels["kernel"][:, columns]
                data = self.scaled("kernel", picked.data, _entry_rows(picked.indptr))
                covered = _csr_row_max(data, picked.indptr, self.n).astype(np.float64)
            else:
                covered = np.zeros(self.n)
        else:
            covered = np.concatenate([block[:, columns].max(axis=1).astype(np.float64) if columns.size
                                      else np.zeros(stop - start) for start, stop, block in self.row_blocks("kernel")])
        if self.objective == "flmi":
            covered = np.minimum(covered, self.eta * self.row_max("query_kernel", 1.0).astype(np.float64))
        elif self.objective == "flcg":
            covered = np.maximum(covered - self.nu * self.row_max("private_kernel", 1.0).astype(np.float64), 0.0)
        return float(covered.sum())


class _CoverageState:
    """The four objectives as one coverage problem, with every candidate's gain kept up to date.

    `covers[r, j]` is what candidate j offers covered item r: the kernel itself for fl/flmi/flcg
    (covered items = pool rows), the (target x pool) query kernel for fl2mi (covered items = targets).
    A candidate's gain is sum_r term(coverage[r], covers[r, j]) (+ `modular[j]` for fl2mi), with
    term = max(x - c, 0) or, for flmi, min(max(c, x), cap) - min(c, cap), in float32 as submodlib
    computes it. Adding j only changes the terms of the items whose coverage j raises, so each
    step reads just those rows and subtracts their old-minus-new terms from all gains at once.
    """

    def __init__(self, covers, coverage, cap=None, modular=None, progress=True):
        self.covers = covers  # (n_covered, n_candidates) float32, C-contiguous (may be a memory map)
        self.coverage = coverage  # (n_covered,) float32: best value offered so far
        self.cap = cap  # flmi: eta * max_t q[r, t]; coverage beyond it is worth nothing
        self.modular = modular  # fl2mi: eta * max_t q[t, j], added to candidate j's gain
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
        if problem.is_sparse("query_kernel" if problem.objective == "fl2mi" else "kernel"):
            return _SparseCoverageState.build(problem)
        if problem.objective == "fl2mi":
            # Covered items are the targets: the target x pool query kernel is `covers` as it is.
            query = problem.dense("query_kernel")
            modular = np.float32(problem.eta) * problem.column_max("query_kernel", floor=_FLT_MIN)
            return cls(query, np.zeros(query.shape[0], dtype=np.float32), modular=modular, progress=progress)
        raw = problem.kernels["kernel"]
        # A float32 C-ordered kernel used as it is (e.g. a memory map) needs no copy.
        use_raw = (problem.bounds is None and not problem.mask_diagonal and raw.dtype == np.float32
                   and raw.flags.c_contiguous)
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

    def settled(self, taken: np.ndarray) -> bool:
        """Whether every candidate not `taken` has a gain of exactly 0 now and for good (no non-zero
        term left, no modular part): terms only shrink, so such a gain can never rise again."""
        open_ = ~taken
        if np.any(self.positive[open_] != 0):
            return False
        return self.modular is None or not np.any(self.modular[open_] != 0)

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


class _SparseCoverageState(_CoverageState):
    """`_CoverageState` on a sparse `covers` matrix, in O(nnz) memory.

    An unstored covers[r, j] is 0 and coverage is >= 0, so its term is exactly 0 in every
    objective (max(0 - c, 0) = 0; min(max(c, 0), cap) - min(c, cap) = 0): only stored entries
    have terms. They are computed with the same float32 operations as the dense state's and
    summed per candidate in float64 in the same (covered item) order, so the gains, and with them
    the picks, are those of the dense state on the densified kernel. `covers` is kept twice: by
    covered item (CSR: what each candidate offers item r, to update gains) and by candidate
    (CSR of the transpose: which items candidate j covers, to find the items j raises).
    """

    def __init__(self, covers, by_candidate, coverage, cap=None, modular=None):
        self.n_items, self.n_candidates = covers.shape
        self.item_ptr = covers.indptr.astype(np.int64)
        self.item_candidates, self.item_values = covers.indices, covers.data  # float32 data
        self.candidate_ptr = by_candidate.indptr.astype(np.int64)
        self.candidate_items, self.candidate_values = by_candidate.indices, by_candidate.data
        self.coverage, self.cap, self.modular = coverage, cap, modular
        self.high = np.zeros(self.n_candidates, dtype=np.float64)
        self.low = np.zeros(self.n_candidates, dtype=np.float64)
        self.positive = np.zeros(self.n_candidates, dtype=np.int64)
        items = np.repeat(np.arange(self.n_items), np.diff(self.item_ptr))
        terms = self._entry_terms(self.item_values, items, self.coverage[items])
        self._accumulate(np.bincount(self.item_candidates, weights=terms, minlength=self.n_candidates))
        self.positive += np.bincount(self.item_candidates[terms != 0], minlength=self.n_candidates)
        self._gains = super().gains()  # kept up to date where a step changes it: no O(n) work per step

    @classmethod
    def build(cls, problem: _Problem) -> "_SparseCoverageState":
        if problem.objective == "fl2mi":
            # Covered items are the targets: covers = the target x pool query kernel as it is.
            query = problem.sparse("query_kernel")
            modular = np.float32(problem.eta) * problem.column_max("query_kernel", floor=_FLT_MIN)
            return cls(query, _transposed(query), np.zeros(query.shape[0], dtype=np.float32), modular=modular)
        kernel = problem.sparse("kernel")
        coverage = np.zeros(problem.n, dtype=np.float32)
        if problem.objective == "flmi":
            return cls(kernel, _transposed(kernel), coverage,
                       cap=problem.row_max("query_kernel", problem.eta, floor=_FLT_MIN))
        if problem.objective == "flcg":
            coverage = np.maximum(problem.row_max("private_kernel", problem.nu), np.float32(0))
        return cls(kernel, _transposed(kernel), coverage)

    def _entry_terms(self, values: np.ndarray, items: np.ndarray, covered: np.ndarray) -> np.ndarray:
        """Float32 gain terms of stored entries (`values` offered to covered `items` at `covered`)."""
        if self.cap is None:
            return np.maximum(values - covered, np.float32(0))
        cap = self.cap[items]
        return np.minimum(np.maximum(values, covered), cap) - np.minimum(covered, cap)

    def add(self, j: int) -> None:
        start, stop = self.candidate_ptr[j], self.candidate_ptr[j + 1]
        items, offered = self.candidate_items[start:stop], self.candidate_values[start:stop]
        before = self.coverage[items]
        raised = offered > before
        if self.cap is not None:
            raised &= before < self.cap[items]  # items already at their cap gain nothing more
        rows = items[raised]
        if rows.size:
            # Every stored entry of the raised items' rows, in item order.
            starts = self.item_ptr[rows]
            counts = self.item_ptr[rows + 1] - starts
            entries = np.arange(counts.sum()) + np.repeat(starts - (np.cumsum(counts) - counts), counts)
            values = self.item_values[entries]
            # The candidates these entries offer, numbered 0..len(touched)-1 (in entry order per candidate).
            touched, candidates = np.unique(self.item_candidates[entries], return_inverse=True)
            per_entry = np.repeat(np.arange(rows.size), counts)
            entry_items = rows[per_entry]
            old = self._entry_terms(values, entry_items, before[raised][per_entry])
            new = self._entry_terms(values, entry_items, offered[raised][per_entry])
            length = touched.size
            self.positive[touched] -= (np.bincount(candidates[old != 0], minlength=length)
                                       - np.bincount(candidates[new != 0], minlength=length))
            # `_accumulate` on the touched candidates only (the others' delta is 0, which changes nothing).
            delta = np.bincount(candidates, weights=new, minlength=length) - np.bincount(candidates, weights=old,
                                                                                           minlength=length)
            high = self.high[touched]
            total = high + delta
            back = total - high
            self.low[touched] += (high - (total - back)) + (delta - back)
            self.high[touched] = total
            gains = np.where(self.positive[touched] > 0, total + self.low[touched], 0.0)
            self._gains[touched] = gains if self.modular is None else gains + self.modular[touched]
        self.coverage[items] = np.maximum(before, offered)

    def gains(self) -> np.ndarray:
        return self._gains.copy()


def _transposed(kernel):
    """The CSR array of `kernel`'s transpose (canonical: sorted indices)."""
    out = kernel.T.tocsr()
    if not out.has_sorted_indices:
        out.sort_indices()
    return out


# Once every gain left is exactly 0 for good, the remaining LazyGreedy order is derived at once
# (`_zero_gain_tail`) instead of one O(n log n) replay per pick; False replays every pick (tests).
_ZERO_GAIN_SHORTCUT = True


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
    with tqdm(total=budget, desc=f"greedy {objective}", unit="pick", disable=not progress) as bar:
        while len(indices) < budget:
            if _ZERO_GAIN_SHORTCUT and gains.max() == 0 and state.settled(taken):
                tail = _zero_gain_tail(bounds, taken)[:budget - len(indices)]
                indices.extend(int(j) for j in tail)
                picked_gains.extend([0.0] * len(tail))
                bar.update(len(tail))
                break
            j = _replay_lazy_step(bounds, gains)
            indices.append(j)
            picked_gains.append(float(gains[j]))
            taken[j] = True
            bounds[j] = -np.inf  # out of the heap
            state.add(j)
            gains = state.gains()
            gains[taken] = -np.inf
            bar.update(1)
    return indices, picked_gains


def _zero_gain_tail(bounds: np.ndarray, taken: np.ndarray) -> np.ndarray:
    """Every remaining pick, in `_replay_lazy_step`'s order, when all gains left are 0 for good.

    With every fresh gain 0, a step pops stale bounds in decreasing (bound, index) order. A popped
    head is refreshed to 0 and taken as soon as 0 >= the next bound; a refreshed candidate (gain 0)
    never beats a positive stale bound. So if some bounds are > 0 (P), the step refreshes all of P
    and takes its last pop: the smallest positive bound, the smallest index among equals; P's
    others now have bound 0. With no bound > 0, each step takes the head at once: first the
    bound-0 candidates from the largest index down, then any negative bounds (only rounding could
    leave one) in decreasing (bound, index) order. Bounds are not updated: nothing reads them after.
    """
    open_ = np.flatnonzero(~taken)  # ascending
    stale = bounds[open_]
    head = np.empty(0, dtype=np.int64)
    positive = stale > 0
    if positive.any():
        smallest = stale[positive].min()
        head = open_[positive & (stale == smallest)][:1]
    zero = (stale >= 0) & (open_ != (head[0] if head.size else -1))
    negative = open_[stale < 0]
    negative = negative[np.lexsort((-negative, -bounds[negative]))]
    return np.concatenate((head, open_[zero][::-1], negative))


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
        # submodlib's query kernel is ground set x queries: ours (target x pool) transposed.
        query = np.ascontiguousarray(problem.dense("query_kernel").T)
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
