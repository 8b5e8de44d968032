"""The DELIFT pairwise in-context utility kernel (DELIFT, ICLR 2025).

    UF[i, j] = d(y_i | x_i) - d(y_i | demo_j, x_i),   d = ||p - 1||_2 / sqrt(T)

p_t is the full-vocabulary softmax probability of the t-th ground-truth token under teacher
forcing, over the T response tokens plus one closing EOS (T counts that EOS); no log, no clipping.
Row i is the example being helped, column j the demonstration; i == j is computed too.

Public API
----------
compute_kernel(model, tokenizer, rows, cols=None, *, template=None, engine="fast", batch_size=16,
               tile_size=64, cache_dir=None, max_length=1024, trainer_options=None,
               model_identity=None, progress=True, knn_k=32, knn_random=0, features="embedder",
               embedder=None, ann=None, proxy=None, seed=0, details=None, shard=None,
               num_shards=1) -> np.ndarray | csr_matrix | None
    Raw UF (float32, len(rows) x len(cols)), before normalisation; cols=None means cols = rows.
    - template: None, a UtilityTemplate, or a dict overriding its fields (record formatting
      `prompt`/`response`, the `zero_shot`/`one_shot` templates and their instructions).
    - engine: "naive" (the oracle: one full pass per pair), "fast" (same numbers, |diff| ~1e-6 in
      fp32: each demonstration block and each shared query opening runs once and its KV cache is
      reused, the output head runs only at scored positions, length-bucketed batches); both
      return a dense array. APPROXIMATIONS, returning a scipy CSR matrix (sparse.py): "knn" (the
      exact utility of each row's knn_k nearest columns + knn_random random ones, by cosine of
      record vectors: `features` "embedder" (needs `embedder`) or "model"; faiss, see graph.py,
      `ann` = {flat_max, nlist, nprobe}) and "proxy" (exact utilities of a seeded sample,
      `proxy={"sample": {"rows", "random"}, "network": {...}}`, and a learned network predicting
      every candidate pair; proxy.py). A missing entry is similarity 0 after normalisation.
    - batch_size: sequences per forward pass; tile_size: rows x columns per tile (the unit of
      resuming and of sharding; the fast engine holds one tile's demonstration caches at once).
    - cache_dir: tiles and the kernel go to <cache_dir>/utility_kernel/<key>/, key = content
      hash of model identity (`model_identity`, e.g. LoadedModel.identity, else name + SHA-256 of
      the weights) + parameter dtype, tokenizer, template, max_length, the row and column records
      and the approximation (with its seed). The exact engine is NOT in the key (naive and fast
      give the same numbers), nor batch or tile size. A second call returns the saved kernel; a
      killed run resumes from the finished tiles. Without cache_dir everything stays in memory.
    - trainer_options: Lightning Trainer arguments (accelerator, devices, strategy="ddp",
      num_nodes, callbacks...); tiles are spread over ranks (multi-process needs cache_dir).
    - shard, num_shards: independent jobs (a SLURM array) share one kernel. With num_shards > 1
      the call computes only shard `shard`'s tiles (0 <= shard < num_shards; the tile at plan
      position p belongs to shard p % num_shards, so jobs agree without talking) into cache_dir
      (required, on a filesystem every job sees) and returns None, writing no kernel file;
      approximate engines build or read the candidate graph and the scored pairs first (cached
      under a lock, the same in every job) and fit no proxy. A later call with the same arguments
      (tile_size included) and no shard assembles the kernel from the finished tiles, computing
      only missing ones.
      `details` of a shard: {shard, num_shards, tiles (whole plan), shard_tiles, computed,
      engine, approximation}. num_shards=1 (default) computes the whole kernel.
    - max_length: longer sequences lose prompt tokens from the left (one warning with a count);
      a response that alone does not fit raises DeliftInputError.
    - details: a dict filled with what the kernel cost (engine, exact pairs, zero-shot passes)
      and, for the proxy, its held-out error.
    - The plan (pairs, passes, tiles) and a calibrated time estimate are logged when work starts
      (plan.py).
    - The model runs in its own dtype (fp32 on CPU by default; load bf16/fp16 for GPUs); the
      softmax is taken in fp32. Empty responses, a tokenizer without EOS and non-finite results
      (naming the row and column ids) raise DeliftInputError; without a pad token EOS pads.
normalize_kernel(K) -> K01
    One global min-max to [0, 1] (float32); a constant kernel maps to all zeros; a sparse kernel
    is scaled over its stored entries.
UtilityTemplate
    The prompt templates (defaults: the reference code's) and record formatting.
"""

from delift.utility.formatting import UtilityTemplate
from delift.utility.kernel import compute_kernel, normalize_kernel

__all__ = ["UtilityTemplate", "compute_kernel", "normalize_kernel"]
