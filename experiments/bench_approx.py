"""How good are the APPROXIMATE kernel engines once self-utility is out of the picture? Each against
the exact DELIFT kernel of an experiment's pool, on that experiment's model (SmolLM2 offline).

    python experiments/bench_approx.py --experiment evidence_instruction --knn-k 1 2 4 8 16 \
        --features embedder model --proxy-rows 0.1 0.2

The records are the pool of an experiment preset (default evidence_instruction: 150 records), with
the preset's model and kernel options, so its exact kernel is the one the evidence grid computes and
caches (read, not recomputed; else computed into the tile cache, resumable).

Every record is its own best demonstration: UF_i(i) is the largest entry of nearly every row. So the
quality that matters is the objective *without* the diagonal (selector.self_utility=exclude); with it,
an approximation scores well by reproducing the diagonal's ranking, which every knn graph holds.

- knn is simulated from the exact kernel: the knn engine scores its candidate pairs (each row's own
  pair and its k nearest others, `delift.utility.graph.candidate_graph`) with the exact engine, so
  its kernel is the exact kernel restricted to that graph, built here from the engine's own graph
  code and vectors. Its cost is the engine's plan (n (k + 1) pairs + n zero-shot passes; features=
  model adds one pass per record) at the exact engine's rate measured in this run.
- proxy runs the real engine (a network learns the utilities of a sample of exact pairs).
- delift_se: the sentence-embedding kernel (no model passes); top_diagonal: the records of largest
  self-utility, what the diagonal alone would pick.

For each: FL at the preset's fraction, greedy on the approximation (missing pairs neutral, as the
DELIFT selector reads them), scored on the exact kernel as the share of the gap between random
subsets (mean of 20) and the exact greedy that it recovers, and its Jaccard overlap with the exact
greedy's subset; both with self-utility excluded (the headline) and included (as this benchmark
measured before); Spearman against the exact utilities over the stored off-diagonal pairs. Results
accumulate in `<work-dir>/results.json`, a table is printed and a plot written.
"""

from __future__ import annotations

import os

# Spinning OpenMP threads thrash a shared 2-core machine; sleeping waits cost nothing when it is free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from scipy import stats  # noqa: E402

from delift.cache import content_hash, save_json  # noqa: E402
from delift.embeddings import cosine_kernel01  # noqa: E402
from delift.objectives import SELF_UTILITIES, maximize, objective_value  # noqa: E402
from delift.records import record_text  # noqa: E402
from delift.selectors.base import budget_for  # noqa: E402
from delift.utility import compute_kernel  # noqa: E402
from delift.utility.graph import candidate_graph, record_vectors  # noqa: E402
from delift.utility.kernel import similarity_floor  # noqa: E402

RANDOM_SUBSETS = 20


def load_experiment(name: str, cache_dir: str | None):
    """The preset's composed config, its stage's pool, the loaded model, the embedder and kernel options."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from delift.config import CONF_DIR
    from delift.data import build_stage

    overrides = [f"+experiment={name}"] + ([f"paths.cache_dir={cache_dir}"] if cache_dir else [])
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # the presets' ${hydra:...} names resolve
    with open_dict(cfg):
        del cfg["hydra"]
    stage = build_stage(cfg.stage, cfg.seed)
    loaded = instantiate(cfg.model).load()
    return cfg, stage.pool, loaded, instantiate(cfg.embedder)


def exact_options(cfg) -> dict:
    return {"batch_size": cfg.kernel.batch_size, "tile_size": cfg.kernel.tile_size,
            "max_length": cfg.kernel.max_length, "cache_dir": cfg.paths.cache_dir}


def pairs_per_second(loaded, records, options: dict, rows: int) -> float:
    """The exact engine's rate on this machine now: a rows x rows sub-kernel timed without the cache."""
    started = time.perf_counter()
    compute_kernel(loaded.model, loaded.tokenizer, records[:rows], engine="fast", progress=False,
                   **{k: v for k, v in options.items() if k != "cache_dir"})
    return (rows * rows + rows) / (time.perf_counter() - started)


def restricted(exact: np.ndarray, graph) -> sp.csr_array:
    """The exact kernel on the candidate graph's pairs only: what the knn engine computes."""
    values = exact[graph.pair_rows(), graph.indices].astype(np.float32)
    return sp.csr_array((values, graph.indices, graph.indptr), shape=exact.shape)


def off_diagonal_spearman(exact: np.ndarray, approx) -> float | None:
    if not sp.issparse(approx):
        mask = ~np.eye(len(exact), dtype=bool)
        return float(stats.spearmanr(exact[mask], np.asarray(approx)[mask]).statistic)
    rows = np.repeat(np.arange(approx.shape[0]), np.diff(approx.indptr))
    off = rows != approx.indices
    if off.sum() < 3:
        return None
    return float(stats.spearmanr(exact[rows[off], approx.indices[off]], approx.data[off]).statistic)


