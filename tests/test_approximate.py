"""The approximate engines (knn, proxy): the candidate graph, sparse kernels, their cache, the plan,
and the pipeline runs that use them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from delift.errors import DeliftInputError
from delift.pipeline import run
from delift.records import make_record, record_text
from delift.utility import compute_kernel
from delift.utility import kernel as kernel_module
from delift.utility import graph as graph_module
from delift.utility import sparse as sparse_module
from delift.utility.graph import candidate_graph, nearest_columns, record_vectors
from delift.utility.plan import calibrate, describe, plan_kernel
from delift.utility.sparse import measured_over_predicted
from tests.helpers import SeededEmbedder, compose_config, run_cli

# One xdist worker takes the whole module (make test: --dist loadgroup): its module fixture is computed once.
pytestmark = pytest.mark.xdist_group("test_approximate")


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_graph_holds_each_rows_nearest_columns_plus_distinct_random_ones():
    cols = unit([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0.05], [-0.9, -0.3]])
    rows = unit([[1, 0.05], [0.05, 1], [-1, -0.1]])  # different records from the columns
    graph = candidate_graph(rows, cols, 2)
    assert graph.indptr.tolist() == [0, 2, 4, 6]
    assert graph.indices.tolist() == [0, 1, 2, 3, 4, 5]  # ascending within a row
    assert graph.pair_rows().tolist() == [0, 0, 1, 1, 2, 2]
    with_random = candidate_graph(rows, cols, 2, random=2, seed=3)
    assert np.diff(with_random.indptr).tolist() == [4, 4, 4]
    for i, near in enumerate([{0, 1}, {2, 3}, {4, 5}]):
        chosen = with_random.indices[with_random.indptr[i]:with_random.indptr[i + 1]]
        assert near <= set(chosen.tolist()) and len(set(chosen.tolist())) == 4
    again = candidate_graph(rows, cols, 2, random=2, seed=3)
    assert np.array_equal(again.indices, with_random.indices)  # seeded
    other = [candidate_graph(rows, cols, 2, random=2, seed=s).indices for s in range(4, 10)]
    assert any(not np.array_equal(o, with_random.indices) for o in other)
    # Past the columns there is nothing left to draw: every column, once.
    full = candidate_graph(rows, cols, 4, random=5)
    assert np.diff(full.indptr).tolist() == [6, 6, 6]
    with pytest.raises(DeliftInputError, match="kernel.knn_random"):
        candidate_graph(rows, cols, 2, random=-1)


def test_ivf_index_is_seeded_and_finds_the_clustered_neighbours():
    rng = np.random.default_rng(0)
    centres = unit(rng.standard_normal((20, 16)))
    cols = unit(np.repeat(centres, 30, axis=0) + 0.05 * rng.standard_normal((600, 16)))
    rows = cols[::7]
    exact = nearest_columns(rows, cols, 5)
    ivf = nearest_columns(rows, cols, 5, flat_max=100, nlist=20, nprobe=4, seed=1)
    assert np.array_equal(ivf, nearest_columns(rows, cols, 5, flat_max=100, nlist=20, nprobe=4, seed=1))
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(exact, ivf)])
    assert recall > 0.9
    assert exact[:, 0].tolist() == list(range(0, 600, 7))  # a record is its own nearest column


def test_model_features_are_mean_pooled_unit_vectors_and_cached(tiny_qwen2, toy_records, tmp_path, monkeypatch):
    vectors = record_vectors(toy_records, "model", model=tiny_qwen2.model, tokenizer=tiny_qwen2.tokenizer,
                             model_identity=tiny_qwen2.identity, cache_dir=tmp_path, progress=False)
    assert vectors.shape == (6, 64) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    # Batched and padded, the pooled state equals the one of each text run alone.
    alone = record_vectors(toy_records[:1], "model", model=tiny_qwen2.model, tokenizer=tiny_qwen2.tokenizer,
                           batch_size=1, progress=False)
    assert np.allclose(alone[0], vectors[0], atol=1e-5)
    assert len(list(tmp_path.rglob("*.npy"))) == 1
    monkeypatch.setattr(graph_module, "model_vectors", None)  # the second call must not run the model
    again = record_vectors(toy_records, "model", model=tiny_qwen2.model, tokenizer=tiny_qwen2.tokenizer,
                           model_identity=tiny_qwen2.identity, cache_dir=tmp_path, progress=False)
    assert np.array_equal(again, vectors)
    with pytest.raises(DeliftInputError, match="kernel.features"):
        record_vectors(toy_records, "bogus")


def test_measured_values_win_over_predictions_and_zeros_stay_stored():
    kernel = measured_over_predicted((2, 3), (np.array([0, 1]), np.array([2, 0]), np.array([0.0, 5.0])),
                                     (np.array([0, 0, 1]), np.array([0, 2, 1]), np.array([1.0, 9.0, 2.0])))
    assert kernel.nnz == 4 and kernel.indptr.tolist() == [0, 2, 4]
    assert kernel.indices.tolist() == [0, 2, 0, 1] and kernel.data.tolist() == [1.0, 0.0, 5.0, 2.0]


def test_unmeasured_pairs_read_as_neutral_demonstrations():
    from delift.objectives import objective_value
    from delift.utility.kernel import similarity_floor

    pool = sp.csr_matrix((np.array([0.4, -0.2, 0.0, 0.8], dtype=np.float32), [0, 1, 1, 2], [0, 2, 3, 4]),
                         shape=(3, 3))
    query = sp.csr_matrix(np.array([[0.2], [0.0], [-1.0]], dtype=np.float32))
    floor = similarity_floor({"kernel": pool, "query_kernel": query})
    assert floor == "zero"
    # max(UF, 0) over the joint maximum 0.8: harmful pairs read as neutral, missing pairs stay 0 (= UF 0):
    # the pool kernel reads [[0.5, 0, .], [., 0, .], [., ., 1]], so column 0 covers 0.5 and column 2 covers 1.
    for column, value in ((0, 0.5), (1, 0.0), (2, 1.0)):
        assert objective_value(pool, [column], "fl", floor=floor) == pytest.approx(value)
    # FLMI caps = the query kernel read the same way: 0.25, 0, 0.
    assert objective_value(pool, [0], "flmi", query_kernel=query, floor=floor) == pytest.approx(0.25)
    assert pool.data.tolist() == pytest.approx([0.4, -0.2, 0.0, 0.8])  # the caller's kernel is untouched
    # Exact kernels keep the objectives' min-max, and so does missing=bottom.
    assert similarity_floor({"kernel": np.eye(2), "query_kernel": None}) == "min"
    assert similarity_floor({"kernel": pool}, "bottom") == "min"
    with pytest.raises(DeliftInputError, match="selector.missing"):
        similarity_floor({"kernel": pool}, "middle")


class FixedEmbedder:
    """Hand-made vectors: records 0-2 and 3-5 form two tight groups."""

    def __init__(self, records):
        self.by_text = {record_text(r): k for k, r in enumerate(records)}

    def identity(self):
        return {"name": "fixed"}

    def encode(self, texts):
        return unit([[1.0, 0.1 * self.by_text[t]] if self.by_text[t] < 3 else [0.1 * self.by_text[t], 1.0]
                     for t in texts])


@pytest.fixture(scope="module")
def toy(smollm2):
    records = [make_record(f"t{i}", "Answer the question.", q, a) for i, (q, a) in enumerate([
        ("What is the capital of France?", "Paris"), ("What is the capital of Italy?", "Rome"),
        ("What is the capital of Spain?", "Madrid"), ("How many legs does a spider have?", "Eight"),
        ("How many legs does an insect have?", "Six"), ("How many legs does a dog have?", "Four")])]
    exact = compute_kernel(smollm2.model, smollm2.tokenizer, records, progress=False)
    return records, exact


def stored(kernel):
    """{(row, col): value} of a CSR kernel's stored entries."""
    rows = np.repeat(np.arange(kernel.shape[0]), np.diff(kernel.indptr))
    return {(int(r), int(c)): float(v) for r, c, v in zip(rows, kernel.indices, kernel.data)}


