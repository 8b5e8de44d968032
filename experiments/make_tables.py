"""Regenerate the paper's results tables (and a budget curve) from run folders.

    python experiments/make_tables.py outputs/ multirun/ --out docs/results/mixinstruct_smollm2
    python experiments/make_tables.py multirun/2025-01-01/ --fraction 0.5 --title "MixInstruct, 50 %"

Every `results.json` under the given folders (searched recursively, so Hydra run and multirun
folders both work) is one run; runs without metrics (`task=select`, `task=kernel`) are skipped.
Runs are grouped by (method, fraction); each cell is the mean ± sample standard deviation
(ddof=1) over the seeds of that group. A cell measured on a single seed shows the mean alone (no
±), and the caption names the rows with one seed. Missing cells are `–`, never 0.

A method is a selector with its settings: where a selector's runs in the given folders differ in
their `selector_config` (the selector's constructor settings; `fraction` and `name` aside), each
configuration is its own method and row, named by the settings that differ, e.g. "DELIFT
(self-utility exclude, normalize row)" (key `delift[self_utility=exclude,normalize=row]`). A
selector whose runs share one configuration, or that predate `selector_config`, is one row named
as the paper does. Initial, Random and Full Data, which the comparisons refer to, must each have one
configuration. Two runs of one method, fraction, seed, model and stage are an error.

The main table holds one fraction: `--fraction`, or else the most common one among the subset
selectors' runs (Full Data is always 100 %, Initial always 0 %). Rows follow the paper's order
(Initial, Random, Random (balanced), Longest, RDS+, SelectIT, LESS, DEFT-UCS, DELIFT (SE), DELIFT,
Full Data), then any other selector by name; the variants of one selector stay together, by name.
Columns: ICL and fine-tuned x ROUGE / embedding similarity / LAJ, plus accuracy, option
log-likelihood accuracy and reference loss (lower is better) for a mode where any run of the table
has them; a mode no run measured, and LAJ where no run was judged, are left out. The embedding
similarity column is named by the embedder the runs used (results.json `embedder`): "BGE", the
paper's, only for a BGE model, else e.g. "Emb. sim. (MiniLM)"; the caption names the model. A
results.json with only `metrics` (no `metrics_by_mode`) counts as the fine-tuned mode (its `mode`
field, if any, says otherwise): that is what the pipeline evaluates after the selector's training
step (none for Initial).

Paired statistics, where the runs' predictions.jsonl hold per-example scores: each method against
Random (same fraction) and against Full Data, per column, the mean difference over (seed,
evaluation example) pairs (the two runs of one seed share their evaluation examples) with a 95 %
percentile bootstrap interval (the pairs resampled with replacement, `--bootstrap` resamples from
a numpy Generator seeded with `--seed`). A method is marked better (▲) or worse (▼) only where the
interval excludes 0. The budget curve's error bars are the same bootstrap's interval of each
point's mean over (seed, example); without per-example scores, ± the std over seeds. Where the
runs hold several fractions, one more table pairs each method with Random at every fraction, and
the curve's lower panel shows those differences for its metric.

Per evaluation source, where predictions.jsonl hold examples of two or more sources (a row's
`source`, else its id up to the first "/"): a table of method x source, each cell the mean ± std
over seeds of a run's mean over that source's examples, and a table of each method's paired
difference from Random on that source's examples, with the same bootstrap and marks; the caption
names how many evaluation examples each source has per run.

Outputs with `--out PATH`: PATH.md (Markdown tables and captions), PATH.tex (booktabs tables),
PATH.json (the aggregated numbers, in table units: `rows`, `paired`, `paired_by_fraction`,
`by_source`, `budget_curves`, each row with its `method`, `selector`, `settings` and `name`) and,
where a method was run at several fractions, PATH_budget.png (metric against subset size). The
Markdown is printed either way. The written files end with the commands that made them: each
source multirun's `run.py -m` command (from Hydra's multirun.yaml in its sweep folder) and this
script's own.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from delift.errors import DeliftInputError

# Selector name -> row name, in the paper's row order.
PAPER_ROWS = {
    "initial": "Initial",
    "random": "Random",
    "random_balanced": "Random (balanced)",
    "longest": "Longest",
    "rds": "RDS+",
    "selectit": "SelectIT",
    "less": "LESS",
    "deft_ucs": "DEFT-UCS",
    "delift_se": "DELIFT (SE)",
    "delift": "DELIFT",
    "full": "Full Data",
}
# Selectors whose subset size is fixed whatever their config says.
FIXED_FRACTIONS = {"initial": 0.0, "full": 1.0}
# Rows the comparisons and the budget curve's reference lines refer to: one configuration each.
REFERENCE_SELECTORS = ("initial", "random", "full")
# selector_config entries that never make a variant: the fraction has its own tables, the name is the selector's.
NOT_SETTINGS = ("fraction", "name")
NOT_RECORDED = "not recorded"
MODES = {"icl": "ICL", "finetune": "Fine-tuned"}
# results.json metric key -> (column label, factor to table units): ROUGE and embedding similarity in percent as in
# the paper. The embedding similarity's label names the embedder the runs used (embedder_label).
METRICS = {"rouge1": ("ROUGE", 100.0), "embed_sim": ("Emb. sim.", 100.0), "laj": ("LAJ", 1.0),
           "accuracy": ("Acc.", 100.0), "ll_accuracy": ("LL Acc.", 100.0), "ref_loss": ("Loss", 1.0)}
# Lower-cased name token -> embedder family, for a short column label ("BGE" is the paper's embedder).
EMBEDDER_FAMILIES = {"bge": "BGE", "minilm": "MiniLM", "mpnet": "MPNet", "e5": "E5", "gte": "GTE"}
ALWAYS_SHOWN = ("rouge1", "embed_sim", "laj")
LOWER_IS_BETTER = {"ref_loss"}
# results.json metric key -> the per-example field of predictions.jsonl it is the mean of.
EXAMPLE_FIELDS = {"rouge1": "rouge1", "embed_sim": "embed_sim", "laj": "laj", "accuracy": "correct",
                  "ll_accuracy": "ll_correct", "ref_loss": "ref_loss"}
# Paired comparisons: each method against these rows (Random at the table's fraction, Full Data at 100 %).
PAIRED_REFERENCES = ("random", "full")
BETTER, WORSE = "▲", "▼"
DEFAULT_RESAMPLES = 10_000
CONFIDENCE = 0.95
MISSING = "–"
DEFAULT_CURVE_METRIC = "finetune/rouge1"


@dataclass
class Run:
    """One results.json, reduced to what the tables need."""

    path: Path
    selector: str
    selector_config: dict | None  # the selector's constructor settings (None in older results.json)
    method: str  # the selector, plus the settings that set it apart from its other runs (assign_methods)
    name: str  # the row name: the paper's, plus those settings in words
    settings: dict[str, str]  # setting -> value in words, for the settings that make the method a variant
    fraction: float
    seed: int
    stage: str | None
    model: str | None
    experiment: str | None
    n_pool: int | None
    metrics_by_mode: dict[str, dict]
    judge: dict | None
    embedder: str | None
    kernel: dict | None  # results.json "kernel": how each utility kernel was computed (DELIFT only)
    # mode -> example id -> metric key -> score (predictions.jsonl; empty without it)
    examples: dict[str, dict[str, dict[str, float]]]
    example_sources: dict[str, str]  # example id -> evaluation source, where known
    selection_report: dict | None = None  # results.json "selection_report": what the subset holds


def _fraction_of(results: dict, path: Path) -> float:
    selector = results["selector"]
    if selector in FIXED_FRACTIONS:
        return FIXED_FRACTIONS[selector]
    if results.get("fraction") is not None:
        return round(float(results["fraction"]), 4)
    if results.get("n_selected") is not None and results.get("n_pool"):
        # Older runs did not record the fraction: the realised subset size is the next best thing.
        return round(results["n_selected"] / results["n_pool"], 3)
    raise DeliftInputError("no fraction (nor n_selected and n_pool) to place this run in a table",
                           file=path, field="fraction")


def _embedder_name(results: dict) -> str | None:
    embedder = results.get("embedder")
    if isinstance(embedder, dict):
        return embedder.get("name")
    return embedder


def _source_of(row: dict, example_id: str) -> str | None:
    """The row's evaluation source: its `source`, else the id up to the first "/" (ids are <source>/<id>)."""
    if isinstance(row.get("source"), str):
        return row["source"]
    source, slash, _ = example_id.partition("/")
    return source if slash else None


