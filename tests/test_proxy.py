"""The learned utility proxy (delift.utility.proxy) on synthetic utilities with a known formula."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from scipy import stats

from delift.errors import DeliftInputError
from delift.utility.proxy import (CACHE_KIND, META_FILE, PROXY_DEFAULTS, WEIGHTS_FILE, FittedProxy, ProxyNetwork,
                                  fit_proxy, resolve_config, split_pairs)

# One xdist worker takes the whole module (make test: --dist loadgroup): its module fixture is computed once.
pytestmark = pytest.mark.xdist_group("test_proxy")

DIM = 16
# Few epochs keep the file fast; the synthetic utility is smooth enough to learn in them.
FAST = {"batch_size": 128, "max_epochs": 25, "patience": 5}
TINY = {"batch_size": 64, "max_epochs": 3}


def unit_vectors(rng, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def utility(row_vectors, col_vectors, rows, cols) -> np.ndarray:
    return (0.5 * np.sum(row_vectors[rows] * col_vectors[cols], axis=1) + 0.1 * row_vectors[rows, 0]).astype(np.float32)


@pytest.fixture(scope="module")
def problem():
    """400 row and 150 column records; 8 measured pairs for each of rows 0..249 (with measurement noise),
    rows 250..399 never measured."""
    rng = np.random.default_rng(0)
    row_vectors, col_vectors = unit_vectors(rng, 400), unit_vectors(rng, 150)
    rows = np.repeat(np.arange(250), 8)
    cols = rng.integers(0, 150, len(rows))
    new_rows, new_cols = rng.integers(250, 400, 3000), rng.integers(0, 150, 3000)
    return {"row_vectors": row_vectors, "col_vectors": col_vectors, "rows": rows, "cols": cols,
            "values": utility(row_vectors, col_vectors, rows, cols) + rng.normal(0, 0.02, len(rows)).astype(np.float32),
            "new_rows": new_rows, "new_cols": new_cols,
            "new_values": utility(row_vectors, col_vectors, new_rows, new_cols)}


@pytest.fixture(scope="module")
def fitted(problem) -> FittedProxy:
    p = problem
    return fit_proxy(p["row_vectors"], p["col_vectors"], p["rows"], p["cols"], p["values"], config=FAST, seed=0,
                     groups=p["rows"], progress=False)


def small_fit(problem, **options) -> FittedProxy:
    p = problem
    return fit_proxy(p["row_vectors"], p["col_vectors"], p["rows"][:400], p["cols"][:400], p["values"][:400],
                     groups=p["rows"][:400], progress=False, **({"config": TINY} | options))


def test_learns_a_smooth_utility_and_predicts_unseen_rows(problem, fitted):
    metrics = fitted.metrics
    assert metrics["heldout_spearman"] > 0.9 and metrics["heldout_pearson"] > 0.9
    # MSE in UF units: well under the measured utility's variance (R^2 > 0.8).
    assert metrics["heldout_mse"] < 0.2 * float(np.var(problem["values"]))
    assert (metrics["n_train"], metrics["n_heldout"]) == (1600, 400)  # 50 of 250 rows held out, 8 pairs each
    assert 1 <= metrics["best_epoch"] <= metrics["epochs"] <= FAST["max_epochs"]
    assert fitted.config == PROXY_DEFAULTS | FAST
    predicted = fitted.predict(problem["row_vectors"], problem["col_vectors"], problem["new_rows"], problem["new_cols"])
    assert predicted.dtype == np.float32 and predicted.shape == (3000,)
    assert np.corrcoef(predicted, problem["new_values"])[0, 1] > 0.9
    assert stats.spearmanr(predicted, problem["new_values"]).statistic > 0.9
    # Un-standardised: on the utility's scale, not the z-scores'.
    assert abs(predicted.mean() - problem["new_values"].mean()) < 0.05
    assert 0.5 < predicted.std() / problem["new_values"].std() < 1.5


def test_same_seed_is_bit_identical_another_seed_differs(problem):
    p = problem
    first, again, other = small_fit(problem, seed=0), small_fit(problem, seed=0), small_fit(problem, seed=1)
    predict = [fit.predict(p["row_vectors"], p["col_vectors"], p["new_rows"], p["new_cols"])
               for fit in (first, again, other)]
    assert np.array_equal(predict[0], predict[1])
    assert first.metrics["heldout_mse"] == again.metrics["heldout_mse"]
    assert np.abs(predict[0] - predict[2]).max() > 1e-3


def test_grouped_split_holds_out_whole_groups(problem, fitted):
    rng = np.random.default_rng(3)
    groups = rng.permutation(np.repeat(np.arange(50), 7))
    train, heldout = split_pairs(len(groups), groups, 0.2, seed=0)
    assert set(groups[train]).isdisjoint(groups[heldout])
    assert len(set(groups[heldout])) == 10 and len(heldout) == 70
    assert np.array_equal(np.sort(np.concatenate([train, heldout])), np.arange(len(groups)))
    assert np.array_equal(split_pairs(len(groups), groups, 0.2, seed=0)[1], heldout)
    assert not np.array_equal(split_pairs(len(groups), groups, 0.2, seed=1)[1], heldout)
    # Without groups the share is of pairs.
    assert len(split_pairs(350, None, 0.2, seed=0)[1]) == 70
    # fit_proxy holds out by the rows it is given as groups.
    _, fit_heldout = split_pairs(len(problem["rows"]), problem["rows"], 0.2, seed=0)
    assert fitted.metrics["n_heldout"] == len(fit_heldout) == 400


def test_cache_loads_without_training_and_retrains_a_corrupt_file(problem, tmp_path, monkeypatch):
    p = problem
    fits = []
    real_fit = L.Trainer.fit

    def counting_fit(self, *args, **kwargs):
        fits.append(1)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", counting_fit)
    parts = {"kernel": "abc"}
    first = small_fit(problem, cache_dir=tmp_path, cache_parts=parts)
    [folder] = list((tmp_path / CACHE_KIND).iterdir())
    assert (folder / WEIGHTS_FILE).exists() and (folder / META_FILE).exists() and len(fits) == 1
    expected = first.predict(p["row_vectors"], p["col_vectors"], p["new_rows"], p["new_cols"])

    loaded = small_fit(problem, cache_dir=tmp_path, cache_parts=parts)
    assert len(fits) == 1  # loaded, not trained
    assert loaded.metrics == first.metrics  # train_seconds included: read from proxy.json
    assert loaded.target_mean == first.target_mean and loaded.target_std == first.target_std
    assert np.array_equal(loaded.predict(p["row_vectors"], p["col_vectors"], p["new_rows"], p["new_cols"]), expected)

    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # a half-written file
    retrained = small_fit(problem, cache_dir=tmp_path, cache_parts=parts)
    assert len(fits) == 2
    assert np.array_equal(retrained.predict(p["row_vectors"], p["col_vectors"], p["new_rows"], p["new_cols"]), expected)

    small_fit(problem, cache_dir=tmp_path, cache_parts={"kernel": "other"})  # the caller's key parts count
    assert len(fits) == 3 and len(list((tmp_path / CACHE_KIND).iterdir())) == 2


def test_too_small_a_sample_is_refused(problem):
    p = problem
    with pytest.raises(DeliftInputError, match="too few") as err:
        fit_proxy(p["row_vectors"], p["col_vectors"], p["rows"][:9], p["cols"][:9], p["values"][:9], progress=False)
    assert err.value.field == "kernel.proxy.sample"
    with pytest.raises(DeliftInputError, match="2 or more groups") as err:  # 16 pairs, all of one row
        fit_proxy(p["row_vectors"], p["col_vectors"], p["rows"][:8].repeat(2), p["cols"][:8].repeat(2),
                  p["values"][:8].repeat(2), groups=p["rows"][:8].repeat(2), progress=False)
    assert err.value.field == "kernel.proxy.sample"
    with pytest.raises(DeliftInputError) as err:
        resolve_config({"hiden": 64})
    assert err.value.field == "kernel.proxy.network"


def test_predict_is_chunk_invariant(problem, fitted):
    p = problem
    args = (p["row_vectors"], p["col_vectors"], p["new_rows"], p["new_cols"])
    default = fitted.predict(*args)
    assert np.array_equal(fitted.predict(*args, chunk=7), default)
    assert np.array_equal(fitted.predict(*args, chunk=1000), default)
    assert fitted.predict(p["row_vectors"], p["col_vectors"], p["new_rows"][:0], p["new_cols"][:0]).shape == (0,)


@pytest.mark.parametrize("features", ["product", "cosine", "concat"])
@pytest.mark.parametrize("layers", [1, 3])
def test_split_prediction_equals_the_network(problem, features, layers):
    """predict computes the first layer per record (split form); it must equal the network on the features."""
    p = problem
    torch.manual_seed(0)
    config = resolve_config({"features": features, "layers": layers, "hidden": 32})
    network = ProxyNetwork(DIM, config).eval()
    proxy = FittedProxy(network, config, target_mean=0.3, target_std=2.0, metrics={})
    predicted = proxy.predict(p["row_vectors"], p["col_vectors"], p["new_rows"], p["new_cols"], chunk=500)
    with torch.inference_mode():
        direct = network(torch.from_numpy(p["row_vectors"][p["new_rows"]]),
                         torch.from_numpy(p["col_vectors"][p["new_cols"]])).numpy() * 2.0 + 0.3
    np.testing.assert_allclose(predicted, direct, rtol=0, atol=1e-5)
    assert np.std(direct) > 1e-3  # the comparison is not between two constants