def test_knn_engine_is_sparse_and_exact_on_its_pairs(toy, smollm2, tmp_path):
    records, exact = toy
    details = {}
    approx = compute_kernel(smollm2.model, smollm2.tokenizer, records, engine="knn", knn_k=1,
                            embedder=FixedEmbedder(records), progress=False, details=details)
    assert sp.issparse(approx) and approx.shape == (6, 6) and approx.dtype == np.float32
    entries = stored(approx)
    # Each row: itself (its self-utility, kept for selection to include or exclude) and its k = 1 nearest
    # *other* record, its group's nearest other member.
    assert set(entries) == {(0, 0), (0, 1), (1, 1), (1, 2), (2, 1), (2, 2), (3, 3), (3, 4), (4, 4), (4, 5),
                            (5, 4), (5, 5)}
    assert max(abs(v - exact[k]) for k, v in entries.items()) <= 1e-5
    assert details["engine"] == "knn" and details["approximation"] is True
    assert details["exact_pairs"] == 12 and details["zero_shot_passes"] == 6 and details["all_pairs"] == 36
    # Rows and columns may be different record sets (the task and continual stages' side kernels).
    side = compute_kernel(smollm2.model, smollm2.tokenizer, records[:2], records[3:], engine="knn", knn_k=1,
                          embedder=FixedEmbedder(records), progress=False)
    assert side.shape == (2, 3) and side.nnz == 2
    assert max(abs(v - exact[r, 3 + c]) for (r, c), v in stored(side).items()) <= 1e-5


