"""Scale benchmark: the non-LLM path of the approximate kernel engines (kernel.engine=knn|proxy) at n = 100,000.

    python experiments/bench_scale.py                               # n = 100,000 (the target run)
    OMP_NUM_THREADS=1 python experiments/bench_scale.py --n 3000    # a quick check
    python experiments/bench_scale.py --force                       # rerun every step
    python experiments/bench_scale.py --embed-dtype bfloat16 --work-dir outputs/bench_scale/n100000_bf16

Records: the offline pools (trivia, MMLU, GSM8K), one record per distinct text (23,764), in a seeded
order, repeated until there are --n. Copy c >= 1 of a record gets the id suffix `#copy<c>` and its
instruction a seeded phrase from VARIATIONS plus "(variant c)", so every text, hence every embedding,
is distinct while the copies of a record stay near-duplicates (as real pools have them).

Steps, each in a fresh subprocess (this script with --step) so that its peak RSS (ru_maxrss, which
the child reports itself; the orchestrating parent imports nothing heavy) and its wall time (imports
included) are its own; each writes .npy files and a <step>.json atomically into --work-dir, and a
finished step is skipped on rerun (unless --force or its options changed):
- embed:  all-MiniLM-L6-v2 (packaged) sentence embeddings of the records (delift.embeddings, no cache),
          in float32, or with --embed-dtype bfloat16 (the pipeline's `embedder.dtype=bfloat16`: the
          encoder under torch.autocast; 2.3x per CPU-second here on 512 texts, cosine to the float32
          embedding >= 0.99997);
- graph:  the candidate graph, k nearest columns per row (delift.utility.graph.candidate_graph: faiss
          IVF above 20,000 columns) and its recall@k against exact flat search on --recall-rows rows;
- proxy:  the proxy sample as the proxy engine draws it (delift.utility.sparse.proxy_sample), a
          proxy network trained on it (delift.utility.proxy.fit_proxy) and its predictions for every
          candidate pair. No LLM runs here, so the targets are a STAND-IN (cosine of the two
          embeddings + seeded Gaussian noise, sd 0.1): this step measures the proxy's time and
          memory, not its quality (experiments/bench_approx.py measures that against the exact kernel);
- select: the sparse CSR kernel (measured pairs over predicted ones, as the proxy engine builds it)
          and facility location greedy (delift.objectives.maximize) at a --fraction budget.

Then: the total wall time and the largest peak RSS against the targets (15 min, 8 GB), and the
plans (delift.utility.plan) at --plan-n records for exact, knn and proxy. Everything also goes to
<work-dir>/results.json.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # a step's wall time counts from here: imports and loading included

import os  # noqa: E402

# On a shared CPU, OpenMP threads that spin while waiting thrash when a core is taken by another
# job (we measured 30x slowdowns on 2 cores); sleeping waits cost nothing when the CPU is free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# numpy, torch and delift are imported inside the steps: the orchestrating parent stays small, so that
# nothing of it shows in a step's ru_maxrss (an exec'ed child inherits its parent's high-water mark).

EMBEDDER = "all-MiniLM-L6-v2"
VARIATIONS = ("Be brief.", "Be precise.", "Answer carefully.", "Think it through.", "Check the answer.",
              "Keep it short.", "Show the key step.", "Give the final answer clearly.")
STAND_IN_NOISE = 0.1
TARGET_SECONDS, TARGET_GB = 15 * 60, 8.0

# Each step's options; a step's outputs depend on its own and on every earlier step's.
STEPS = {
    "embed": ("n", "seed", "batch_size", "embed_dtype"),
    "graph": ("k", "knn_random", "recall_rows"),
    "proxy": ("sample_rows", "sample_random"),
    "select": ("fraction",),
}


def scaled_records(n: int, seed: int) -> list[dict]:
    """n records: the distinct-text pool records in a seeded order, repeated with varied copies (docstring)."""
    import numpy as np

    from delift.data.packaged import load_gsm8k_offline, load_mmlu_offline, load_trivia_offline
    from delift.records import make_record, record_text

    pool = [r for loader in (load_trivia_offline, load_mmlu_offline, load_gsm8k_offline) for r in loader()]
    first = {}
    for record in pool:
        first.setdefault(record_text(record), record)
    base = list(first.values())
    rng = np.random.default_rng([seed, 10])
    order = rng.permutation(len(base))
    phrases = rng.integers(0, len(VARIATIONS), size=n)
    records = []
    for k in range(n):
        copy, position = divmod(k, len(base))
        record = base[order[position]]
        if copy:
            record = make_record(f"{record['id']}#copy{copy}",
                                 f"{record['instruction']} {VARIATIONS[phrases[k]]} (variant {copy})",
                                 record["input"], record["output"], record["source"], record["meta"])
        records.append(record)
    return records


def step_embed(args, work: Path) -> dict:
    from delift.cache import save_npy
    from delift.embeddings import Embedder
    from delift.records import record_text

    texts = [record_text(r) for r in scaled_records(args.n, args.seed)]
    started = time.perf_counter()
    vectors = Embedder(EMBEDDER, packaged=True, batch_size=args.batch_size, dtype=args.embed_dtype).encode(texts)
    seconds = time.perf_counter() - started
    save_npy(work / "vectors.npy", vectors)
    distinct = len(set(texts))
    return {"records": len(texts), "distinct_texts": distinct, "dim": int(vectors.shape[1]),
            "mean_chars": sum(map(len, texts)) / len(texts), "encode_s": seconds,
            "summary": f"{len(texts):,} records ({distinct:,} distinct texts) -> {vectors.shape[1]}-dim, "
                       f"{len(texts) / seconds:.0f} texts/s, batch {args.batch_size}, {args.embed_dtype}"}


def load_graph(work: Path, n: int):
    from delift.cache import load_npy
    from delift.utility.graph import CandidateGraph

    return CandidateGraph(indptr=load_npy(work / "graph_indptr.npy"), indices=load_npy(work / "graph_indices.npy"),
                          n_cols=n)


def step_graph(args, work: Path) -> dict:
    import numpy as np

    from delift.cache import load_npy, save_npy
    from delift.utility.graph import ANN_DEFAULTS, candidate_graph, nearest_columns

    vectors = load_npy(work / "vectors.npy")
    n = len(vectors)
    started = time.perf_counter()
    graph = candidate_graph(vectors, vectors, args.k, random=args.knn_random, seed=args.seed, **ANN_DEFAULTS)
    seconds = time.perf_counter() - started
    save_npy(work / "graph_indptr.npy", graph.indptr)
    save_npy(work / "graph_indices.npy", graph.indices)

    # Recall@k: the share of each sampled row's exact k nearest columns (flat search over all n) in its candidates.
    sample = np.sort(np.random.default_rng([args.seed, 11]).choice(n, size=min(args.recall_rows, n), replace=False))
    exact = nearest_columns(vectors[sample], vectors, args.k, flat_max=n)
    found = [np.intersect1d(exact[s], graph.indices[graph.indptr[i]:graph.indptr[i + 1]]).size
             for s, i in enumerate(sample)]
    recall = float(np.sum(found) / exact.size)
    if n > ANN_DEFAULTS["flat_max"]:
        nlist = ANN_DEFAULTS["nlist"] or int(4 * math.sqrt(n))  # graph.py's default
        index = f"IVF, nlist {nlist}, nprobe {min(ANN_DEFAULTS['nprobe'], nlist)}"
    else:
        index = "flat (exact)"
    return {"nnz": graph.nnz, "k": args.k, "knn_random": args.knn_random, "index": index, "graph_s": seconds,
            "recall": recall, "recall_rows": len(sample),
            "summary": f"nnz {graph.nnz:,} (k {args.k} + {args.knn_random} random), {index}; "
                       f"recall@{args.k} {recall:.4f} vs exact search on {len(sample):,} rows"}


def stand_in_utility(vectors, rows, cols, seed: int):
    """NOT an LLM utility: cos(e_i, e_j) + seeded N(0, 0.1^2) noise, so that the proxy has something to fit."""
    import numpy as np

    cosine = np.einsum("pd,pd->p", vectors[rows], vectors[cols])  # unit rows
    noise = np.random.default_rng([seed, 12]).normal(0.0, STAND_IN_NOISE, size=len(rows))
    return (cosine + noise).astype(np.float32)


def step_proxy(args, work: Path) -> dict:
    import numpy as np

    from delift.cache import load_npy, save_npy
    from delift.utility.proxy import fit_proxy
    from delift.utility.sparse import proxy_sample

    vectors, graph = load_npy(work / "vectors.npy"), load_graph(work, args.n)
    rows, cols = proxy_sample(graph, {"rows": args.sample_rows, "random": args.sample_random}, args.seed)
    values = stand_in_utility(vectors, rows, cols, args.seed)
    started = time.perf_counter()
    fitted = fit_proxy(vectors, vectors, rows, cols, values, seed=args.seed, groups=rows, progress=False)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    predicted = fitted.predict(vectors, vectors, graph.pair_rows(), graph.indices)
    predict_seconds = time.perf_counter() - started
    for name, array in (("sample_rows", rows), ("sample_cols", cols), ("sample_values", values),
                        ("predicted", predicted)):
        save_npy(work / f"{name}.npy", array)
    metrics, sampled_rows = fitted.metrics, len(np.unique(rows))
    return {"sample_rows": sampled_rows, "sample_pairs": int(len(rows)),
            "predicted_pairs": int(len(predicted)), "fit_s": fit_seconds, "predict_s": predict_seconds,
            "targets": f"STAND-IN: cosine + N(0, {STAND_IN_NOISE}^2), not LLM utilities", "stand_in_metrics": metrics,
            "summary": f"trained on {len(rows):,} sampled pairs ({sampled_rows} rows) in {fit_seconds:.1f} s "
                       f"({metrics['epochs']} epochs), predicted {len(predicted):,} pairs in {predict_seconds:.1f} s "
                       f"({len(predicted) / predict_seconds / 1e6:.2f} M/s); STAND-IN targets, held-out Spearman "
                       f"{metrics['heldout_spearman']:.3f} is not a quality figure"}


def step_select(args, work: Path) -> dict:
    import numpy as np

    from delift.cache import load_npy, save_npy
    from delift.objectives import maximize
    from delift.utility.sparse import measured_over_predicted

    n = args.n
    graph = load_graph(work, n)
    measured = tuple(load_npy(work / f"sample_{part}.npy") for part in ("rows", "cols", "values"))
    started = time.perf_counter()
    kernel = measured_over_predicted((n, n), measured, (graph.pair_rows(), graph.indices,
                                                        load_npy(work / "predicted.npy")))
    build_seconds = time.perf_counter() - started
    budget = max(1, int(round(args.fraction * n)))
    started = time.perf_counter()
    result = maximize(kernel, budget, "fl", progress=False)
    greedy_seconds = time.perf_counter() - started
    save_npy(work / "selected.npy", np.asarray(result.indices, dtype=np.int64))
    save_npy(work / "gains.npy", np.asarray(result.gains, dtype=np.float64))
    positive = int(np.count_nonzero(np.asarray(result.gains) > 0))
    return {"nnz": int(kernel.nnz), "budget": budget, "value": result.value, "positive_gain_picks": positive,
            "build_s": build_seconds, "greedy_s": greedy_seconds,
            "summary": f"CSR {n:,} x {n:,}, nnz {kernel.nnz:,} (built in {build_seconds:.1f} s); FL greedy "
                       f"budget {budget:,} in {greedy_seconds:.1f} s ({positive:,} picks with gain > 0)"}


STEP_FUNCTIONS = {"embed": step_embed, "graph": step_graph, "proxy": step_proxy, "select": step_select}


def step_config(args, step: str) -> dict:
    names = [name for s in list(STEPS)[:list(STEPS).index(step) + 1] for name in STEPS[s]]
    return {name: getattr(args, name) for name in names}


def run_step(args, work: Path) -> None:
    """Inside the subprocess: run one step, then record its figures and this process's peak RSS."""
    import torch

    from delift.cache import save_json

    figures = STEP_FUNCTIONS[args.step](args, work)
    figures |= {"wall_s": time.perf_counter() - STARTED,
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
                "torch_threads": torch.get_num_threads(), "config": step_config(args, args.step)}
    save_json(work / f"{args.step}.json", figures)  # last: its presence marks the step finished


