"""The selection report: what a subset took from its pool, checked against hand counts; and that every
job that selects writes it to results.json, the log and the W&B run."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp

from delift.data import build_stage
from delift.objectives import self_coverage_share
from delift.pipeline import results_table, run
from delift.records import make_record
from delift.selection_report import diagonal_top_overlap, log_lines, selection_report
from tests.helpers import compose_config, isolated_cache
from tests.test_wandb_run import OfflineRun, offline_wandb  # noqa: F401 - the fixture, by name


class SpaceTokenizer:
    """One token per space-separated word: lengths a test can count by hand."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [text.split() for text in texts]}


def pool_of(sources: dict[str, int], outputs=None) -> list[dict]:
    names = [name for name, count in sources.items() for _ in range(count)]
    outputs = outputs or ["answer"] * len(names)
    return [make_record(f"r{i}", "Q?", "", output, source=name) for i, (name, output) in enumerate(zip(names, outputs))]


def test_source_counts_shares_and_ratios_match_a_hand_count():
    pool = pool_of({"trivia": 6, "mmlu": 3, "gsm8k": 1})  # indices 0-5 trivia, 6-8 mmlu, 9 gsm8k
    report = selection_report(pool, [0, 1, 6, 9])
    assert list(report["sources"]) == ["trivia", "mmlu", "gsm8k"]  # largest pool share first
    assert report["sources"] == {
        "trivia": {"pool": 6, "pool_share": 0.6, "subset": 2, "subset_share": 0.5, "ratio": 0.5 / 0.6},
        "mmlu": {"pool": 3, "pool_share": 0.3, "subset": 1, "subset_share": 0.25, "ratio": 0.25 / 0.3},
        "gsm8k": {"pool": 1, "pool_share": 0.1, "subset": 1, "subset_share": 0.25, "ratio": 2.5},
    }
    assert (report["n_pool"], report["n_selected"]) == (10, 4)
    assert "response_tokens" not in report and "answer_letters" not in report and "self_coverage_share" not in report
    assert log_lines(report) == [(logging.INFO, "source trivia: 2 of 4 selected (50.0 %) vs 60.0 % of the pool"),
                                 (logging.INFO, "source mmlu: 1 of 4 selected (25.0 %) vs 30.0 % of the pool"),
                                 (logging.INFO, "source gsm8k: 1 of 4 selected (25.0 %) vs 10.0 % of the pool")]


def test_an_empty_subset_reports_zero_counts_and_no_warning():
    report = selection_report(pool_of({"trivia": 2, "mmlu": 1}), [], SpaceTokenizer())
    rows = report["sources"].values()
    assert [(row["subset"], row["subset_share"], row["ratio"]) for row in rows] == [(0, None, None)] * 2
    assert report["response_tokens"]["subset"] is None and report["warnings"] == []
    json.dumps(report)  # JSON-able as it is
    assert log_lines(report)[0] == (logging.INFO, "source trivia: 0 of 0 selected (-) vs 66.7 % of the pool")


def test_response_token_quantiles_are_numpys():
    lengths = [1, 2, 3, 5, 8, 13, 21, 34]
    pool = pool_of({"a": 8}, outputs=[" ".join(["w"] * n) for n in lengths])
    selected = [7, 0, 3]
    report = selection_report(pool, selected, SpaceTokenizer())["response_tokens"]
    for part, values in (("pool", lengths), ("subset", [34, 1, 5])):
        expected = dict(zip(["min", "p10", "p25", "p50", "p75", "p90", "max"],
                            np.percentile(values, [0, 10, 25, 50, 75, 90, 100])))
        assert report[part] == pytest.approx(expected | {"mean": np.mean(values)})
    assert report["pool"]["p10"] == pytest.approx(1.7) and report["subset"]["p50"] == 5  # by hand: 1 + 0.7 * (2 - 1)


def test_answer_letters_count_the_multiple_choice_records_only():
    answers = [("A", "choice"), ("B", "choice"), ("B", "choice"), ("C", "choice"), ("42", "number"), (None, None)]
    pool = [make_record(f"r{i}", "Q?", "", "x", source="mmlu" if kind == "choice" else "other",
                        meta={"answer": answer, "answer_type": kind} if kind else {})
            for i, (answer, kind) in enumerate(answers)]
    report = selection_report(pool, [1, 3, 4])
    assert report["answer_letters"] == {"pool": {"A": 1, "B": 2, "C": 1}, "subset": {"A": 0, "B": 1, "C": 1}}
    assert "answer_letters" not in selection_report(pool[4:], [0])