def references(exact: np.ndarray, budget: int, seed: int) -> dict:
    """Per self-utility choice: the exact greedy's value and subset, and random subsets' mean value."""
    out = {}
    rng = np.random.default_rng(seed)
    randoms = [rng.choice(len(exact), budget, replace=False) for _ in range(RANDOM_SUBSETS)]
    for choice in SELF_UTILITIES:
        greedy = maximize(exact, budget, "fl", self_utility=choice, progress=False)
        values = [objective_value(exact, subset, "fl", self_utility=choice) for subset in randoms]
        out[choice] = {"exact_value": greedy.value, "exact_indices": greedy.indices,
                       "random_value": float(np.mean(values)), "random_std": float(np.std(values))}
    return out


def quality(exact: np.ndarray, approx, budget: int, reference: dict, picks: list[int] | None = None) -> dict:
    """Gap recovered and Jaccard of the approximation's greedy subset (or of `picks`), both ways."""
    out = {}
    for choice in SELF_UTILITIES:
        chosen = picks
        if chosen is None:
            floor = similarity_floor({"kernel": approx})
            chosen = maximize(approx, budget, "fl", self_utility=choice, floor=floor, progress=False).indices
        ref = reference[choice]
        value = objective_value(exact, chosen, "fl", self_utility=choice)
        out[choice] = {"fl_value": value,
                       "gap_recovered": (value - ref["random_value"]) / (ref["exact_value"] - ref["random_value"]),
                       "jaccard": len(set(chosen) & set(ref["exact_indices"])) /
                                  len(set(chosen) | set(ref["exact_indices"]))}
    return out


def configurations(args) -> list[dict]:
    configs = [{"name": "delift_se", "engine": "delift_se"}, {"name": "top_diagonal", "engine": "top_diagonal"}]
    configs += [{"name": f"knn_k{k}" + ("" if features == "embedder" else f"_{features}"), "engine": "knn",
                 "knn_k": k, "features": features} for features in args.features for k in args.knn_k]
    configs += [{"name": f"proxy_rows{rows:g}_k{args.proxy_k}", "engine": "proxy", "knn_k": args.proxy_k,
                 "features": "embedder", "proxy": {"sample": {"rows": rows, "random": args.proxy_random}}}
                for rows in args.proxy_rows]
    return configs


