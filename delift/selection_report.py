"""What a selection took from its pool, for every selector: per source, the subset's share against
the pool's; the response lengths in tokens; the multiple-choice answer letters; and, for DELIFT's
kernel selectors, how much of the objective comes from records covering themselves.

`selection_report(...)` returns a JSON-able dict (results.json's `selection_report`);
`log_lines(report)` and `source_table(report)` are its console forms (the log's, the end-of-run
summary's).
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import scipy.sparse as sp

from delift.generation import response_token_lengths
from delift.objectives import self_coverage_share

# Response-length statistics: name -> percentile (numpy's default, linear interpolation).
PERCENTILES = {"min": 0, "p10": 10, "p25": 25, "p50": 50, "p75": 75, "p90": 90, "max": 100}
# A source whose subset share is under this fraction of its pool share is warned about.
UNDER_REPRESENTED = 1 / 3


def selection_report(pool: list[dict], selected: list[int], tokenizer=None, *, kernels: dict | None = None,
                     objective: str | None = None, eta: float = 1.0, nu: float = 1.0, normalize: str = "global",
                     groups: list | None = None, floor: str = "min") -> dict:
    """The report of `selected` (pool indices) against `pool`.

    `tokenizer` None skips `response_tokens`. `kernels` are the raw kernels the selector's objective
    read, by name (Selection.kernels); with a pool x pool `kernel` and the `objective`, the report
    adds `self_coverage_share` and `diagonal_top_overlap`, the objective read with the selector's
    `eta`, `nu`, `normalize`, `groups` and `floor` (delift.objectives).
    """
    subset = [pool[i] for i in selected]
    sources = source_mix([r["source"] for r in pool], [r["source"] for r in subset])
    report = {"n_pool": len(pool), "n_selected": len(subset), "sources": sources}
    if tokenizer is not None:
        lengths = response_token_lengths(tokenizer, pool)
        report["response_tokens"] = {"pool": length_quantiles(lengths),
                                     "subset": length_quantiles(lengths[np.asarray(selected, dtype=np.int64)])}
    letters = answer_letters(pool, subset)
    if letters is not None:
        report["answer_letters"] = letters
    kernel = (kernels or {}).get("kernel")
    if kernel is not None and objective is not None:
        report["self_coverage_share"] = self_coverage_share(
            kernel, selected, objective, query_kernel=kernels.get("query_kernel"),
            private_kernel=kernels.get("private_kernel"), eta=eta, nu=nu, normalize=normalize, groups=groups,
            floor=floor)
        report["diagonal_top_overlap"] = diagonal_top_overlap(kernel, selected)
    report["warnings"] = [_warning(name, row) for name, row in sources.items() if under_represented(row)]
    return report


def source_mix(pool_sources: list[str], subset_sources: list[str]) -> dict[str, dict]:
    """Per pool source (largest first): counts, shares (None for an empty subset) and the subset
    share over the pool share."""
    pool, subset = Counter(pool_sources), Counter(subset_sources)
    rows = {}
    for name in sorted(pool, key=lambda name: (-pool[name], name)):
        pool_share = pool[name] / len(pool_sources)
        subset_share = subset[name] / len(subset_sources) if subset_sources else None
        rows[name] = {"pool": pool[name], "pool_share": pool_share, "subset": subset[name],
                      "subset_share": subset_share,
                      "ratio": subset_share / pool_share if subset_share is not None else None}
    return rows


def under_represented(row: dict) -> bool:
    return row["ratio"] is not None and row["ratio"] < UNDER_REPRESENTED


def length_quantiles(lengths: np.ndarray) -> dict[str, float] | None:
    """min, p10 ... p90, max (numpy's percentiles) and mean of `lengths`; None when there are none."""
    if len(lengths) == 0:
        return None
    values = np.percentile(lengths, list(PERCENTILES.values()))
    return {name: float(value) for name, value in zip(PERCENTILES, values)} | {"mean": float(np.mean(lengths))}


def answer_letters(pool: list[dict], subset: list[dict]) -> dict[str, dict[str, int]] | None:
    """Per answer letter of the pool's multiple-choice records, its count in the pool and in the
    subset (a skew here is a shortcut the fine-tuned model may learn); None without such records."""
    def letters(records):
        return Counter(r["meta"]["answer"] for r in records if r["meta"].get("answer_type") == "choice")

    pool_letters, subset_letters = letters(pool), letters(subset)
    if not pool_letters:
        return None
    order = sorted(pool_letters)
    return {"pool": {letter: pool_letters[letter] for letter in order},
            "subset": {letter: subset_letters[letter] for letter in order}}


def raw_diagonal(kernel) -> np.ndarray:
    """UF_i(i) per record: a dense kernel's diagonal; a sparse one's stored diagonal entries, -inf
    where the pair was not measured (it ranks below every measured one)."""
    if not sp.issparse(kernel):
        return np.diag(np.asarray(kernel)).astype(np.float64)
    csr = sp.csr_array(kernel)
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    on_diagonal = csr.indices == rows
    diagonal = np.full(min(csr.shape), -np.inf)
    diagonal[rows[on_diagonal]] = csr.data[on_diagonal]
    return diagonal


def diagonal_top_overlap(kernel, selected: list[int]) -> float | None:
    """The share of `selected` among the len(selected) records of largest raw diagonal (ties to the
    lower index): near 1, the selection is picking records for how well they cover themselves."""
    if not selected:
        return None
    top = np.argsort(-raw_diagonal(kernel), kind="stable")[:len(selected)]
    return len(set(top.tolist()) & set(selected)) / len(selected)


def log_lines(report: dict) -> list[tuple[int, str]]:
    """The report as (logging level, message): one line per source, an under-represented one's as
    its warning; for kernel selectors, the self-coverage figures."""
    lines = [(logging.WARNING, _warning(name, row)) if under_represented(row) else
             (logging.INFO, f"source {_source(name)}: {row['subset']} of {report['n_selected']} selected "
                            f"({_percent(row['subset_share'])}) vs {_percent(row['pool_share'])} of the pool")
             for name, row in report["sources"].items()]
    if "diagonal_top_overlap" in report:
        lines.append((logging.INFO, f"self-coverage share {_fraction(report['self_coverage_share'])}, "
                                    f"diagonal top overlap {_fraction(report['diagonal_top_overlap'])}"))
    return lines


def source_table(report: dict) -> list[str]:
    """One line per source for the end-of-run summary (worded apart from the log's lines, which the
    console shows too)."""
    return [f"{_source(name):<16} {row['subset']:>5}/{row['pool']:<6} selected   "
            f"subset {_percent(row['subset_share']):>7}   pool {_percent(row['pool_share']):>7}   "
            f"ratio {_fraction(row['ratio'], digits=2)}"
            for name, row in report["sources"].items()]


def _warning(name: str, row: dict) -> str:
    return (f"source {_source(name)}: {_percent(row['subset_share'])} of the subset against "
            f"{_percent(row['pool_share'])} of the pool")


def _source(name: str) -> str:
    return name or "(no source)"


def _fraction(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f} %"