def test_seeds_share_a_knn_kernel_unless_the_seed_can_change_it(tiny_qwen2, toy_records, tmp_path):
    def folders(**options):
        for seed in (0, 1):
            compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, toy_records, engine="knn", knn_k=2,
                           embedder=SeededEmbedder(), progress=False, cache_dir=cache, seed=seed, **options)
        return {folder.name for folder in (cache / "utility_kernel").iterdir()}

    cache = tmp_path / "exact_flat"
    assert len(folders()) == 1  # flat nearest neighbours: the second seed reads the first one's kernel
    cache = tmp_path / "random_columns"
    assert len(folders(knn_random=1)) == 2
    cache = tmp_path / "ivf"
    assert len(folders(ann={"flat_max": 2, "nlist": 2, "nprobe": 1})) == 2
    assert kernel_module.seed_matters("proxy", 0, 10, {"flat_max": 100})


def test_proxy_engine_predicts_candidates_and_keeps_measured_pairs_exact(tiny_qwen2, tmp_path, monkeypatch):
    records = [make_record(f"q{i}", "Answer.", f"What is {i} plus {i % 7}?", f"{i + i % 7}") for i in range(40)]
    options = dict(engine="proxy", knn_k=4, knn_random=1, embedder=SeededEmbedder(), cache_dir=tmp_path,
                   model_identity=tiny_qwen2.identity, progress=False, tile_size=8,
                   proxy={"sample": {"rows": 10, "random": 3}, "network": {"max_epochs": 5}})
    details = {}
    kernel = compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, records, details=details, **options)
    exact = compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, records, progress=False)
    entries = stored(kernel)
    graph = candidate_graph(SeededEmbedder().encode([record_text(r) for r in records]),
                            SeededEmbedder().encode([record_text(r) for r in records]), 4, random=1, self_pairs=True)
    graph_pairs = set(zip(graph.pair_rows().tolist(), graph.indices.tolist()))
    assert graph_pairs <= set(entries)
    (folder,) = (tmp_path / "utility_kernel").iterdir()
    measured = list(zip(np.load(folder / "scored_rows.npy").tolist(), np.load(folder / "scored_cols.npy").tolist()))
    # Per sampled row: itself, its 4 nearest others, 1 random column, and 3 more random ones.
    assert len(measured) == details["exact_pairs"] == 10 * (6 + 3) and details["zero_shot_passes"] == 10
    assert set(entries) == graph_pairs | set(measured)
    assert max(abs(entries[p] - exact[p]) for p in measured) <= 1e-6
    assert {"heldout_mse", "heldout_spearman", "n_train", "n_heldout"} <= set(details["proxy"])
    assert details["proxy"]["n_heldout"] == 2 * 9  # two of the ten sampled rows held out whole

    def never(*args, **kwargs):
        raise AssertionError("a cached sparse kernel should have been returned")

    monkeypatch.setattr(sparse_module, "score_pairs", never)
    again = {}
    cached = compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, records, details=again, **options)
    assert (cached != kernel).nnz == 0 and again == json.loads(json.dumps(details))


def test_plan_counts_pairs_passes_and_tiles():
    exact = plan_kernel(200, 200, engine="fast", tile_size=64)
    assert (exact.exact_pairs, exact.zero_shot_passes, exact.demonstration_blocks, exact.tiles) == \
        (40000, 200, 800, 4 + 16)
    assert plan_kernel(200, 200, engine="naive").demonstration_blocks == 0
    # One pool: each row's own pair, its 16 nearest others and 4 random columns.
    knn = plan_kernel(100_000, 100_000, engine="knn", knn_k=16, knn_random=4)
    assert knn.exact_pairs == 2_100_000 and knn.zero_shot_passes == 100_000
    proxy = plan_kernel(100_000, 100_000, engine="proxy", knn_k=16, proxy={"sample": {"rows": 0.01, "random": 8}})
    assert (proxy.exact_pairs, proxy.zero_shot_passes, proxy.predicted_pairs) == (25_000, 1000, 1_700_000)
    model = plan_kernel(50, 10, engine="knn", knn_k=4, features="model", same_records=False)
    assert model.feature_passes == 60 and model.exact_pairs == 200
    line = describe(knn, {"seconds_per_zero_shot": 0.1, "seconds_per_pair": 0.2, "calibration_pairs": 16})
    # 1e10 / 2.1e6 pairs; 0.1 s x 1e5 + 0.2 s x 2.1e6 = 430,000 s.
    assert "APPROXIMATION" in line and "(4,761.9x fewer pairs" in line and "estimated 5.0 days" in line


