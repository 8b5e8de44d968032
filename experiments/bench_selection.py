"""Benchmark the two greedy backends of delift.objectives on Facility Location.

For each pool size n, a seeded random non-negative dense float32 n x n kernel; FL at a 30 % budget
with backend "ours" and backend "submodlib". Every (n, backend) runs in a fresh subprocess, so
its peak resident memory (ru_maxrss, which includes the 4 n^2-byte input kernel) is its own, under
an address-space limit (RLIMIT_AS) and a wall-clock timeout; a run that exceeds either is
reported as "did not finish". The time is the median over repeats of the `select` call alone
(kernel generation and imports excluded). Prints a Markdown table.

    python experiments/bench_selection.py                       # n = 2,000 5,000 10,000 20,000
    python experiments/bench_selection.py --sizes 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKENDS = ("ours", "submodlib")


def run_worker(n: int, backend: str, repeats: int, fraction: float, seed: int, out: Path) -> None:
    """Inside the subprocess: build the kernel, time `select`, write indices and measurements."""
    from delift.objectives import select

    if backend == "submodlib":
        import submodlib  # noqa: F401  (its import takes seconds: keep it out of the timing)

    kernel = np.random.default_rng(seed).random((n, n), dtype=np.float32)
    budget = int(fraction * n)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        indices = select(kernel, budget, "fl", backend=backend, progress=False)
        times.append(time.perf_counter() - start)
    np.save(out / "indices.npy", np.asarray(indices, dtype=np.int64))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    (out / "result.json").write_text(json.dumps({"times": times, "peak_gb": peak_kb / 2**20}))


def measure(n: int, backend: str, repeats: int, args) -> dict:
    """Run one (n, backend) in a fresh, limited subprocess; return its result or why it did not finish."""
    limit = int(args.memory_gb * 2**30)

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, __file__, "--worker", "--n", str(n), "--backend", backend, "--repeats",
                   str(repeats), "--fraction", str(args.fraction), "--seed", str(args.seed), "--out", folder]
        try:
            finished = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                      preexec_fn=limit_memory)
        except subprocess.TimeoutExpired:
            return {"status": f"did not finish: time (> {args.timeout:.0f} s)"}
        if finished.returncode != 0:
            memory_words = ("MemoryError", "bad_alloc", "Unable to allocate", "Cannot allocate")
            out_of_memory = finished.returncode < 0 or any(word in finished.stderr for word in memory_words)
            reason = f"memory (> {args.memory_gb:g} GB)" if out_of_memory else "error"
            tail = finished.stderr.strip().splitlines()[-1:] or [f"exit code {finished.returncode}"]
            return {"status": f"did not finish: {reason}", "detail": tail[0]}
        result = json.loads((Path(folder) / "result.json").read_text())
        result["indices"] = np.load(Path(folder) / "indices.npy")
        result["status"] = "ok"
        return result


def agreement(runs: dict) -> str:
    if any(run["status"] != "ok" for run in runs.values()):
        return "n/a"
    ours, theirs = runs["ours"]["indices"], runs["submodlib"]["indices"]
    if np.array_equal(ours, theirs):
        return "identical (same order)"
    differ = np.flatnonzero(ours != theirs)
    return f"differ from pick {int(differ[0])}" if len(differ) else "different lengths"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per run (default: 3 for n <= 5,000, 1 above)")
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-gb", type=float, default=16.0, help="address-space limit per run")
    parser.add_argument("--timeout", type=float, default=600.0, help="wall-clock limit per run, seconds")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run_worker(args.n, args.backend, args.repeats, args.fraction, args.seed, args.out)
        return

    rows = []
    for n in args.sizes:
        repeats = args.repeats or (3 if n <= 5000 else 1)
        runs = {}
        for backend in BACKENDS:
            runs[backend] = measure(n, backend, repeats, args)
            print(f"n={n} {backend}: {runs[backend]['status']} {runs[backend].get('detail', '')}", file=sys.stderr,
                  flush=True)
        agree = agreement(runs)
        for backend, run in runs.items():
            if run["status"] == "ok":
                time_cell = f"{statistics.median(run['times']):.2f}"
                memory_cell = f"{run['peak_gb']:.2f}"
            else:
                time_cell, memory_cell = run["status"], "-"
            rows.append(f"| {n:,} | {backend} | {repeats} | {time_cell} | {memory_cell} | {agree} |")

    print(f"FL, budget {args.fraction:.0%}, random uniform float32 kernels (seed {args.seed}); "
          f"limits {args.memory_gb:g} GB address space and {args.timeout:.0f} s per run.\n")
    print("| n | backend | repeats | median time (s) | peak RSS (GB, incl. input kernel) | selections |")
    print("| ---: | --- | ---: | ---: | ---: | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