def run_configuration(config: dict, exact: np.ndarray, loaded, records, embedder, options: dict, rate: float,
                      seed: int) -> tuple[object, dict]:
    """(kernel or None, cost) of one configuration; top_diagonal returns its picks in the cost."""
    n = len(records)
    if config["engine"] == "delift_se":
        vectors = embedder.encode([record_text(r) for r in records])
        return cosine_kernel01(vectors, vectors), {"exact_pairs": 0, "zero_shot_passes": 0, "feature_passes": 0,
                                                   "seconds": None}
    if config["engine"] == "top_diagonal":
        return None, {"exact_pairs": n, "zero_shot_passes": n, "feature_passes": 0, "seconds": 2 * n / rate}
    features = config["features"]
    if config["engine"] == "knn":
        vectors = record_vectors(records, features, embedder=embedder, model=loaded.model, tokenizer=loaded.tokenizer,
                                 model_identity=loaded.identity, cache_dir=options["cache_dir"],
                                 max_length=options["max_length"], progress=False)
        graph = candidate_graph(vectors, vectors, config["knn_k"], self_pairs=True)
        feature_passes = n if features == "model" else 0
        return restricted(exact, graph), {"exact_pairs": graph.nnz, "zero_shot_passes": n,
                                          "feature_passes": feature_passes,
                                          "seconds": (graph.nnz + n + feature_passes) / rate}
    details = {}
    started = time.perf_counter()
    kernel = compute_kernel(loaded.model, loaded.tokenizer, records, engine="proxy", knn_k=config["knn_k"],
                            embedder=embedder, features=features, proxy=config["proxy"], seed=seed,
                            model_identity=loaded.identity, progress=False, details=details, **options)
    details["seconds"] = time.perf_counter() - started
    return kernel, details


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, choice in zip(axes, ("exclude", "include")):
        for name, row in results["configs"].items():
            x = max(row["exact_passes"], 1)
            y = 100 * row[choice]["gap_recovered"]
            ax.scatter(x, y)
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(90, color="grey", linestyle="--")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set(xscale="log", xlabel="exact model passes (log)",
               title=f"self-utility {choice}d" + (" (the headline)" if choice == "exclude" else ""))
    axes[0].set_ylabel("FL gap recovered, random -> exact greedy (%)")
    fig.suptitle(f"Approximate kernels vs exact: {results['experiment']} pool (n = {results['n']}, "
                 f"FL at {results['budget']} records); exact: {results['exact']['exact_passes']:,} passes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="evidence_instruction", help="the preset whose pool and model to use")
    parser.add_argument("--limit", type=int, default=None, help="only the first N pool records (a smoke run)")
    parser.add_argument("--knn-k", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--features", nargs="*", default=["embedder", "model"], choices=["embedder", "model"])
    parser.add_argument("--proxy-rows", type=float, nargs="*", default=[0.1, 0.2])
    parser.add_argument("--proxy-k", type=int, default=8, help="candidates per row the proxy predicts")
    parser.add_argument("--proxy-random", type=int, default=8, help="extra random columns per sampled row")
    parser.add_argument("--timing-rows", type=int, default=24, help="the exact rate is measured on this many rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=None, help="default outputs/bench_approx/<experiment>")
    parser.add_argument("--cache-dir", default=None, help="default: the preset's paths.cache_dir")
    parser.add_argument("--force", action="store_true", help="rerun finished configurations")
    args = parser.parse_args(argv)

    cfg, records, loaded, embedder = load_experiment(args.experiment, args.cache_dir)
    records = records[:args.limit] if args.limit else records
    options = exact_options(cfg)
    n = len(records)
    work = Path(args.work_dir or f"outputs/bench_approx/{args.experiment}" + (f"_n{n}" if args.limit else ""))
    work.mkdir(parents=True, exist_ok=True)

    exact = compute_kernel(loaded.model, loaded.tokenizer, records, engine="fast",
                           model_identity=loaded.identity, **options)
    budget = budget_for(n, float(cfg.selector.fraction))
    reference = references(exact, budget, args.seed)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    setup = {"experiment": args.experiment, "n": n, "seed": args.seed, "budget": budget,
             "records": content_hash([r["id"] for r in records])}
    if any(results.get(k) != v for k, v in setup.items()):
        results = dict(setup, configs={})
    if "pairs_per_second" not in results.get("exact", {}) or args.force:
        rows = min(n, args.timing_rows)
        results["exact"] = {"pairs_per_second": pairs_per_second(loaded, records, options, rows), "timing_rows": rows}
    rate = results["exact"]["pairs_per_second"]
    diagonal = np.diag(exact)
    off = exact[~np.eye(n, dtype=bool)]
    results["exact"] |= {
        "exact_passes": n * n + n, "seconds": (n * n + n) / rate,
        "rows_whose_max_is_the_diagonal": int((exact.argmax(axis=1) == np.arange(n)).sum()),
        "diagonal_mean": float(diagonal.mean()), "off_diagonal_mean": float(off.mean()),
        "off_diagonal_max": float(off.max()), "references": reference}
    print(f"{args.experiment}: n={n}, exact kernel {n * n + n:,} passes (~{(n * n + n) / rate / 60:.0f} min at "
          f"{rate:.1f} pairs/s measured now); the diagonal is the row maximum in "
          f"{results['exact']['rows_whose_max_is_the_diagonal']} of {n} rows (diagonal mean "
          f"{diagonal.mean():.3f}, off-diagonal mean {off.mean():.3f}, max {off.max():.3f}); FL budget {budget}")
    for choice in SELF_UTILITIES:
        ref = reference[choice]
        print(f"  self-utility {choice}: exact greedy {ref['exact_value']:.3f}, random {ref['random_value']:.3f} "
              f"± {ref['random_std']:.3f} (mean ± std of {RANDOM_SUBSETS})")

    for config in configurations(args):
        if config["name"] in results["configs"] and not args.force:
            continue
        kernel, cost = run_configuration(config, exact, loaded, records, embedder, options, rate, args.seed)
        picks = list(np.argsort(-diagonal, kind="stable")[:budget]) if config["engine"] == "top_diagonal" else None
        passes = cost["exact_pairs"] + cost["zero_shot_passes"]
        results["configs"][config["name"]] = {
            "config": config, "exact_passes": passes, "feature_passes": cost["feature_passes"],
            "seconds": cost["seconds"], "pass_ratio": (n * n + n) / passes if passes else None,
            "simulated": config["engine"] == "knn",
            "spearman_off_diagonal": None if kernel is None else off_diagonal_spearman(exact, kernel),
            "proxy": cost.get("proxy")} | quality(exact, kernel, budget, reference, picks)
        save_json(results_file, results)  # after every configuration: a killed run keeps what it finished

    print(f"{'configuration':<22}{'passes':>9}{'+feat.':>7}{'fewer':>8}{'minutes':>9}{'rho off-diag':>13}"
          f"{'gap % (excl.)':>15}{'Jaccard':>9}{'gap % (incl.)':>15}")
    for name, row in results["configs"].items():
        ratio = f"{row['pass_ratio']:.1f}x" if row["pass_ratio"] else "-"
        minutes = f"{row['seconds'] / 60:.1f}" if row["seconds"] is not None else "-"
        rho = f"{row['spearman_off_diagonal']:.3f}" if row["spearman_off_diagonal"] is not None else "-"
        print(f"{name:<22}{row['exact_passes']:>9,}{row['feature_passes']:>7}{ratio:>8}{minutes:>9}{rho:>13}"
              f"{100 * row['exclude']['gap_recovered']:>15.1f}{row['exclude']['jaccard']:>9.3f}"
              f"{100 * row['include']['gap_recovered']:>15.1f}")
    save_json(results_file, results)
    plot(results, work / "approx_quality.png")
    print(f"results: {results_file}; plot: {work / 'approx_quality.png'}")


if __name__ == "__main__":
    main()