def finished_step(args, work: Path, step: str) -> dict | None:
    path = work / f"{step}.json"
    if args.force or not path.exists():
        return None
    figures = json.loads(path.read_text(encoding="utf-8"))
    return figures if figures.get("config") == step_config(args, step) else None


def plan_rows(n: int, k: int) -> list[dict]:
    """Exact, knn and proxy plans for an n x n kernel: what the LLM would have to score."""
    from delift.utility.plan import plan_kernel

    variants = [("exact", {"engine": "fast"}), (f"knn k={k}", {"engine": "knn", "knn_k": k}),
                ("knn k=4", {"engine": "knn", "knn_k": 4})]
    for rows in (0.01, 0.002):
        variants.append((f"proxy rows {rows} (k={k} + 8 random)",
                         {"engine": "proxy", "knn_k": k, "proxy": {"sample": {"rows": rows, "random": 8}}}))
    plans = [(name, plan_kernel(n, n, **options)) for name, options in variants]
    exact_passes = plans[0][1].exact_pairs + plans[0][1].zero_shot_passes
    return [{"name": name, **plan.to_dict(), "llm_passes": plan.exact_pairs + plan.zero_shot_passes,
             "fewer_than_exact": exact_passes / (plan.exact_pairs + plan.zero_shot_passes)}
            for name, plan in plans]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000, help="records (the kernel is n x n)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128, help="embedding batch")
    parser.add_argument("--embed-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the embedder's dtype (embedder.dtype): bfloat16 runs it under torch.autocast")
    parser.add_argument("--k", type=int, default=16, help="nearest columns per row in the candidate graph")
    parser.add_argument("--knn-random", type=int, default=0, help="random columns per row in the candidate graph")
    parser.add_argument("--recall-rows", type=int, default=1000, help="rows on which the graph's recall is measured")
    parser.add_argument("--sample-rows", type=float, default=200,
                        help="proxy sample: rows whose pairs would be scored exactly, a count or a fraction (< 1)")
    parser.add_argument("--sample-random", type=int, default=8, help="proxy sample: random columns per sampled row")
    parser.add_argument("--fraction", type=float, default=0.3, help="FL budget as a share of n")
    parser.add_argument("--plan-n", type=int, default=100_000, help="records for the printed plans")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: outputs/bench_scale/n<N>")
    parser.add_argument("--force", action="store_true", help="rerun finished steps")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work_dir or Path("outputs/bench_scale") / f"n{args.n}"
    work.mkdir(parents=True, exist_ok=True)
    if args.step:
        run_step(args, work)
        return

    results, rerun = {}, False
    for step in STEPS:
        figures = None if rerun else finished_step(args, work, step)
        reused = figures is not None
        if not reused:
            rerun = True  # later steps read this step's outputs: run them again too
            command = [sys.executable, __file__, "--step", step, "--work-dir", str(work)]
            for name in step_config(args, step):
                command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            if subprocess.run(command).returncode != 0:
                sys.exit(f"step {step} failed; the steps before it are saved in {work}: rerun to resume")
            figures = json.loads((work / f"{step}.json").read_text(encoding="utf-8"))
        results[step] = figures
        print(f"{step:>6}: {figures['wall_s']:7.1f} s  peak RSS {figures['peak_rss_gb']:5.2f} GB  "
              f"{figures['summary']}{'  (saved earlier)' if reused else ''}", flush=True)

    total = sum(f["wall_s"] for f in results.values())
    peak = max(f["peak_rss_gb"] for f in results.values())
    print(f" total: {total:7.1f} s = {total / 60:.1f} min (target < {TARGET_SECONDS / 60:.0f} min: "
          f"{'met' if total < TARGET_SECONDS else 'MISSED'}); max peak RSS {peak:.2f} GB (target < {TARGET_GB:g} GB: "
          f"{'met' if peak < TARGET_GB else 'MISSED'}); n = {args.n:,}, torch threads "
          f"{results['embed']['torch_threads']}")

    plans = plan_rows(args.plan_n, args.k)
    print(f"\nLLM work at n = {args.plan_n:,} (delift.utility.plan; passes = exact pairs + zero-shot passes):")
    for plan in plans:
        ratio = f"{plan['fewer_than_exact']:,.0f}x fewer than exact" if plan["engine"] != "fast" else "n^2 + n"
        predicted = f", proxy predicts {plan['predicted_pairs']:,} pairs" if plan["predicted_pairs"] else ""
        print(f"  {plan['name']:<34} {plan['exact_pairs']:>14,} pairs + {plan['zero_shot_passes']:>7,} zero-shot "
              f"= {plan['llm_passes']:>14,} passes ({ratio}){predicted}")

    from delift.cache import save_json

    save_json(work / "results.json", {"n": args.n, "steps": results, "total_wall_s": total, "max_peak_rss_gb": peak,
                                      "targets": {"wall_s": TARGET_SECONDS, "peak_rss_gb": TARGET_GB},
                                      "plan_n": args.plan_n, "plans": plans})
    print(f"\nwritten: {work / 'results.json'}")


if __name__ == "__main__":
    main()