def test_a_warning_names_exactly_the_under_represented_source():
    pool = pool_of({"trivia": 50, "mmlu": 30, "gsm8k": 20})  # 0-49 trivia, 50-79 mmlu, 80-99 gsm8k
    # Subset shares 0.9, 0.0, 0.1 against 0.5, 0.3, 0.2: only mmlu is under a third of its pool share.
    report = selection_report(pool, [*range(9), 80])
    assert report["warnings"] == ["source mmlu: 0.0 % of the subset against 30.0 % of the pool"]
    # In the log, the warning is that source's one line.
    assert [level for level, _ in log_lines(report)] == [logging.INFO, logging.WARNING, logging.INFO]
    assert log_lines(report)[1][1] == report["warnings"][0]
    # 0.9, 0.05, 0.05 against 0.5, 0.3, 0.2: mmlu (1/6 of its share) warns, gsm8k (1/4) too.
    report = selection_report(pool, [*range(18), 50, 80])
    assert report["warnings"] == ["source mmlu: 5.0 % of the subset against 30.0 % of the pool",
                                  "source gsm8k: 5.0 % of the subset against 20.0 % of the pool"]
    # 0.6, 0.2, 0.2: mmlu at 2/3 of its share, no warning.
    assert selection_report(pool, [*range(6), 50, 51, 80, 81])["warnings"] == []
    report = selection_report(pool_of({"trivia": 29, "mmlu": 11}), [*range(29), 29])  # mmlu 1 of 30 against 11 of 40
    assert report["warnings"] == ["source mmlu: 3.3 % of the subset against 27.5 % of the pool"]


def test_diagonal_top_overlap_on_dense_and_sparse_kernels():
    kernel = np.array([[4.0, 1, 0, 0], [2, 3, 1, 0], [0, 2, 5, 0], [1, 1, 1, -1]])  # diagonal 4, 3, 5, -1
    assert diagonal_top_overlap(kernel, [0, 2]) == 1.0  # the two largest: 5 (2) and 4 (0)
    assert diagonal_top_overlap(kernel, [1, 2]) == 0.5
    assert diagonal_top_overlap(kernel, [3, 1, 0]) == pytest.approx(2 / 3)  # top three: 2, 0, 1
    assert diagonal_top_overlap(kernel, []) is None
    # Sparse: record 2's own pair was not measured (-inf, below record 3's -1): top two are 0 and 1.
    stored = sp.csr_matrix(np.where(np.eye(4, dtype=bool) & (np.arange(4) == 2), 0, kernel))
    stored.eliminate_zeros()
    assert diagonal_top_overlap(stored, [0, 1]) == 1.0
    assert diagonal_top_overlap(stored, [2, 3]) == 0.0
    assert diagonal_top_overlap(stored, [0, 1, 3]) == 1.0


def test_self_coverage_share_on_a_hand_computed_facility_location():
    # FL, one global min-max (lo 0, hi 5): s = K / 5. Picks {2}: f = (0 + 1 + 5) / 5, without the
    # diagonal (0 + 1 + 0) / 5, so 5/6 of f is record 2 covering itself. Picks {0, 2}: f = (4 + 2 + 5) / 5,
    # without the diagonal (0 + 2 + 0) / 5: a share of 9/11.
    kernel = np.array([[4.0, 1, 0], [2, 3, 1], [0, 2, 5]])
    pool = pool_of({"a": 3})
    report = selection_report(pool, [2], kernels={"kernel": kernel}, objective="fl", normalize="global")
    assert report["self_coverage_share"] == pytest.approx(5 / 6)
    assert report["diagonal_top_overlap"] == 1.0
    report = selection_report(pool, [0, 2], kernels={"kernel": kernel}, objective="fl", normalize="global")
    assert report["self_coverage_share"] == pytest.approx(9 / 11)
    assert log_lines(report)[-1] == (logging.INFO, "self-coverage share 0.818, diagonal top overlap 1.000")
    # No objective, no pool kernel (FL2MI): no DELIFT figures.
    assert "self_coverage_share" not in selection_report(pool, [0], kernels={"kernel": kernel})
    assert "self_coverage_share" not in selection_report(pool, [0], kernels={"query_kernel": kernel}, objective="fl2mi")


def stage_of(cfg):
    return build_stage(cfg.stage, cfg.seed)