def load_examples(path: Path) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, str]]:
    """Per-example scores from the predictions.jsonl beside a results.json (mode -> id -> metric -> score,
    in results.json's metric keys; unscored examples, such as an unparsed judge reply, are left out) and
    each example's evaluation source (id -> source, for the ids that name one)."""
    examples: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    sources: dict[str, str] = {}
    if not path.exists():
        return {}, {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DeliftInputError(f"not valid JSON ({err})", file=path, record=line_number) from err
        if not isinstance(row, dict) or row.get("id") is None:
            raise DeliftInputError("expected an object with an id", file=path, record=line_number, field="id")
        scores = {metric: float(row[field]) for metric, field in EXAMPLE_FIELDS.items()
                  if isinstance(row.get(field), (int, float)) and not np.isnan(row[field])}
        example_id = str(row["id"])
        examples[row.get("mode", "finetune")][example_id] = scores
        source = _source_of(row, example_id)
        if source is not None:
            sources[example_id] = source
    return dict(examples), sources


def load_run(path: Path) -> Run | None:
    """The run in `path`, or None when it has no metrics (a select-only or kernel-only job)."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DeliftInputError(f"not valid JSON ({err})", file=path) from err
    if not isinstance(results, dict):
        raise DeliftInputError("expected a JSON object", file=path)
    if "metrics_by_mode" in results:
        by_mode = {mode: metrics for mode, metrics in results["metrics_by_mode"].items() if metrics}
    elif "metrics" in results:
        by_mode = {results.get("mode", "finetune"): results["metrics"]}
    else:
        return None
    unknown = set(by_mode) - set(MODES)
    if unknown:
        raise DeliftInputError(f"unknown evaluation mode(s) {sorted(unknown)}; expected {sorted(MODES)}",
                               file=path, field="metrics_by_mode")
    for mode, metrics in by_mode.items():
        if not isinstance(metrics, dict):
            raise DeliftInputError("expected an object of metric values", file=path, field=f"metrics_by_mode.{mode}")
        for metric in METRICS:
            value = metrics.get(metric)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise DeliftInputError(f"expected a number, got {value!r}", file=path, field=f"{mode}.{metric}")
    for field in ("selector", "seed"):
        if results.get(field) is None:
            raise DeliftInputError("missing", file=path, field=field)
    config = results.get("selector_config")
    if config is not None and not isinstance(config, dict):
        raise DeliftInputError(f"expected an object of settings, got {config!r}", file=path, field="selector_config")
    examples, example_sources = load_examples(path.parent / "predictions.jsonl")
    selector = results["selector"]
    return Run(path=path, selector=selector, selector_config=config, method=selector, name=row_name(selector),
               settings={}, fraction=_fraction_of(results, path), seed=int(results["seed"]),
               stage=results.get("stage"), model=results.get("model"), experiment=results.get("experiment"),
               n_pool=results.get("n_pool"), metrics_by_mode=by_mode, judge=results.get("judge"),
               embedder=_embedder_name(results), kernel=results.get("kernel"), examples=examples,
               example_sources=example_sources, selection_report=_selection_report(results, path))


def _selection_report(results: dict, path: Path) -> dict | None:
    report = results.get("selection_report")
    if report is None:
        return None
    if not isinstance(report, dict) or not isinstance(report.get("sources", {}), dict):
        raise DeliftInputError("expected an object with a 'sources' object", file=path, field="selection_report")
    return report


def _setting_text(config: dict, key: str) -> str:
    if key not in config:
        return NOT_RECORDED
    value = config[key]
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def assign_methods(runs: list[Run]) -> None:
    """Split each selector's runs by the selector_config entries that differ among them (fraction and name
    aside): each configuration becomes a method of its own, keyed `selector[key=value,...]` and named
    "Row (key value, ...)" by those entries alone. A selector whose runs share one configuration keeps
    its plain key and row name; runs without selector_config among variants are "(settings not recorded)"."""
    by_selector = defaultdict(list)
    for run in runs:
        by_selector[run.selector].append(run)
    for selector, group in by_selector.items():
        configs = [run.selector_config for run in group if run.selector_config is not None]
        keys = dict.fromkeys(key for config in configs for key in config if key not in NOT_SETTINGS)
        varying = [key for key in keys if len({_setting_text(config, key) for config in configs}) > 1]
        if not varying:
            continue
        if selector in REFERENCE_SELECTORS:
            # "vs Random" needs one Random row; averaging two configurations would hide a difference.
            raise DeliftInputError(f"the {row_name(selector)} runs differ in {', '.join(varying)}; the tables need "
                                   f"one {row_name(selector)} configuration: pass only one configuration's folders",
                                   file=group[0].path, field="selector_config")
        for run in group:
            if run.selector_config is None:
                run.settings = {key: NOT_RECORDED for key in varying}
                run.method, run.name = f"{selector}[{NOT_RECORDED}]", f"{row_name(selector)} (settings {NOT_RECORDED})"
                continue
            run.settings = {key: _setting_text(run.selector_config, key) for key in varying}
            run.method = f"{selector}[" + ",".join(f"{key}={value}" for key, value in run.settings.items()) + "]"
            run.name = f"{row_name(selector)} (" + ", ".join(
                f"{key.replace('_', '-')} {value}" for key, value in run.settings.items()) + ")"


def collect_runs(run_dirs: list[Path]) -> tuple[list[Run], int]:
    """Every run with metrics under `run_dirs`, and how many results.json files had none."""
    paths = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not run_dir.exists():
            raise DeliftInputError("no such folder", file=run_dir)
        paths += [run_dir] if run_dir.is_file() else sorted(run_dir.rglob("results.json"))
    if not paths:
        raise DeliftInputError("no results.json under these folders", file=", ".join(map(str, run_dirs)))
    runs, skipped = [], 0
    for path in sorted(set(paths)):
        run = load_run(path)
        if run is None:
            skipped += 1
        else:
            runs.append(run)
    if not runs:
        raise DeliftInputError("none of the results.json files has metrics (only select/kernel jobs?)",
                               file=", ".join(map(str, run_dirs)))
    assign_methods(runs)
    seen = {}
    for run in runs:
        key = (run.method, run.fraction, run.seed, run.model, run.stage, run.experiment)
        if key in seen:
            # Averaging a rerun with its original would count one seed twice.
            raise DeliftInputError(f"same method ({run.name}), fraction, seed, model and stage as {seen[key]}; "
                                   "pass only one of the two folders", file=run.path)
        seen[key] = run.path
    return runs, skipped


def table_fraction(runs: list[Run], requested: float | None = None) -> float | None:
    """The subset fraction of the main table: `requested`, else the most common one (ties: the smaller)."""
    if requested is not None:
        return round(float(requested), 4)
    counts = Counter(run.fraction for run in runs if run.selector not in FIXED_FRACTIONS and run.fraction != 1.0)
    if not counts:
        return None
    return min(counts, key=lambda fraction: (-counts[fraction], fraction))


def row_name(selector: str) -> str:
    return PAPER_ROWS.get(selector, selector)


def group_by_method(runs) -> dict[str, list[Run]]:
    """Runs per method, in row order: paper rows first, in the paper's order, then any other selector by
    name; the variants of one selector together, by name."""
    paper_order = {selector: index for index, selector in enumerate(PAPER_ROWS)}
    groups = defaultdict(list)
    for run in sorted(runs, key=lambda run: (paper_order.get(run.selector, len(paper_order)), run.selector, run.name)):
        groups[run.method].append(run)
    return dict(groups)


def method_fields(run: Run) -> dict:
    """What names a row in the JSON: its method key, selector, distinguishing settings and row name."""
    return {"method": run.method, "selector": run.selector, "settings": run.settings, "name": run.name}


def summarize(values: list[float]) -> dict | None:
    """Mean, sample std (ddof=1; None for one value) and count, or None when there is nothing."""
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else None
    return {"mean": float(array.mean()), "std": std, "n": len(array)}


def metric_values(runs: list[Run], mode: str, metric: str) -> list[float]:
    """The metric of each run that has it, in table units."""
    factor = METRICS[metric][1]
    return [run.metrics_by_mode[mode][metric] * factor for run in runs
            if run.metrics_by_mode.get(mode, {}).get(metric) is not None]


def table_columns(runs: list[Run]) -> list[tuple[str, str]]:
    """(mode, metric) pairs: for each mode some run measured, the paper's three (LAJ only where some run
    was judged), plus the other metrics where any run has them."""
    judged = any(metric_values(runs, mode, "laj") for mode in MODES)
    columns = []
    for mode in MODES:
        if not any(run.metrics_by_mode.get(mode) for run in runs):
            continue
        shown = [metric for metric in ALWAYS_SHOWN if metric != "laj" or judged]
        shown += [metric for metric in METRICS if metric not in ALWAYS_SHOWN and metric_values(runs, mode, metric)]
        columns += [(mode, metric) for metric in shown]
    return columns


def _embedder_family(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    tokens = re.split(r"[-_.]", base.lower())
    return next((family for token, family in EMBEDDER_FAMILIES.items() if token in tokens), base)


def embedder_label(embedders: list[str]) -> str:
    """The embedding similarity's column label: "BGE" (the paper's) only where every run used a BGE model,
    else the one family the runs used, e.g. "Emb. sim. (MiniLM)"; plain "Emb. sim." for several or none."""
    families = {_embedder_family(name) for name in embedders}
    if families == {"BGE"}:
        return "BGE"
    return f"{METRICS['embed_sim'][0]} ({families.pop()})" if len(families) == 1 else METRICS["embed_sim"][0]


def metric_label(metric: str, runs: list[Run]) -> str:
    return embedder_label(_names(run.embedder for run in runs)) if metric == "embed_sim" else METRICS[metric][0]


def column_headers(columns: list[tuple[str, str]], runs: list[Run]) -> list[dict]:
    """(mode, metric) pairs as the tables' column entries: the cells' key and the header's words."""
    return [{"key": f"{mode}/{metric}", "mode": MODES[mode], "metric": metric_label(metric, runs)}
            for mode, metric in columns]


