"""LESS: the seeded blockwise projection, Adam preconditioning, lr weights, subtask scoring, and the full flow.

The preconditioning and the subtask grouping are pinned to princeton-nlp/LESS: less/data_selection/
collect_grad_reps.py (obtain_gradients_with_adam) and matching.py (mean per subtask, max over subtasks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from safetensors.torch import save_file

from delift.data import load_gpqa_offline, load_mmlu_offline, load_trivia_offline, mmlu_record
from delift.data.hub import mtbench_category, mtbench_record
from delift.errors import DeliftInputError
from delift.selectors import SELECTORS, SelectionContext
from delift.selectors.less import (
    PROJECTION_TILE_ROWS,
    LESSSelector,
    adam_preconditioned,
    less_scores,
    load_moments,
    lr_weights,
    project,
    rademacher_matrix,
    target_subtasks,
)
import fixtures_hub as hub  # tests/ is on sys.path (rootdir conftest, no __init__)
from tests.helpers import CONF_DIR, compose_config


def test_projection_is_seeded_and_blockwise_equals_full():
    dim, in_dim = 64, 2 * PROJECTION_TILE_ROWS + 123  # three tiles, the last one partial
    vectors = torch.randn(3, in_dim, generator=torch.Generator().manual_seed(0))
    matrix = rademacher_matrix(7, in_dim, dim)
    assert matrix.shape == (in_dim, dim)
    assert set(torch.unique(matrix).tolist()) == {-1 / 8, 1 / 8}  # +-1/sqrt(64)
    torch.testing.assert_close(project(vectors, dim, seed=7), vectors @ matrix, rtol=1e-4, atol=1e-4)
    assert torch.equal(rademacher_matrix(7, in_dim, dim), matrix)
    assert not torch.equal(rademacher_matrix(8, in_dim, dim), matrix)
    # a prefix of the coordinates sees the same rows: the matrix does not depend on D's other rows
    assert torch.equal(rademacher_matrix(7, 100, dim), matrix[:100])
    assert abs(float((matrix > 0).float().mean()) - 0.5) < 0.02  # fair signs from the unpacked random bytes
    assert rademacher_matrix(7, 10, 13).shape == (10, 13)  # d need not be a multiple of 8


def test_rows_projected_in_several_passes_equal_one_pass():
    gradients = torch.randn(5, 300, generator=torch.Generator().manual_seed(1))
    rows = [(("pool", 1), k, g) for k, g in enumerate(gradients)]

    def projected(memory_gb):
        out = {("pool", 1): np.zeros((5, 32), dtype=np.float32)}
        LESSSelector(projection_dim=32, projection_memory_gb=memory_gb).project_rows(iter(rows), out, 300, seed=3)
        return out[("pool", 1)]

    one_pass, per_row = projected(1.0), projected(2 * 4 * 300 / 2 ** 30)  # room for two rows per pass
    np.testing.assert_allclose(per_row, one_pass, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(one_pass, axis=1), 1.0, rtol=1e-5)


def test_lr_weights_are_renormalised_epoch_lrs():
    weights = lr_weights([2e-4, 1e-4, 1e-4])
    np.testing.assert_allclose(weights, [0.5, 0.25, 0.25])
    assert weights.sum() == pytest.approx(1.0)
    with pytest.raises(DeliftInputError, match="lr"):
        lr_weights([0.0, 0.0])


def test_adam_preconditioning_is_less_formula_eps_under_the_root():
    # LESS's constants (b1 0.9, b2 0.999, eps 1e-8) and formula m' / sqrt(v' + eps), no bias correction.
    grads = torch.tensor([[0.1, -0.2, 0.0]], dtype=torch.float64)
    exp_avg = torch.tensor([0.05, 0.0, 0.01], dtype=torch.float64)
    exp_avg_sq = torch.tensor([0.01, 0.0, 0.0], dtype=torch.float64)
    out = adam_preconditioned(grads, exp_avg, exp_avg_sq, betas=(0.9, 0.999), eps=1e-8)
    # m' = 0.9 m + 0.1 g = (0.055, -0.02, 0.009); v' = 0.999 v + 0.001 g^2 = (0.01, 0.00004, 0)
    # features: 0.055 / sqrt(0.01000001), -0.02 / sqrt(0.00004001), 0.009 / sqrt(1e-8) = 0.009 / 1e-4
    expected = torch.tensor([[0.5499997250002062, -3.161882449561304, 90.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=0.0)
    # eps outside the root would give 0.009 / 1e-8 = 900000 for the coordinate no gradient reached yet
    assert float(out[0, 2]) != pytest.approx(0.009 / 1e-8)


def test_moments_are_read_by_parameter_name(tmp_path):
    save_file({"exp_avg/b": torch.tensor([3.0]), "exp_avg_sq/b": torch.tensor([4.0]),
               "exp_avg/a": torch.tensor([1.0, 2.0]), "exp_avg_sq/a": torch.tensor([5.0, 6.0])},
              str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "state.json").write_text(json.dumps({"betas": [0.9, 0.999], "eps": 1e-8}))
    exp_avg, exp_avg_sq, betas, eps = load_moments(tmp_path, ["a", "b"], "cpu")
    assert exp_avg.tolist() == [1.0, 2.0, 3.0] and exp_avg_sq.tolist() == [5.0, 6.0, 4.0]
    assert betas == (0.9, 0.999) and eps == 1e-8
    with pytest.raises(DeliftInputError, match="exp_avg/c"):
        load_moments(tmp_path, ["a", "c"], "cpu")


def test_scores_weight_checkpoints_and_take_the_best_subtask():
    e1, e2 = np.eye(2)
    pool = [np.stack([e1, e2]), np.stack([e2, e2])]  # checkpoint 1, checkpoint 2: rows = pool examples
    target = [np.stack([e1, e2, e2]), np.stack([e1, e2, e1])]  # targets: A, A, B
    scores = less_scores(pool, target, weights=[0.75, 0.25], subtasks=["A", "A", "B"])
    # pool 0: A = .75 * mean(1, 0) + .25 * mean(0, 1) = .5; B = .75 * 0 + .25 * 0 = 0 -> .5
    # pool 1: A = .75 * .5 + .25 * .5 = .5; B = .75 * 1 + .25 * 0 = .75 -> .75
    np.testing.assert_allclose(scores, [0.5, 0.75])
    assert target_subtasks([{"meta": {"subtask": "algebra"}, "source": "mmlu"}, {"meta": {}, "source": "mmlu"}]) \
        == ["mmlu/algebra", "mmlu"]


def test_mmlu_targets_score_as_the_mean_per_subject_then_the_best_subject():
    rows = [{"question": f"Question {k}?", "subject": subject, "choices": ["yes", "no"], "answer": 0}
            for k, subject in enumerate(["anatomy", "anatomy", "astronomy", "astronomy"])]
    groups = target_subtasks([mmlu_record(row, k) for k, row in enumerate(rows)])
    assert groups == ["mmlu/anatomy", "mmlu/anatomy", "mmlu/astronomy", "mmlu/astronomy"]
    e1, _, e3 = np.eye(3)
    targets = np.stack([e1, [0.8, 0.6, 0.0], [-0.6, 0.8, 0.0], e3])  # anatomy, anatomy, astronomy, astronomy
    pool = np.stack([e1, [0.6, 0.8, 0.0]])
    # cosines: pool 0 (1, .8 | -.6, 0); pool 1 (.6, .96 | .28, 0)
    # per subject: pool 0 max(.9, -.3) = .9; pool 1 max(.78, .14) = .78 -> pool 0 first
    scores = less_scores([pool], [targets], weights=[1.0], subtasks=groups)
    np.testing.assert_allclose(scores, [0.9, 0.78])
    # LESS's layout (targets subject by subject, equal counts): reshape to (pool, subject, example)
    np.testing.assert_allclose(scores, (pool @ targets.T).reshape(2, 2, 2).mean(axis=2).max(axis=1))
    # one group of all targets ranks the other way: pool 0 1.2 / 4 = .3; pool 1 1.84 / 4 = .46
    np.testing.assert_allclose(less_scores([pool], [targets], [1.0], ["mmlu"] * 4), [0.3, 0.46])


def test_loaders_set_the_subtask_less_groups_by():
    assert mmlu_record(hub.MMLU_ALL[0], 0)["meta"]["subtask"] == "anatomy"
    assert "subtask" not in mmlu_record(hub.MMLU_AUXILIARY_TRAIN[0]["train"], 0)["meta"]  # no subject
    offline = load_mmlu_offline(limit=3)
    assert [r["meta"]["subtask"] for r in offline] == [r["meta"]["subject"] for r in offline]
    assert target_subtasks(offline)[0] == "mmlu/moral scenarios"
    assert all(r["meta"]["subtask"] == r["meta"]["subject"] != "" for r in load_gpqa_offline(limit=5))
    assert {r["meta"]["subtask"] for r in load_trivia_offline(lists=["boombeach"])} == {"boombeach"}
    assert mtbench_record(hub.MTBENCH[0], 0)["meta"]["subtask"] == "writing"
    categories = [mtbench_category(qid) for qid in (81, 90, 111, 160, 161)]
    assert categories == ["writing", "writing", "math", "humanities", ""]  # FastChat's question.jsonl


TRAIN = {"lora": {"r": 2, "alpha": 4, "dropout": 0.0}, "optim": {"lr": 1e-3, "batch_size": 2, "max_length": 64}}
TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}


def test_identical_example_ranks_first_features_cached_model_restored(tiny_qwen2, toy_records, tmp_path,
                                                                      monkeypatch):
    assert SELECTORS["less"] is LESSSelector
    target = [dict(toy_records[3], id="target/0")]
    ctx = SelectionContext(stage="instruction", pool=toy_records, target=target, seed=0, loader=lambda: tiny_qwen2,
                           cache_dir=str(tmp_path / "cache"), output_dir=tmp_path / "run", train_options=TRAIN,
                           trainer_options=TRAINER, progress=False)
    probe = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = tiny_qwen2.model(probe).logits
    selector = LESSSelector(fraction=0.5, warmup_fraction=0.5, warmup_epochs=2, projection_dim=256)
    selection = selector.select(ctx)

    assert selection.indices[0] == 3 and len(selection.indices) == 3
    assert selection.info["lr_weights"] == [0.5, 0.5]  # constant lr: both epochs weigh the same
    assert len(selection.info["warmup_indices"]) == 3
    cached = sorted(p.name for p in (tmp_path / "cache" / "less").glob("*/*.npy"))
    assert len(cached) == 4 and sum(name.startswith("pool_") for name in cached) == 2
    features = np.load(next((tmp_path / "cache" / "less").glob("*/pool_epoch1.npy")))
    assert features.shape == (6, 256)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    # the preconditioner reads the warm-up's Adam constants: LESS's hard-coded ones
    state = json.loads((tmp_path / "run" / "less_warmup" / "epoch_checkpoints" / "epoch_1" / "state.json").read_text())
    assert (state["betas"], state["eps"]) == ([0.9, 0.999], 1e-8)

    # the shared model is the base model again
    assert not any("lora" in name for name, _ in tiny_qwen2.model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(tiny_qwen2.model(probe).logits, before)

    # served from the cache: no warm-up, same selection
    monkeypatch.setattr("delift.training.finetune", lambda *a, **k: pytest.fail("the cache was not used"))
    assert selector.select(ctx).indices == selection.indices


def test_needs_targets_and_training_options(tiny_qwen2, toy_records):
    ctx = SelectionContext(stage="instruction", pool=toy_records, loader=lambda: tiny_qwen2, train_options=TRAIN)
    with pytest.raises(DeliftInputError, match="stage.target"):
        LESSSelector().select(ctx)
    ctx = SelectionContext(stage="instruction", pool=toy_records, target=toy_records[:1], loader=lambda: tiny_qwen2)
    with pytest.raises(DeliftInputError, match="train_options.lora.r"):
        LESSSelector().select(ctx)


def test_warmup_subset_is_a_seeded_five_percent():
    selector = LESSSelector(warmup_fraction=0.05)
    warmup = selector.warmup_indices(100, seed=3)
    assert len(warmup) == 5 and warmup == selector.warmup_indices(100, seed=3)
    assert warmup != selector.warmup_indices(100, seed=4)


def test_config_file_instantiates_the_selector():
    selector = instantiate(OmegaConf.load(Path(CONF_DIR) / "selector" / "less.yaml"))
    assert isinstance(selector, LESSSelector)
    assert selector.fraction == 0.3 and selector.warmup_fraction == 0.05 and selector.projection_dim == 8192


def test_less_paper_config_has_less_own_warmup(tmp_path):
    selector = instantiate(compose_config(["selector=less_paper"], output_dir=tmp_path).selector)
    assert (selector.warmup_fraction, selector.warmup_epochs, selector.projection_dim) == (0.05, 4, 8192)
    lora, optim = selector.warmup_options(SelectionContext(stage="task", pool=[], train_options=TRAIN))
    assert lora == {"r": 128, "alpha": 512, "dropout": 0.1,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"]}
    assert optim == {"lr": 2e-5, "batch_size": 1, "grad_accum": 32, "max_length": 2048, "weight_decay": 0.0,
                     "schedule": "linear", "warmup_ratio": 0.03, "epochs": 4}