def test_a_select_only_random_job_writes_the_report_without_loading_the_model(tmp_path, monkeypatch, caplog,
                                                                              smollm2_spec):
    from delift.generation import response_token_lengths
    from delift.models import TinyRandomModel

    def refuse(*args, **kwargs):
        raise AssertionError("a select-only random job loaded the model")

    monkeypatch.setattr(TinyRandomModel, "load", refuse)
    cfg = compose_config(["task=select", "selector=random", "model=tiny_qwen2", "logger=none"],
                         output_dir=tmp_path / "run", cache_dir=isolated_cache(tmp_path))
    with caplog.at_level(logging.INFO, logger="delift.pipeline"):
        results = run(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    report = saved["selection_report"]
    assert saved == json.loads(json.dumps(results))

    pool = stage_of(cfg).pool
    subset = [json.loads(line) for line in (tmp_path / "run" / "subset.jsonl").read_text().splitlines()]
    pool_counts, subset_counts = Counter(r["source"] for r in pool), Counter(r["source"] for r in subset)
    assert {name: row["pool"] for name, row in report["sources"].items()} == pool_counts
    assert {name: row["subset"] for name, row in report["sources"].items()} == {
        name: subset_counts[name] for name in pool_counts}
    assert report["n_pool"] == len(pool) == 28 and report["n_selected"] == len(subset) == 8
    lengths = response_token_lengths(smollm2_spec.load_tokenizer(), pool)
    assert report["response_tokens"]["pool"]["p50"] == float(np.median(lengths))
    assert report["answer_letters"]["pool"] == Counter(r["meta"]["answer"] for r in pool if r["source"] == "mmlu")

    # The log: one line per source, a warning for each under-represented one; the summary: one row per source.
    logged = [(r.levelno, r.getMessage()) for r in caplog.records if r.getMessage().startswith("source ")]
    assert len(logged) == len(pool_counts)
    assert [message for level, message in logged if level == logging.WARNING] == report["warnings"]
    trivia = report["sources"]["trivia"]
    assert (logging.INFO, f"source trivia: {trivia['subset']} of 8 selected ({100 * trivia['subset_share']:.1f} %) "
                          f"vs {100 * trivia['pool_share']:.1f} % of the pool") in logged
    table = results_table(saved).splitlines()
    assert len(table) == 2 + len(pool_counts)
    assert table[2].split()[:4] == ["trivia", f"{trivia['subset']}/{trivia['pool']}", "selected", "subset"]


def test_an_initial_job_reports_an_empty_subset(tmp_path):
    cfg = compose_config(["task=select", "selector=initial", "model=tiny_qwen2", "logger=none"],
                         output_dir=tmp_path / "run", cache_dir=isolated_cache(tmp_path))
    report = run(cfg)["selection_report"]
    assert report["n_selected"] == 0 and all(row["subset"] == 0 for row in report["sources"].values())
    assert sum(row["pool"] for row in report["sources"].values()) == report["n_pool"] == 28


def test_a_kernel_selector_job_reports_its_self_coverage_on_the_kernel_it_read(tmp_path, monkeypatch):
    import delift.pipeline

    calls = []

    def spy(pool, selected, tokenizer=None, **objective):
        calls.append(objective | {"kernel": objective["kernels"]["kernel"].copy()})  # the pipeline clears them
        return selection_report(pool, selected, tokenizer, **objective)

    monkeypatch.setattr(delift.pipeline, "selection_report", spy)
    cfg = compose_config(["task=select", "selector=delift_se", "selector.normalize=separate", "model=tiny_qwen2",
                          "logger=none"], output_dir=tmp_path / "run", cache_dir=isolated_cache(tmp_path))
    report = run(cfg)["selection_report"]
    selected = json.loads((tmp_path / "run" / "selection.json").read_text())["indices"]

    (call,) = calls
    pool = stage_of(cfg).pool
    assert call["kernel"].shape == (len(pool), len(pool)) and call["objective"] == "fl"
    assert call["normalize"] == "separate" and call["floor"] == "min" and call["groups"] == [r["source"] for r in pool]
    assert report["diagonal_top_overlap"] == diagonal_top_overlap(call["kernel"], selected)
    assert report["self_coverage_share"] == pytest.approx(
        self_coverage_share(call["kernel"], selected, "fl", normalize="separate"))
    assert 0 < report["self_coverage_share"] < 1


def test_the_wandb_run_receives_the_tables_and_metrics(tmp_path, offline_wandb):  # noqa: F811
    output_dir = tmp_path / "job"
    cfg = compose_config(["task=select", "selector=random", "model=tiny_qwen2", "logger=wandb"],
                         output_dir=output_dir, cache_dir=isolated_cache(tmp_path))
    report = run(cfg)["selection_report"]
    wandb_run = OfflineRun.of(output_dir)

    # A table lands in the history as a reference to its file in the run's media folder.
    assert wandb_run.logged("selection/sources._type") == wandb_run.logged("selection/response_tokens._type") == [
        "table-file"]
    (path,) = wandb_run.logged("selection/sources.path")
    table = json.loads((wandb_run.folder / "files" / path).read_text())
    assert table["columns"] == ["source", "pool", "pool_share", "subset", "subset_share", "ratio"]
    assert table["data"] == [[name, *row.values()] for name, row in report["sources"].items()]
    (path,) = wandb_run.logged("selection/response_tokens.path")
    table = json.loads((wandb_run.folder / "files" / path).read_text())
    assert table["data"] == [[part, *values.values()] for part, values in report["response_tokens"].items()]
    assert wandb_run.logged("selection/source/trivia/ratio") == [report["sources"]["trivia"]["ratio"]]
    assert wandb_run.logged("selection/response_tokens/pool_p50") == [report["response_tokens"]["pool"]["p50"]]