def _in_table(run: Run, fraction: float | None) -> bool:
    return run.selector in FIXED_FRACTIONS or run.fraction == fraction


def _names(values) -> list[str]:
    return sorted({value for value in values if value})


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def _judge_sentence(runs: list[Run]) -> str:
    judges = defaultdict(bool)  # judge name -> whether any run used it as a stand-in
    for run in runs:
        if run.judge:
            judges[run.judge.get("name") or "unnamed"] |= bool(run.judge.get("stand_in"))
    if not judges:
        has_laj = any(run.metrics_by_mode[mode].get("laj") is not None for run in runs for mode in run.metrics_by_mode)
        return "LAJ judge: not recorded." if has_laj else ""
    described = [f"{name} (stand-in judge, not Prometheus)" if stand_in else name
                 for name, stand_in in sorted(judges.items())]
    return f"LAJ judge: {', '.join(described)}."


def _parse_failure_sentence(runs: list[Run]) -> str:
    failures = judged = 0
    for run in runs:
        for metrics in run.metrics_by_mode.values():
            failures += metrics.get("laj_parse_failures") or 0
            judged += metrics.get("laj_n") or 0
    if not failures:
        return ""
    out_of = f" of {judged}" if judged else ""
    return f"LAJ parse failures: {failures}{out_of} judge replies could not be parsed (over all runs in the table)."


# results.json "kernel" keys -> words: the pool x pool kernel, and the FLMI (task) or FLCG (continual) side one.
KERNEL_ROLES = {"kernel": "pool kernel", "query_kernel": "query kernel (pool x target)",
                "private_kernel": "private kernel (pool x existing)"}


def describe_kernel(details: dict) -> str:
    """One kernel's engine in words: exact, or which approximation and how many pairs it scored."""
    engine = details.get("engine", "fast")
    if not details.get("approximation"):
        return f"exact ({engine} engine)"
    text = f"approximate, {engine} engine"
    if engine == "knn":
        text += f" (k = {details.get('knn_k')} nearest by {details.get('features') or 'embedding'} features"
        text += f", {details['knn_random']} random more)" if details.get("knn_random") else ")"
    if details.get("exact_pairs") and details.get("all_pairs"):
        text += f": {details['exact_pairs']:,} of {details['all_pairs']:,} pairs scored exactly"
    return text


def _kernel_sentence(runs: list[Run]) -> str:
    """Which engine made the DELIFT utility kernels: an approximate one changes what the rows measure."""
    described = defaultdict(set)
    for run in runs:
        for role, details in (run.kernel or {}).items():
            if isinstance(details, dict):
                described[KERNEL_ROLES.get(role, role)].add(describe_kernel(details))
    if not described:
        return ""
    return "DELIFT utility kernels: " + "; ".join(f"{role} {' / '.join(sorted(texts))}"
                                                  for role, texts in sorted(described.items())) + "."


