"""In-context prompting with the selected subset: each query gets its k nearest selected examples.

Nearness is the cosine of sentence embeddings: of the query's prompt (instruction + input) and of
each selected record whole (instruction + input + output), as the paper's reference code retrieves
(`subset_selection/inference_icl.py`, `create_icl_inference_data`: the pool is the selected
"Instruction/Input/Output" texts, the queries the prompts). The demonstrations are placed most
similar first, ties broken by subset order.
"""

from __future__ import annotations

import numpy as np

from delift.embeddings import encode_records
from delift.records import record_prompt


def nearest_demonstrations(queries: list[dict], selected: list[dict], embedder, k: int = 5) -> list[list[dict]]:
    """For each query, up to k selected records, most similar first (an empty list if none selected)."""
    if not selected or k <= 0:
        return [[] for _ in queries]
    query_vectors = embedder.encode([record_prompt(q) for q in queries])
    pool_vectors = encode_records(embedder, selected)
    similarity = query_vectors @ pool_vectors.T
    k = min(k, len(selected))
    # A stable sort on -similarity keeps the subset order among equal similarities.
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return [[selected[j] for j in row] for row in order]