def test_calibration_times_the_engine(tiny_qwen2, toy_records):
    from delift.utility import UtilityTemplate

    calibration = calibrate(tiny_qwen2.model, tiny_qwen2.tokenizer, toy_records, toy_records,
                            template=UtilityTemplate(), max_length=256, engine="fast", batch_size=4, reuse=2)
    assert calibration["calibration_pairs"] == 4  # 2 rows x 2 columns: each column serves 2 rows
    assert calibration["seconds_per_pair"] > 0 and calibration["seconds_per_zero_shot"] > 0  # speed: benchmarks'


def test_config_lists_the_proxy_networks_defaults():
    from delift.utility.proxy import PROXY_DEFAULTS

    assert dict(compose_config([]).kernel.proxy.network) == PROXY_DEFAULTS


def test_proxy_options_are_checked(tiny_qwen2, toy_records):
    with pytest.raises(DeliftInputError, match="kernel.proxy.sample.rows"):
        compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, toy_records, engine="proxy",
                       proxy={"sample": {"rows": 0}}, progress=False)
    with pytest.raises(DeliftInputError, match="kernel.proxy"):
        compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, toy_records, engine="proxy",
                       proxy={"samples": {}}, progress=False)
    with pytest.raises(DeliftInputError, match="kernel.knn_k"):
        compute_kernel(tiny_qwen2.model, tiny_qwen2.tokenizer, toy_records, engine="knn", knn_k=0, progress=False)


TINY = ["model=tiny_qwen2", "trainer.max_steps=2", "eval.max_new_tokens=4", "logger=csv"]


@pytest.mark.parametrize("engine, options", [("knn", ["kernel.knn_k=4"]),
                                             ("proxy", ["kernel.proxy.network.max_epochs=3"])])
def test_pipeline_selects_with_an_approximate_engine_and_says_so(engine, options, tmp_path, monkeypatch):
    overrides = ["selector=delift", f"kernel.engine={engine}", *options, *TINY]
    cfg = compose_config(overrides, output_dir=tmp_path / "first")  # the test's own, fresh cache
    results = run(cfg)
    selection = json.loads((tmp_path / "first" / "selection.json").read_text())
    label = selection["info"]["kernel"]
    assert label["engine"] == engine and label["approximation"] is True
    assert label["knn_k"] == (4 if engine == "knn" else cfg.kernel.knn_k)  # the proxy: the configured default
    assert (label.get("proxy") is not None) == (engine == "proxy") and label["missing"] == "neutral"
    report = results["kernel"]["kernel"]
    assert report["engine"] == engine and report["exact_pairs"] < report["all_pairs"]
    assert ("proxy" in report) == (engine == "proxy")
    assert "kernel_report" not in selection["info"]  # run-dependent costs stay out of selection.json
    assert len(selection["indices"]) == round(0.3 * results["n_pool"])

    def never(*args, **kwargs):
        raise AssertionError("the second run should reuse the cached kernel")

    monkeypatch.setattr(sparse_module, "score_pairs", never)
    run(compose_config(["task=select", *overrides], output_dir=tmp_path / "second"))
    assert json.loads((tmp_path / "second" / "selection.json").read_text()) == selection


def test_dry_run_prints_the_plan_and_computes_nothing(tmp_path, monkeypatch, cache_dir):
    def never(*args, **kwargs):
        raise AssertionError("a dry run computes no kernel")

    monkeypatch.setattr(kernel_module, "compute_sparse_kernel", never)
    monkeypatch.setattr(kernel_module, "_exact_kernel", never)
    cfg = compose_config(["task=kernel", "kernel.dry_run=true", "kernel.engine=knn", "kernel.knn_k=4",
                          "stage=task", "model=tiny_qwen2"], output_dir=tmp_path)
    results = run(cfg)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan == json.loads(json.dumps(results)) and set(plan["plans"]) == {"kernel", "query_kernel"}
    pool = plan["plans"]["kernel"]
    assert pool["exact_pairs"] == (1 + 4) * pool["n_rows"] and pool["estimated_seconds"] > 0  # itself + 4 others
    assert plan["plans"]["query_kernel"]["n_cols"] == 12  # the task stage's MMLU targets for selection
    assert not (cache_dir / "utility_kernel").exists()
    assert all("estimated" in line for line in plan["plan_lines"])


def test_dry_run_through_the_command_prints_the_plan(tmp_path, monkeypatch):
    proc = run_cli(["task=kernel", "kernel.dry_run=true", "kernel.engine=proxy", "model=tiny_qwen2",
                    "progress=false"], tmp_path, monkeypatch)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kernel plan (proxy, APPROXIMATION): 28 rows x 28 columns = 784 pairs" in proc.stdout + proc.stderr