def make_caption(runs: list[Run], rows: list[dict], columns: list[tuple[str, str]], fraction: float | None) -> str:
    """What a reader needs to trust the numbers: setup, units, seeds, judge and its failures."""
    models, stages = _names(r.model for r in runs), _names(r.stage for r in runs)
    experiments, embedders = _names(r.experiment for r in runs), _names(r.embedder for r in runs)
    pools = sorted({r.n_pool for r in runs if r.n_pool})
    seeds = sorted({r.seed for r in runs})

    setup = f"Model{'s' if len(models) > 1 else ''}: {', '.join(models) or 'not recorded'}. "
    setup += f"Stage: {', '.join(stages) or 'not recorded'}"
    setup += f" (experiment {', '.join(experiments)})." if experiments else "."
    subsets = f"Subsets: {_pct(fraction)} of the pool" if fraction is not None else "No subset runs"
    subsets += f" of {', '.join(map(str, pools))} examples" if pools else ""
    present = {row["selector"] for row in rows}
    subsets += "; Full Data uses all of it" if "full" in present else ""
    subsets += "; Initial is the base model without fine-tuning." if "initial" in present else "."
    shown_modes = {mode for mode, _ in columns}
    modes = "; ".join(text for mode, text in (
        ("icl", "ICL = the model prompted with demonstrations from the subset"),
        ("finetune", "Fine-tuned = after (Q)LoRA fine-tuning on the subset")) if mode in shown_modes)
    modes += "." if modes else ""
    units = f"ROUGE = ROUGE-1 F1 x 100 and {embedder_label(embedders)} = cosine similarity of sentence embeddings"
    units += f" ({', '.join(embedders)})" if embedders else " (embedder not recorded)"
    units += " of prediction and reference x 100, both in percent as in the paper"
    shown = {metric for _, metric in columns}
    units += "; LAJ = LLM-as-judge score (1-5)" if "laj" in shown else ""
    units += "; Acc. = accuracy in percent" if "accuracy" in shown else ""
    units += ("; LL Acc. = accuracy of the option with the highest log-likelihood, in percent"
              if "ll_accuracy" in shown else "")
    units += ("; Loss = mean token negative log-likelihood of the reference answer (nats, lower is better)"
              if "ref_loss" in shown else "")
    units += "."
    cells = (f"Cells: mean ± sample std (ddof=1) over seeds ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: "
             f"{', '.join(map(str, seeds))}); a cell without ± comes from a single seed (n=1); "
             f"{MISSING} = not measured.")
    single = [row["name"] for row in rows if row["n_seeds"] == 1]
    single_seed = f"Single seed (n=1): {', '.join(single)}." if single and len(seeds) > 1 else ""
    variants = ("Rows of one selector run with different settings are named by the settings in which they differ "
                "(results.json selector_config); their other settings are the same."
                if any(row["settings"] for row in rows) else "")
    parts = [setup, subsets, modes, units, cells, single_seed, variants, _kernel_sentence(runs), _judge_sentence(runs),
             _parse_failure_sentence(runs)]
    return " ".join(part for part in parts if part)


