"""The pipeline end to end on the tiny random model, in-process and through run.py."""

import json

import pytest

from delift.pipeline import run
from tests.helpers import compose_config, run_py

STAGES = ["instruction", "task", "continual"]
FAST = ["trainer.max_steps=2", "eval.max_new_tokens=4", "logger=csv"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("selector", ["random", "full", "initial"])
def test_every_stage_and_selector_end_to_end(stage, selector, tmp_path):
    cfg = compose_config([f"stage={stage}", f"selector={selector}", "model=tiny_qwen2", *FAST], output_dir=tmp_path)
    results = run(cfg)
    files = {p.name for p in tmp_path.iterdir()}
    assert {"selection.json", "subset.jsonl", "predictions.jsonl", "results.json", "config_resolved.yaml"} <= files
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["stage"] == stage and saved["selector"] == selector and saved["model"] == "tiny-qwen2"
    assert set(saved["metrics"]) >= {"rouge1", "embed_sim"}
    selection = json.loads((tmp_path / "selection.json").read_text())
    subset = [json.loads(line) for line in (tmp_path / "subset.jsonl").read_text().splitlines()]
    assert [r["id"] for r in subset] == selection["ids"]
    # The exports for other trainers hold the same subset, in the same order.
    from datasets import load_from_disk

    assert load_from_disk(str(tmp_path / "subset_hf"))["id"] == selection["ids"]
    chat = [json.loads(line) for line in (tmp_path / "subset_chat.jsonl").read_text().splitlines()]
    assert [(r["id"], r["pool_index"]) for r in chat] == list(zip(selection["ids"], selection["indices"]))
    expected = {"random": round(0.3 * saved["n_pool"]), "full": saved["n_pool"], "initial": 0}[selector]
    assert saved["n_selected"] == len(selection["indices"]) == expected
    assert ("adapter" in files) == (selector != "initial")
    predictions = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 24


# Smaller pools keep the model-based selectors (kernels, gradients, ratings) to seconds each.
SMALL_STAGES = {"instruction": [], "task": ["stage.sizes.pool.trivia=20", "stage.sizes.pool.gsm8k=4"],
                "continual": ["stage.sizes.pool.mmlu=56", "stage.sizes.existing.trivia=10"]}
SELECTOR_OPTIONS = {"delift": [], "delift_se": [], "selectit": [], "deft_ucs": [],
                    "less": ["selector.projection_dim=256", "selector.warmup_epochs=1"]}


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("selector", sorted(SELECTOR_OPTIONS))
def test_every_stage_with_every_paper_selector(stage, selector, tmp_path):
    cfg = compose_config([f"stage={stage}", f"selector={selector}", "model=tiny_qwen2", *FAST,
                          *SMALL_STAGES[stage], *SELECTOR_OPTIONS[selector]], output_dir=tmp_path)
    results = run(cfg)
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert results["selector"] == selector
    assert results["n_selected"] == len(set(selection["indices"])) == round(0.3 * results["n_pool"])
    assert all(0 <= i < results["n_pool"] for i in selection["indices"])
    if selector in ("delift", "delift_se"):
        expected = {"instruction": "fl", "task": "flmi", "continual": "flcg"}[stage]
        assert selection["info"]["objective"] == expected
        assert len(selection["scores"]) == len(selection["indices"])  # the greedy gains


def test_same_config_same_selection_and_seed_changes_it(tmp_path):
    def selection(seed, folder):
        cfg = compose_config(["task=select", "selector=random", f"seed={seed}"], output_dir=folder)
        run(cfg)
        return json.loads((folder / "selection.json").read_text())

    a, b, c = selection(0, tmp_path / "a"), selection(0, tmp_path / "b"), selection(1, tmp_path / "c")
    assert a == b
    assert a["ids"] != c["ids"]


def test_multirun_writes_one_wandb_run_per_job(tmp_path):
    proc = run_py(["-m", "model=tiny_qwen2", "selector=random,initial", "seed=0,1", "trainer.max_steps=1",
                    "eval.max_new_tokens=2", "progress=false"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in (tmp_path / "outputs" / "multiruns").glob("*/*/*") if (p / "results.json").exists())
    assert len(jobs) == 4
    runs = [run_dir for job in jobs for run_dir in (job / "wandb").glob("offline-run-*")]
    assert len(runs) == 4 and len({r.name for r in runs}) == 4
    assert {json.loads((j / "results.json").read_text())["selector"] for j in jobs} == {"random", "initial"}