def bootstrap_mean(values, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> dict:
    """The mean of `values` and its percentile bootstrap interval: `resamples` means of len(values) draws
    with replacement, from a numpy Generator seeded with `seed` (the same values give the same interval)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means, chunk = [], max(1, 2_000_000 // len(values))  # bounded memory for large evaluation sets
    for start in range(0, resamples, chunk):
        draws = rng.integers(0, len(values), size=(min(chunk, resamples - start), len(values)))
        means.append(values[draws].mean(axis=1))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(np.concatenate(means), [tail, 100 - tail])
    return {"mean": float(values.mean()), "lo": float(low), "hi": float(high)}


def verdict(interval: dict, metric: str) -> str | None:
    """"better" or "worse" than the reference where the interval of the difference excludes 0, else None."""
    if interval["lo"] > 0 or interval["hi"] < 0:
        higher = interval["lo"] > 0
        return "better" if higher != (metric in LOWER_IS_BETTER) else "worse"
    return None


def paired_differences(runs: list[Run], references: list[Run], mode: str, metric: str,
                       source: str | None = None) -> tuple[list[float], dict]:
    """method - reference per (seed, example id) scored in both (table units), and the examples paired per seed;
    with `source`, that evaluation source's examples only."""
    factor = METRICS[metric][1]
    by_seed = {run.seed: run for run in references}
    differences, per_seed = [], {}
    for run in sorted(runs, key=lambda run: run.seed):
        reference = by_seed.get(run.seed)
        if reference is None:
            continue
        ours, theirs = run.examples.get(mode, {}), reference.examples.get(mode, {})
        paired = [i for i in ours if metric in ours[i] and metric in theirs.get(i, {})
                  and (source is None or run.example_sources.get(i) == source)]
        if paired:
            per_seed[run.seed] = len(paired)
            differences += [(ours[i][metric] - theirs[i][metric]) * factor for i in paired]
    return differences, per_seed


def paired_cell(runs: list[Run], references: list[Run], mode: str, metric: str, resamples: int,
               seed: int, source: str | None = None) -> dict | None:
    """One paired comparison (over one evaluation source's examples with `source`): the mean difference, its
    bootstrap interval, the verdict, the seeds and the evaluation examples paired per seed (n_eval, in the
    order of `seeds`); None without pairs."""
    differences, per_seed = paired_differences(runs, references, mode, metric, source)
    if not differences:
        return None
    interval = bootstrap_mean(differences, resamples, seed)
    seeds = sorted(per_seed)
    return interval | {"verdict": verdict(interval, metric), "n_pairs": len(differences), "seeds": seeds,
                       "n_eval": [per_seed[s] for s in seeds]}


def paired_comparisons(by_method: dict[str, list[Run]], columns: list[tuple[str, str]], resamples: int,
                       seed: int) -> dict | None:
    """Against each reference row present (Random, Full Data), every other row's paired cell per column;
    None where no run has per-example scores. (A reference selector has one method: assign_methods.)"""
    references = []
    for reference in PAIRED_REFERENCES:
        if reference not in by_method:
            continue
        rows = [method_fields(group[0]) | {
                    "cells": {f"{mode}/{metric}": paired_cell(group, by_method[reference], mode, metric, resamples,
                                                              seed) for mode, metric in columns}}
                for method, group in by_method.items() if method != reference]
        if any(cell for row in rows for cell in row["cells"].values()):
            references.append({"method": reference, "selector": reference, "name": row_name(reference),
                               "rows": rows})
    if not references:
        return None
    return {"resamples": resamples, "seed": seed, "confidence": CONFIDENCE, "references": references}


def _span(sizes: list[int]) -> str:
    """"750" or "129-750": the sorted sizes' range."""
    return f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"


def _pair_counts(cells) -> str:
    """How many pairs the paired cells (None for no pairs) rest on, e.g. "129-750"."""
    return _span(sorted({cell["n_pairs"] for cell in cells if cell}))


def paired_caption(paired: dict) -> str:
    pairs = _pair_counts(cell for reference in paired["references"] for row in reference["rows"]
                         for cell in row["cells"].values())
    return (f"Paired differences: method - reference over (seed, evaluation example) pairs, the two runs of a seed "
            f"sharing their evaluation examples, in table units; [lo, hi] = {100 * paired['confidence']:g} % "
            f"percentile bootstrap interval of the mean difference ({paired['resamples']:,} resamples of the pairs, "
            f"seed {paired['seed']}); {pairs} pairs per cell (seeds x evaluation examples scored in both runs). "
            f"{BETTER} better, {WORSE} worse than the reference, marked only where the interval excludes 0 "
            f"(Loss: lower is better); {MISSING} = no pairs.")


def paired_by_fraction(runs: list[Run], resamples: int, seed: int) -> dict | None:
    """Each subset method against Random at every fraction both were run at: what a budget curve's
    overlapping error bars cannot say. None unless some method meets Random at several fractions."""
    subset_runs = [run for run in runs if run.selector not in FIXED_FRACTIONS]
    columns = table_columns(subset_runs)
    rows = []
    for fraction in sorted({run.fraction for run in subset_runs}):
        by_method = group_by_method(run for run in subset_runs if run.fraction == fraction)
        references = by_method.get("random")
        if not references:
            continue
        for method, group in by_method.items():
            if method == "random":
                continue
            cells = {f"{mode}/{metric}": paired_cell(group, references, mode, metric, resamples, seed)
                     for mode, metric in columns}
            if any(cells.values()):
                rows.append(method_fields(group[0]) | {"name": f"{group[0].name} at {_pct(fraction)}",
                                                       "fraction": fraction, "cells": cells})
    if len({row["fraction"] for row in rows}) < 2:
        return None
    pairs = _pair_counts(cell for row in rows for cell in row["cells"].values())
    return {"columns": column_headers(columns, subset_runs), "rows": rows,
            "caption": (f"Each method - Random at the same subset size, over the (seed, evaluation example) pairs "
                        f"of the seeds both ran ({pairs} pairs per cell), in table units; "
                        f"[lo, hi] = {100 * CONFIDENCE:g} % percentile bootstrap interval ({resamples:,} resamples, "
                        f"seed {seed}); {BETTER} better, {WORSE} worse, marked only where the interval excludes 0 "
                        f"(Loss: lower is better).")}


def source_mean(run: Run, source: str, mode: str, metric: str) -> float | None:
    """The run's mean over one evaluation source's scored examples, in table units; None without any."""
    scores = [scores[metric] for example_id, scores in run.examples.get(mode, {}).items()
              if metric in scores and run.example_sources.get(example_id) == source]
    return METRICS[metric][1] * float(np.mean(scores)) if scores else None


def _example_counts(runs: list[Run], source: str) -> list[int]:
    """The distinct numbers of evaluation examples of `source` in the runs with predictions."""
    return sorted({Counter(run.example_sources.values())[source] for run in runs if run.example_sources})


def by_source_tables(by_method: dict[str, list[Run]], columns: list[tuple[str, str]], resamples: int,
                     seed: int) -> dict | None:
    """Method x evaluation source: each cell the mean ± std over seeds of a run's mean over that source's
    examples, and (`vs_random`) each method's paired difference from Random on that source's examples.
    None unless the predictions hold two or more sources: a mixture's average can hide where a method
    wins and where it loses."""
    runs = [run for group in by_method.values() for run in group]
    sources = sorted({source for run in runs for source in run.example_sources.values()})
    if len(sources) < 2:
        return None
    rows, differences = [], []
    for method, group in by_method.items():
        for source in sources:
            measured = [run for run in group if source in run.example_sources.values()]
            if not measured:
                continue
            cells = {f"{mode}/{metric}": summarize([mean for run in measured
                                                    if (mean := source_mean(run, source, mode, metric)) is not None])
                     for mode, metric in columns}
            rows.append(method_fields(group[0]) | {"source": source, "seeds": sorted(run.seed for run in measured),
                                                   "cells": cells})
            if method != "random" and "random" in by_method:
                cells = {f"{mode}/{metric}": paired_cell(group, by_method["random"], mode, metric, resamples, seed,
                                                         source) for mode, metric in columns}
                if any(cells.values()):
                    differences.append(method_fields(group[0]) | {"source": source, "cells": cells})
    counts = {source: _example_counts(runs, source) for source in sources}
    examples = ", ".join(f"{source} {_span(count)}" for source, count in counts.items())
    vs_random = None
    if differences:
        pairs = _pair_counts(cell for row in differences for cell in row["cells"].values())
        vs_random = {"rows": differences, "caption": (
            f"Per evaluation source: method - Random over the (seed, evaluation example) pairs of that source "
            f"({pairs} pairs per cell), in table units; [lo, hi] = {100 * CONFIDENCE:g} % percentile bootstrap "
            f"interval ({resamples:,} resamples of the pairs, seed {seed}); {BETTER} better, {WORSE} worse than "
            f"Random on that source, marked only where the interval excludes 0 (Loss: lower is better); "
            f"{MISSING} = no pairs.")}
    return {"eval_sources": [{"source": source, "examples_per_run": count} for source, count in counts.items()],
            "columns": column_headers(columns, runs), "rows": rows, "vs_random": vs_random,
            "caption": (f"Per evaluation source ({len(sources)} sources; evaluation examples per run: {examples}): "
                        f"each cell is the mean ± sample std (ddof=1) over seeds of a run's mean over that source's "
                        f"examples, in the main table's units; a cell without ± comes from a single seed; "
                        f"{MISSING} = not measured.")}


def subsets_table(by_method: dict[str, list[Run]]) -> dict | None:
    """What each method's subsets hold, from the runs' selection reports: records per source (mean
    over seeds), the median response length in tokens and, for DELIFT, the share of the objective
    that is self-coverage and the overlap with the records of largest self-utility. None without
    reports; Initial and Full Data (no choice made) are left out."""
    reports = {method: [run.selection_report for run in group
                        if run.selection_report and run.selector not in FIXED_FRACTIONS]
               for method, group in by_method.items()}
    reports = {method: found for method, found in reports.items() if found}
    if not reports:
        return None
    every = [report for found in reports.values() for report in found]
    sources: dict[str, int] = {}  # source -> its pool count, in the reports' order
    for report in every:
        for source, counts in report.get("sources", {}).items():
            sources.setdefault(source, counts.get("pool"))
    pool_tokens = next((tokens for report in every
                        if (tokens := (report.get("response_tokens") or {}).get("pool", {}).get("p50")) is not None), None)
    rows = []
    for method, found in reports.items():
        def values(read):
            return [value for report in found if (value := read(report)) is not None]

        rows.append(method_fields(by_method[method][0]) | {
            "n_seeds": len(found),
            "counts": {source: summarize(values(lambda r, s=source: r.get("sources", {}).get(s, {}).get("subset", 0)))
                       for source in sources},
            "median_response_tokens": summarize(values(
                lambda r: (r.get("response_tokens") or {}).get("subset", {}).get("p50"))),
            "self_coverage_share": summarize(values(lambda r: r.get("self_coverage_share"))),
            "diagonal_top_overlap": summarize(values(lambda r: r.get("diagonal_top_overlap")))})
    return {"sources": [{"source": source, "pool": pool} for source, pool in sources.items()],
            "pool_median_response_tokens": pool_tokens, "rows": rows,
            "caption": ("What the subsets hold (each run's selection report): records per source, mean ± sample "
                        "std over seeds (the pool's count in the header); the median response length in tokens; "
                        "for DELIFT, the share of the objective's value that is self-coverage (a record "
                        "covering itself), read with every record's own entry included as the reference code "
                        "reads it, also for the rows that exclude it from selection, and the share of the subset "
                        f"among the records of largest self-utility; {MISSING} = not measured.")}


def build_table(runs: list[Run], fraction: float | None, title: str | None = None, *,
                resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
    """The main table as plain data: columns, rows with {mean, std, n} cells (table units), caption."""
    in_table = [run for run in runs if _in_table(run, fraction)]
    if fraction is not None and all(run.selector in FIXED_FRACTIONS for run in in_table):
        raise DeliftInputError(f"no subset run at fraction {fraction} (fractions present: "
                               f"{sorted({run.fraction for run in runs})})", field="--fraction")
    columns = table_columns(in_table)
    by_method = group_by_method(in_table)
    rows = []
    for group in by_method.values():
        cells = {f"{mode}/{metric}": summarize(metric_values(group, mode, metric)) for mode, metric in columns}
        rows.append(method_fields(group[0]) | {"fraction": group[0].fraction, "n_seeds": len(group),
                                               "seeds": sorted(run.seed for run in group), "cells": cells})
    if title is None:
        label = ", ".join(_names(r.experiment for r in in_table) or _names(r.stage for r in in_table)) or "results"
        subset = f", subsets at {_pct(fraction)}" if fraction is not None else ""
        title = f"{label}: {', '.join(_names(r.model for r in in_table)) or 'model not recorded'}{subset}"
    paired = paired_comparisons(by_method, columns, resamples, seed)
    if paired is not None:
        paired["caption"] = paired_caption(paired)
    return {"title": title, "fraction": fraction,
            "units": f"ROUGE, {metric_label('embed_sim', in_table)}, accuracies in percent; LAJ 1-5; "
                     "Loss in nats per token",
            "columns": column_headers(columns, in_table),
            "rows": rows, "caption": make_caption(in_table, rows, columns, fraction), "paired": paired,
            "paired_by_fraction": paired_by_fraction(runs, resamples, seed),
            "by_source": by_source_tables(by_method, columns, resamples, seed),
            "subsets": subsets_table(by_method),
            "sources": [str(run.path) for run in in_table]}


def format_cell(cell: dict | None, digits: int = 2) -> str:
    if cell is None:
        return MISSING
    if cell["std"] is None:
        return f"{cell['mean']:.{digits}f}"
    return f"{cell['mean']:.{digits}f} ± {cell['std']:.{digits}f}"


MARKS = {"better": BETTER, "worse": WORSE, None: ""}


def format_difference(cell: dict | None) -> str:
    """+1.23 [0.40, 2.05] ▲: the mean difference, its interval and, where it excludes 0, the verdict."""
    if cell is None:
        return MISSING
    return f"{_signed(cell['mean'])} [{cell['lo']:.2f}, {cell['hi']:.2f}] {MARKS[cell['verdict']]}".rstrip()


def _signed(value: float) -> str:
    return f"{round(value, 2) + 0.0:+.2f}"  # + 0.0: a difference rounding to zero shows as +0.00, not -0.00


def _row_labels(with_source: bool) -> list[str]:
    return ["name", "source"] if with_source else ["name"]


def _markdown_lines(header: list[str], rows: list[list[str]], n_labels: int) -> list[str]:
    """A Markdown table: the first `n_labels` columns left-aligned, the numbers right-aligned."""
    align = [":---"] * n_labels + ["---:"] * (len(header) - n_labels)
    return (["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
            + ["| " + " | ".join(row) + " |" for row in rows])


def _markdown_grid(columns: list[dict], rows: list[dict], format_row_cell, with_source: bool = False) -> list[str]:
    labels = _row_labels(with_source)
    header = ["Method", "Source"][:len(labels)] + [f"{c['mode']} {c['metric']}" for c in columns]
    return _markdown_lines(header, [[row[label] for label in labels]
                                    + [format_row_cell(row["cells"][c["key"]]) for c in columns] for row in rows],
                           len(labels))


def to_markdown(table: dict) -> str:
    lines = _markdown_grid(table["columns"], table["rows"], format_cell)
    text = "\n".join(lines) + "\n\n" + f"**Table: {table['title']}.** {table['caption']}\n"
    for reference in (table.get("paired") or {}).get("references", []):
        grid = _markdown_grid(table["columns"], reference["rows"], format_difference)
        text += (f"\n**Paired differences vs {reference['name']}** ({table['title']}).\n\n" + "\n".join(grid) + "\n")
    if table.get("paired"):
        text += f"\n{table['paired']['caption']}\n"
    by_fraction = table.get("paired_by_fraction")
    if by_fraction:
        grid = _markdown_grid(by_fraction["columns"], by_fraction["rows"], format_difference)
        text += (f"\n**Paired differences vs Random at each subset size.**\n\n" + "\n".join(grid) + "\n\n"
                 f"{by_fraction['caption']}\n")
    by_source = table.get("by_source")
    if by_source:
        grid = _markdown_grid(by_source["columns"], by_source["rows"], format_cell, with_source=True)
        text += (f"\n**Per evaluation source** ({table['title']}).\n\n" + "\n".join(grid) + "\n\n"
                 f"{by_source['caption']}\n")
        if by_source["vs_random"]:
            grid = _markdown_grid(by_source["columns"], by_source["vs_random"]["rows"], format_difference,
                                  with_source=True)
            text += (f"\n**Paired differences vs Random per evaluation source** ({table['title']}).\n\n"
                     + "\n".join(grid) + "\n\n" + f"{by_source['vs_random']['caption']}\n")
    subsets = table.get("subsets")
    if subsets:
        header, rows = subsets_grid(subsets)
        text += (f"\n**What the subsets hold** ({table['title']}).\n\n" + "\n".join(_markdown_lines(header, rows, 1))
                 + f"\n\n{subsets['caption']}\n")
    return text


def subsets_grid(subsets: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the subsets table: counts to one decimal, shares to two."""
    pool_tokens = subsets["pool_median_response_tokens"]
    header = (["Method"] + [f"{s['source']} (pool {s['pool']})" for s in subsets["sources"]]
              + [f"Median response tokens (pool {pool_tokens:g})" if pool_tokens is not None
                 else "Median response tokens", "Self-coverage share", "Top-of-diagonal overlap"])
    rows = [[row["name"]] + [format_cell(row["counts"][s["source"]], 1) for s in subsets["sources"]]
            + [format_cell(row["median_response_tokens"], 1), format_cell(row["self_coverage_share"]),
               format_cell(row["diagonal_top_overlap"])] for row in subsets["rows"]]
    return header, rows


LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "±": r"$\pm$", "–": "--", "<": r"\textless{}", ">": r"\textgreater{}",
                  BETTER: r"$\uparrow$", WORSE: r"$\downarrow$"}


def latex_escape(text: str) -> str:
    return "".join(LATEX_SPECIALS.get(char, char) for char in str(text))


def _latex_cell(cell: dict | None) -> str:
    if cell is None:
        return "--"
    if cell["std"] is None:
        return f"{cell['mean']:.2f}"
    return f"${cell['mean']:.2f} \\pm {cell['std']:.2f}$"


def _latex_difference(cell: dict | None) -> str:
    if cell is None:
        return "--"
    mark = latex_escape(MARKS[cell["verdict"]])
    return f"${_signed(cell['mean'])}$ [{cell['lo']:.2f}, {cell['hi']:.2f}] {mark}".rstrip()


def to_latex(table: dict, label: str = "results") -> str:
    text = "% Generated by experiments/make_tables.py; edit the runs, not this file.\n"
    text += _latex_table(table["columns"], table["rows"], _latex_cell, f"{table['title']}.", table["caption"], label)
    for reference in (table.get("paired") or {}).get("references", []):
        text += _latex_table(table["columns"], reference["rows"], _latex_difference,
                             f"{table['title']}: paired differences vs {reference['name']}.",
                             table["paired"]["caption"], f"{label}-vs-{reference['selector']}")
    by_fraction = table.get("paired_by_fraction")
    if by_fraction:
        text += _latex_table(by_fraction["columns"], by_fraction["rows"], _latex_difference,
                             "Paired differences vs Random at each subset size.", by_fraction["caption"],
                             f"{label}-vs-random-by-fraction")
    by_source = table.get("by_source")
    if by_source:
        text += _latex_table(by_source["columns"], by_source["rows"], _latex_cell,
                             f"{table['title']}: per evaluation source.", by_source["caption"], f"{label}-by-source",
                             with_source=True)
        if by_source["vs_random"]:
            text += _latex_table(by_source["columns"], by_source["vs_random"]["rows"], _latex_difference,
                                 f"{table['title']}: paired differences vs Random per evaluation source.",
                                 by_source["vs_random"]["caption"], f"{label}-by-source-vs-random", with_source=True)
    subsets = table.get("subsets")
    if subsets:
        header, rows = subsets_grid(subsets)
        text += _latex_float("l" + "r" * (len(header) - 1), [" & ".join(latex_escape(h) for h in header) + r" \\"],
                             [" & ".join(latex_escape(cell) for cell in row) + r" \\" for row in rows],
                             f"{table['title']}: what the subsets hold.", subsets["caption"], f"{label}-subsets")
    return text


def _latex_table(columns: list[dict], rows: list[dict], format_row_cell, title: str, caption: str, label: str,
                 with_source: bool = False) -> str:
    labels = _row_labels(with_source)
    spans = []  # (mode, first column, last column), 1-based after the Method (and Source) columns
    for index, column in enumerate(columns, start=len(labels) + 1):
        if spans and spans[-1][0] == column["mode"]:
            spans[-1][2] = index
        else:
            spans.append([column["mode"], index, index])
    spec = "l" * len(labels) + "".join(" " + "c" * (last - first + 1) for _, first, last in spans)
    head = [" & " * len(labels) + " & ".join(rf"\multicolumn{{{last - first + 1}}}{{c}}{{{latex_escape(mode)}}}"
                                             for mode, first, last in spans) + r" \\",
            " ".join(rf"\cmidrule(lr){{{first}-{last}}}" for _, first, last in spans),
            " & ".join(["Method", "Source"][:len(labels)] + [latex_escape(c["metric"]) for c in columns]) + r" \\"]
    body = [" & ".join([latex_escape(row[label]) for label in labels]
                       + [format_row_cell(row["cells"][c["key"]]) for c in columns]) + r" \\" for row in rows]
    return _latex_float(spec, head, body, title, caption, label)


def _latex_float(spec: str, head: list[str], body: list[str], title: str, caption: str, label: str) -> str:
    """A booktabs table float: column spec, header lines, body lines, bold title, caption and label."""
    safe_label = re.sub(r"[^A-Za-z0-9:_-]", "-", label)
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{" + spec + "}", r"\toprule", *head, r"\midrule",
             *body, r"\bottomrule", r"\end{tabular}",
             rf"\caption{{\textbf{{{latex_escape(title)}}} {latex_escape(caption)}}}",
             rf"\label{{tab:{safe_label}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _curve_key(runs: list[Run], requested: str) -> str | None:
    """`requested` ("mode/metric") if any run has it; a fine-tuned metric falls back to its ICL twin."""
    mode, _, metric = requested.partition("/")
    if mode not in MODES or metric not in METRICS:
        raise DeliftInputError(f"expected MODE/METRIC with MODE in {sorted(MODES)} and METRIC in {sorted(METRICS)}, "
                               f"got {requested!r}", field="--curve-metric")
    if metric_values(runs, mode, metric):
        return requested
    if mode == "finetune" and metric_values(runs, "icl", metric):
        return f"icl/{metric}"
    return None


def example_values(runs: list[Run], mode: str, metric: str) -> list[float]:
    """The per-example scores of every run that has them, over (seed, example), in table units."""
    factor = METRICS[metric][1]
    return [scores[metric] * factor for run in runs for scores in run.examples.get(mode, {}).values()
            if metric in scores]


def budget_curves(runs: list[Run], requested: str = DEFAULT_CURVE_METRIC, *, resamples: int = DEFAULT_RESAMPLES,
                  seed: int = 0) -> dict | None:
    """Per subset method, the metric at each fraction (`methods`, their row names in `names`); None unless
    some method has several fractions.

    Each point is {mean, std, n} over seeds; with per-example scores also `pooled`: the mean over
    (seed, example) and its bootstrap interval (lo, hi), which the plot's error bars show, and, for a
    method other than Random, `vs_random`: its paired difference from Random at that fraction
    (pairing cancels the example-to-example spread that widens the per-point intervals).
    """
    key = _curve_key(runs, requested)
    if key is None:
        return None
    mode, metric = key.split("/")
    random_at = defaultdict(list)
    for run in runs:
        if run.method == "random":
            random_at[run.fraction].append(run)
    lines, names, references = {}, {}, {}
    for method, runs_of_method in group_by_method(runs).items():
        by_fraction = defaultdict(list)
        for run in runs_of_method:
            by_fraction[run.fraction].append(run)
        for fraction, group in sorted(by_fraction.items()):
            summary = summarize(metric_values(group, mode, metric))
            if summary is None:
                continue
            scores = example_values(group, mode, metric)
            summary["pooled"] = bootstrap_mean(scores, resamples, seed) if scores else None
            if group[0].selector in FIXED_FRACTIONS:
                references[method] = summary
                continue
            point = {"fraction": fraction, **summary}
            if method != "random" and random_at.get(fraction):
                point["vs_random"] = paired_cell(group, random_at[fraction], mode, metric, resamples, seed)
            lines.setdefault(method, []).append(point)
            names[method] = group[0].name
    if not any(len(points) > 1 for points in lines.values()):
        return None
    factor = METRICS[metric][1]
    source = ", ".join(_names(r.experiment for r in runs) or _names(r.stage for r in runs))
    return {"metric": key,
            "label": f"{MODES[mode]} {metric_label(metric, runs)}" + (" (%)" if factor == 100.0 else ""),
            "title": f"Budget curve: {source}, {', '.join(_names(r.model for r in runs))}".rstrip(", "),
            "methods": lines, "names": names, "references": references}


def plot_budget(curves: dict, path: Path) -> Path:
    """Metric against subset size (% of the pool), a line with error bars per method, Full/Initial as
    references; below it, where runs were paired, each method's difference from Random with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    differences = {method: [p for p in points if p.get("vs_random")]
                   for method, points in curves["methods"].items() if method != "random"}
    differences = {method: points for method, points in differences.items() if points}
    if differences:
        fig, (ax, below_ax) = plt.subplots(2, 1, figsize=(6.4, 6.4), sharex=True, height_ratios=(3, 2))
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = dict(zip(curves["methods"], plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    bootstrapped = False
    for method, points in curves["methods"].items():
        x = np.array([100 * p["fraction"] for p in points])
        mean, below, above = [], [], []
        for point in points:
            if point["pooled"]:  # the bootstrap interval of the mean over (seed, example)
                pooled = point["pooled"]
                mean.append(pooled["mean"])
                below.append(pooled["mean"] - pooled["lo"])
                above.append(pooled["hi"] - pooled["mean"])
                bootstrapped = True
            else:  # results.json alone: ± the std over seeds
                mean.append(point["mean"])
                below.append(point["std"] or 0.0)
                above.append(point["std"] or 0.0)
        ax.errorbar(x, mean, yerr=[below, above], marker="o", capsize=3, color=colors[method],
                    label=curves["names"][method])
    styles = {"full": ("--", "black"), "initial": (":", "gray")}
    for method, summary in curves["references"].items():  # one configuration each, keyed by selector
        linestyle, color = styles[method]
        pooled = summary["pooled"]
        ax.axhline(pooled["mean"] if pooled else summary["mean"], linestyle=linestyle, color=color,
                   label=row_name(method))
        if pooled:
            ax.axhspan(pooled["lo"], pooled["hi"], color=color, alpha=0.1, linewidth=0)
    bars = "95 % bootstrap interval over (seed, example)" if bootstrapped else "± std over seeds"
    ax.set(ylabel=curves["label"], title="\n".join(textwrap.wrap(curves["title"], 70)))
    ax.title.set_fontsize("medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    bottom = ax
    if differences:
        for method, points in differences.items():
            cells = [p["vs_random"] for p in points]
            below_ax.errorbar([100 * p["fraction"] for p in points], [c["mean"] for c in cells],
                              yerr=[[c["mean"] - c["lo"] for c in cells], [c["hi"] - c["mean"] for c in cells]],
                              marker="o", capsize=3, color=colors[method])
        below_ax.axhline(0.0, color=colors.get("random", "gray"), linewidth=1)
        better = "lower" if curves["metric"].split("/")[1] in LOWER_IS_BETTER else "higher"
        below_ax.set(ylabel=f"minus Random ({better} is better)")
        below_ax.grid(alpha=0.3)
        bottom = below_ax
        bars += "; below: paired difference from Random at the same size, 95 % paired bootstrap interval"
    bottom.set_xlabel("subset size (% of the pool)\n" + "\n".join(textwrap.wrap(f"error bars: {bars}", 90)),
                      fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_subsets(subsets: dict, title: str, path: Path) -> Path:
    """One stacked bar per method: its records per pool source (mean over seeds), under a bar of the
    pool's mix scaled to the same subset size, so a lopsided subset shows at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = [entry["source"] for entry in subsets["sources"]]
    names = [row["name"] for row in subsets["rows"]]
    counts = np.array([[row["counts"][source]["mean"] for source in sources] for row in subsets["rows"]])
    pool = np.array([entry["pool"] or 0 for entry in subsets["sources"]], dtype=float)
    size = counts.sum(axis=1).max()
    bars = np.vstack([pool * size / pool.sum(), counts]) if pool.sum() else counts
    labels = ([f"Pool's mix (scaled to {size:g})"] if pool.sum() else []) + names
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 2.0))
    left = np.zeros(len(labels))
    for k, source in enumerate(sources):
        ax.barh(labels, bars[:, k], left=left, label=source)
        for y, (start, width) in enumerate(zip(left, bars[:, k])):
            if width >= 1.5:
                ax.text(start + width / 2, y, f"{width:.0f}", ha="center", va="center", fontsize="x-small")
        left += bars[:, k]
    ax.invert_yaxis()
    ax.set_xlabel("records in the subset (mean over seeds)")
    fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize="medium")
    ax.legend(fontsize="small", ncols=len(sources), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grid_commands(runs: list[Run]) -> list[str]:
    """The `run.py -m` command of each Hydra multirun the runs come from, rebuilt from its multirun.yaml."""
    commands = []
    for sweep_dir in sorted({run.path.parent.parent for run in runs}):
        saved = sweep_dir / "multirun.yaml"
        if not saved.is_file():
            continue
        overrides = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("hydra", {}).get("overrides", {})
        hydra_overrides = [_portable_sweep_dir(o) for o in overrides.get("hydra", []) if o != "hydra.mode=MULTIRUN"]
        arguments = [*overrides.get("task", []), *hydra_overrides]
        commands.append("python run.py -m " + " ".join(map(_shell_word, arguments)))
    return list(dict.fromkeys(commands))


def _shell_word(argument: str) -> str:
    """shlex.quote, but an argument holding single quotes (Hydra's quoted sweep values, such as
    `hydra.sweeper.params.selector='a,b'`) in double quotes, which reads as it was typed."""
    if "'" in argument and not any(char in argument for char in '"$`\\!'):
        return f'"{argument}"'
    return shlex.quote(argument)


def _portable_sweep_dir(override: str) -> str:
    """`hydra.sweep.dir=<absolute path under the working directory>` made relative to it: the published
    command then runs from any checkout, not only from the machine that made the grid."""
    key, _, value = override.partition("=")
    path, here = Path(value), Path.cwd()
    if key != "hydra.sweep.dir" or not path.is_relative_to(here):  # a relative path is never under an absolute one
        return override
    return f"{key}={path.relative_to(here)}"


def write_outputs(table: dict, curves: dict | None, out: Path) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    aggregated = json.dumps({**table, "budget_curves": curves}, indent=2, ensure_ascii=False) + "\n"
    markdown, latex = to_markdown(table), to_latex(table, label=out.name)
    if table.get("commands"):
        commands = [*table["commands"]["grids"], table["commands"]["tables"]]
        markdown += "\nMade with:\n\n```bash\n" + "\n".join(commands) + "\n```\n"
        latex += "\n% Made with:\n" + "".join(f"% {command}\n" for command in commands)
    for suffix, text in ((".md", markdown), (".tex", latex), (".json", aggregated)):
        path = out.with_name(out.name + suffix)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    if curves is not None:
        written.append(plot_budget(curves, out.with_name(out.name + "_budget.png")))
    if table.get("subsets"):
        written.append(plot_subsets(table["subsets"], f"What the subsets hold: {table['title']}",
                                    out.with_name(out.name + "_subsets.png")))
    return written


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="folders searched recursively for results.json")
    parser.add_argument("--out", type=Path, help="output path without suffix, e.g. docs/results/mixinstruct")
    parser.add_argument("--title", help="table title (default: experiment, model and fraction)")
    parser.add_argument("--fraction", type=float, help="subset fraction of the main table (default: the most common)")
    parser.add_argument("--curve-metric", default=DEFAULT_CURVE_METRIC,
                        help="MODE/METRIC of the budget curve, e.g. icl/embed_sim (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES,
                        help="bootstrap resamples of the paired differences and curve points (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        runs, skipped = collect_runs(args.run_dirs)
        fraction = table_fraction(runs, args.fraction)
        if args.bootstrap < 1:
            raise DeliftInputError(f"must be at least 1, got {args.bootstrap}", field="--bootstrap")
        table = build_table(runs, fraction, args.title, resamples=args.bootstrap, seed=args.seed)
        table["commands"] = {"grids": grid_commands(runs), "tables": "python experiments/make_tables.py " + shlex.join(
            sys.argv[1:] if argv is None else argv)}
        curves = budget_curves(runs, args.curve_metric, resamples=args.bootstrap, seed=args.seed)
    except DeliftInputError as err:
        print(f"make_tables: error: {err}", file=sys.stderr)
        return 2
    if skipped:
        print(f"make_tables: skipped {skipped} results.json without metrics (select/kernel jobs)", file=sys.stderr)
    if len(_names(run.model for run in runs)) > 1 or len(_names(run.stage for run in runs)) > 1:
        print("make_tables: warning: the runs span several models or stages; rows average over all of them",
              file=sys.stderr)
    print(to_markdown(table))
    if args.out:
        for path in write_outputs(table, curves, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
