"""experiments/make_tables.py: paper-order rows, method variants, mean ± std cells, captions, LaTeX, paired and
per-source statistics, budget curve, CLI."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "make_tables.py"
_spec = importlib.util.spec_from_file_location("make_tables", SCRIPT)
make_tables = importlib.util.module_from_spec(_spec)
sys.modules["make_tables"] = make_tables  # dataclasses look their module up there
_spec.loader.exec_module(make_tables)

JUDGE = {"name": "SmolLM2-135M-Instruct", "stand_in": True}


def _write_run(folder: Path, selector: str, seed: int, fraction: float, *, icl=None, finetune=None, **extra):
    by_mode = {mode: metrics for mode, metrics in (("icl", icl), ("finetune", finetune)) if metrics is not None}
    results = {"stage": "instruction", "selector": selector, "model": "SmolLM2-135M-Instruct", "n_pool": 28,
               "n_selected": round(fraction * 28), "seed": seed, "fraction": fraction,
               "experiment": "embedded_instruction", "metrics": next(iter(by_mode.values())),
               "metrics_by_mode": by_mode, "embedder": {"name": "all-MiniLM-L6-v2", "packaged": True},
               "timings": {"total": 1.0}} | extra
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))


def _metrics(rouge1, embed_sim, laj=None, **extra):
    metrics = {"rouge1": rouge1, "embed_sim": embed_sim} | extra
    if laj is not None:
        metrics |= {"laj": laj, "laj_weighted": laj, "laj_parse_failures": 1, "laj_n": 10}
    return metrics


def _write_grid(root: Path, with_curve: bool = True):
    """A multirun-like tree with known numbers; selectors written out of paper order on purpose."""
    job = iter(range(1000))

    def folder():
        return root / "multirun" / "2025-01-01" / str(next(job))

    for seed, (r, e, l) in enumerate([(0.40, 0.80, 3.0), (0.42, 0.81, 3.5), (0.44, 0.82, 4.0)]):
        _write_run(folder(), "random", seed, 0.3, icl=_metrics(r, e, l), finetune=_metrics(r + 0.1, e, l),
                   judge=JUDGE)
        _write_run(folder(), "delift", seed, 0.3, icl=_metrics(r + 0.1, e + 0.1, accuracy=0.5 + 0.1 * seed),
                   finetune=_metrics(r + 0.2, e + 0.1))
        _write_run(folder(), "full", seed, 1.0, icl=_metrics(0.6, 0.9), finetune=_metrics(0.7, 0.95))
        # Initial keeps the configured fraction in its results: it must still land in the 30 % table.
        _write_run(folder(), "initial", seed, 0.3, icl=_metrics(0.2, 0.7), finetune=_metrics(0.3, 0.75))
    for seed in (0, 1):
        _write_run(folder(), "less", seed, 0.3, finetune=_metrics(0.5 + 0.02 * seed, 0.85))  # no ICL mode
        _write_run(folder(), "my_sel", seed, 0.3, icl=_metrics(0.3, 0.7), finetune=_metrics(0.3, 0.7))
    _write_run(folder(), "deft_ucs", 0, 0.3, icl=_metrics(0.45, 0.83), finetune=_metrics(0.48, 0.84))
    if with_curve:
        for fraction, rouge1 in ((0.1, 0.3), (0.5, 0.6)):
            for seed in (0, 1):
                _write_run(folder(), "random", seed, fraction, icl=_metrics(rouge1, 0.8),
                           finetune=_metrics(rouge1 + 0.01 * seed, 0.8))
    # A select-only job: no metrics, skipped.
    select_only = folder()
    select_only.mkdir(parents=True)
    (select_only / "results.json").write_text(json.dumps({"stage": "instruction", "selector": "random", "seed": 0}))
    return root


@pytest.fixture
def grid(tmp_path):
    return _write_grid(tmp_path / "runs")


def _table(root, fraction=None):
    runs, skipped = make_tables.collect_runs([root])
    return make_tables.build_table(runs, make_tables.table_fraction(runs, fraction)), runs, skipped


def _cells(table, name):
    row = next(row for row in table["rows"] if row["name"] == name)
    return {key: make_tables.format_cell(cell) for key, cell in row["cells"].items()}


def test_rows_in_paper_order_with_mean_std_and_missing_cells(grid):
    table, runs, skipped = _table(grid)
    assert skipped == 1
    assert table["fraction"] == 0.3  # 3 + 3 + 2 + 2 + 1 runs at 30 % against 2 at 10 % and 50 %
    assert [row["name"] for row in table["rows"]] == ["Initial", "Random", "LESS", "DEFT-UCS", "DELIFT", "Full Data",
                                                     "my_sel"]
    random = _cells(table, "Random")
    assert random["icl/rouge1"] == "42.00 ± 2.00"
    assert random["icl/embed_sim"] == "81.00 ± 1.00"
    assert random["icl/laj"] == "3.50 ± 0.50"
    assert random["finetune/rouge1"] == "52.00 ± 2.00"
    assert random["finetune/laj"] == "3.50 ± 0.50"
    assert _cells(table, "DELIFT")["finetune/laj"] == "–"
    less = _cells(table, "LESS")
    assert less["icl/rouge1"] == less["icl/embed_sim"] == less["icl/laj"] == "–"
    assert less["finetune/rouge1"] == "51.00 ± 1.41"  # 50 and 52: sample std sqrt(2)
    assert _cells(table, "DEFT-UCS")["finetune/rouge1"] == "48.00"  # one seed: no ±
    assert _cells(table, "Full Data")["finetune/embed_sim"] == "95.00 ± 0.00"
    # Accuracy only where a run has it: the ICL block, not the fine-tuned one.
    assert [c["key"] for c in table["columns"]] == ["icl/rouge1", "icl/embed_sim", "icl/laj", "icl/accuracy",
                                                    "finetune/rouge1", "finetune/embed_sim", "finetune/laj"]
    assert _cells(table, "DELIFT")["icl/accuracy"] == "60.00 ± 10.00"
    assert _cells(table, "Random")["icl/accuracy"] == "–"


def test_caption_names_judge_embedder_seeds_and_parse_failures(grid):
    table, _, _ = _table(grid)
    caption = table["caption"]
    assert "SmolLM2-135M-Instruct (stand-in judge, not Prometheus)" in caption
    assert "all-MiniLM-L6-v2" in caption
    assert "3 seeds: 0, 1, 2" in caption
    assert "Single seed (n=1): DEFT-UCS." in caption
    assert "6 of 60 judge replies could not be parsed" in caption  # 3 random runs x 2 modes x 1 failure of 10
    assert "30 % of the pool of 28 examples" in caption
    assert "x 100" in caption and "percent" in caption
    # The runs used MiniLM, not the paper's BGE: the column says so.
    assert "Emb. sim. (MiniLM) = cosine similarity of sentence embeddings (all-MiniLM-L6-v2)" in caption
    assert "BGE" not in caption
    markdown = make_tables.to_markdown(table)
    assert markdown.splitlines()[0].startswith(
        "| Method | ICL ROUGE | ICL Emb. sim. (MiniLM) | ICL LAJ | ICL Acc. | Fine-tuned ROUGE")
    assert "| Random | 42.00 ± 2.00 | 81.00 ± 1.00 | 3.50 ± 0.50 | – |" in markdown


def test_caption_names_the_kernel_engine_of_the_delift_runs(tmp_path):
    knn = {"engine": "knn", "approximation": True, "knn_k": 2, "knn_random": 0, "features": "model",
           "exact_pairs": 600, "all_pairs": 90000}
    for seed in (0, 1):
        _write_run(tmp_path / f"delift{seed}", "delift", seed, 0.3, finetune=_metrics(0.5, 0.5),
                   kernel={"kernel": knn, "private_kernel": {"engine": "fast", "approximation": False}})
    _write_run(tmp_path / "random0", "random", 0, 0.3, finetune=_metrics(0.4, 0.4))
    caption = _table(tmp_path)[0]["caption"]
    assert ("DELIFT utility kernels: pool kernel approximate, knn engine (k = 2 nearest by model features): "
            "600 of 90,000 pairs scored exactly; private kernel (pool x existing) exact (fast engine).") in caption
    # Runs without a model kernel (no DELIFT row) say nothing about kernels.
    _write_run(tmp_path / "other" / "random1", "random", 1, 0.3, finetune=_metrics(0.4, 0.4))
    assert "kernel" not in _table(tmp_path / "other")[0]["caption"]


def test_latex_escapes_names_and_uses_booktabs(grid):
    assert make_tables.latex_escape("a_b & 50% {x} #1 ~^\\") == (
        r"a\_b \& 50\% \{x\} \#1 \textasciitilde{}\textasciicircum{}\textbackslash{}")
    table, _, _ = _table(grid)
    tex = make_tables.to_latex(table, label="mix instruct")
    assert r"my\_sel & " in tex and "my_sel" not in tex
    assert r"Random & $42.00 \pm 2.00$ & $81.00 \pm 1.00$ & $3.50 \pm 0.50$ & -- & $52.00 \pm 2.00$" in tex
    assert r"DEFT-UCS & 45.00 & 83.00 & -- &" in tex
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\cmidrule(lr){2-5}", r"\cmidrule(lr){6-8}"):
        assert rule in tex
    assert r"\multicolumn{4}{c}{ICL} & \multicolumn{3}{c}{Fine-tuned}" in tex
    assert r"\label{tab:mix-instruct}" in tex
    assert "±" not in tex and "–" not in tex  # both rewritten for LaTeX
    assert r"mean $\pm$ sample std" in tex


def test_fraction_option_and_budget_curves(grid):
    table, runs, _ = _table(grid, fraction=0.5)
    assert [row["name"] for row in table["rows"]] == ["Initial", "Random", "Full Data"]
    assert _cells(table, "Random")["finetune/rouge1"] == "60.50 ± 0.71"
    curves = make_tables.budget_curves(runs)
    assert curves["metric"] == "finetune/rouge1"
    points = curves["methods"]["random"]
    assert [p["fraction"] for p in points] == [0.1, 0.3, 0.5]
    assert [round(p["mean"], 2) for p in points] == [30.5, 52.0, 60.5]
    assert list(curves["methods"])[:2] == ["random", "less"]  # paper order, then others
    assert curves["names"]["less"] == "LESS" and curves["label"] == "Fine-tuned ROUGE (%)"
    assert round(curves["references"]["full"]["mean"], 2) == 70.0
    assert round(curves["references"]["initial"]["mean"], 2) == 30.0
    # No fine-tuned values at all: the curve falls back to the ICL metric.
    for run in runs:
        run.metrics_by_mode.pop("finetune", None)
    assert make_tables.budget_curves(runs)["metric"] == "icl/rouge1"


def test_no_budget_png_with_one_fraction(tmp_path):
    root = _write_grid(tmp_path / "runs", with_curve=False)
    out = tmp_path / "results" / "single"
    assert make_tables.main([str(root), "--out", str(out)]) == 0
    assert out.with_name("single.md").exists() and out.with_name("single.tex").exists()
    assert not out.with_name("single_budget.png").exists()
    assert json.loads(out.with_name("single.json").read_text())["budget_curves"] is None


def test_cli_writes_all_outputs(grid, tmp_path):
    out = tmp_path / "docs" / "results" / "mix"
    proc = subprocess.run([sys.executable, str(SCRIPT), str(grid), "--out", str(out), "--title", "MixInstruct"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "| Random | 42.00 ± 2.00 |" in proc.stdout
    assert "**Table: MixInstruct.**" in proc.stdout
    assert "skipped 1 results.json without metrics" in proc.stderr
    png = out.with_name("mix_budget.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    saved = json.loads(out.with_name("mix.json").read_text())
    random = next(row for row in saved["rows"] if row["selector"] == "random")
    assert random["seeds"] == [0, 1, 2]
    assert random["cells"]["icl/rouge1"]["mean"] == pytest.approx(42.0)
    assert random["cells"]["icl/rouge1"]["std"] == pytest.approx(2.0)
    assert random["cells"]["icl/accuracy"] is None
    assert out.with_name("mix.md").read_text().startswith("| Method |")
    assert r"\begin{tabular}" in out.with_name("mix.tex").read_text()


def test_outputs_end_with_the_grid_and_table_commands(grid, tmp_path):
    sweep_dir = grid / "multirun" / "2025-01-01"
    (sweep_dir / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    hydra: [hydra/launcher=joblib, hydra.mode=MULTIRUN,"
        f" 'hydra.sweep.dir={Path.cwd() / 'outputs' / 'grid'}']\n"
        "    task: [+experiment=mix, 'seed=0,1,2', run.name=two words, \"selector='random,full'\"]\n")
    out = tmp_path / "results" / "mix"
    assert make_tables.main([str(grid), "--out", str(out), "--fraction", "0.3"]) == 0
    grid_command = ("python run.py -m +experiment=mix seed=0,1,2 'run.name=two words' \"selector='random,full'\""
                    " hydra/launcher=joblib"
                    " hydra.sweep.dir=outputs/grid")
    table_command = f"python experiments/make_tables.py {grid} --out {out} --fraction 0.3"
    assert json.loads(out.with_name("mix.json").read_text())["commands"] == {
        "grids": [grid_command], "tables": table_command}
    markdown = out.with_name("mix.md").read_text()
    assert markdown.endswith(f"Made with:\n\n```bash\n{grid_command}\n{table_command}\n```\n")
    assert out.with_name("mix.tex").read_text().endswith(f"% Made with:\n% {grid_command}\n% {table_command}\n")


def test_bad_inputs_give_one_error_line(tmp_path):
    root = _write_grid(tmp_path / "runs", with_curve=False)
    broken = root / "broken"
    broken.mkdir()
    (broken / "results.json").write_text('{"selector": "random", ')
    assert make_tables.main([str(root)]) == 2
    with pytest.raises(make_tables.DeliftInputError, match="broken/results.json"):
        make_tables.collect_runs([root])
    (broken / "results.json").unlink()
    _write_run(broken / "rerun", "random", 0, 0.3, icl=_metrics(0.4, 0.8))
    with pytest.raises(make_tables.DeliftInputError, match=r"same method \(Random\), fraction, seed"):
        make_tables.collect_runs([root])
    with pytest.raises(make_tables.DeliftInputError, match="--curve-metric"):
        make_tables.budget_curves(make_tables.collect_runs([root / "multirun"])[0], "finetune/bleu")
    with pytest.raises(make_tables.DeliftInputError, match="no subset run at fraction 0.7"):
        runs, _ = make_tables.collect_runs([root / "multirun"])
        make_tables.build_table(runs, 0.7)
    (tmp_path / "empty").mkdir()
    with pytest.raises(make_tables.DeliftInputError, match="no results.json"):
        make_tables.collect_runs([tmp_path / "empty"])


def test_results_without_modes_or_fraction(tmp_path):
    """What the pipeline wrote before metrics_by_mode: `metrics` is the fine-tuned mode, the fraction is inferred."""
    for seed, rouge1 in ((0, 0.25), (1, 0.35)):
        folder = tmp_path / "outputs" / f"run{seed}"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps(
            {"stage": "instruction", "selector": "delift", "model": "m", "n_pool": 20, "n_selected": 6, "seed": seed,
             "metrics": {"rouge1": rouge1, "embed_sim": 0.5}}))
    table, runs, _ = _table(tmp_path / "outputs")
    assert table["fraction"] == 0.3
    assert _cells(table, "DELIFT")["finetune/rouge1"] == "30.00 ± 7.07"
    # No run measured ICL or was judged: those columns are left out, not shown as dashes.
    assert [c["key"] for c in table["columns"]] == ["finetune/rouge1", "finetune/embed_sim"]
    assert "LAJ judge" not in table["caption"]
    (tmp_path / "outputs" / "run1" / "results.json").write_text(json.dumps(
        {"selector": "delift", "seed": 1, "fraction": 0.3, "metrics": {"rouge1": "high"}}))
    with pytest.raises(make_tables.DeliftInputError, match="field 'finetune.rouge1'"):
        make_tables.collect_runs([tmp_path / "outputs"])


# -- paired statistics -------------------------------------------------------------------------------


def test_bootstrap_of_constant_differences_is_that_value_and_significant():
    interval = make_tables.bootstrap_mean([2.5] * 30, resamples=1000, seed=0)
    assert interval == {"mean": pytest.approx(2.5), "lo": pytest.approx(2.5), "hi": pytest.approx(2.5)}
    assert make_tables.verdict(interval, "rouge1") == "better"
    assert make_tables.verdict(interval, "ref_loss") == "worse"  # a higher loss is worse
    assert make_tables.verdict(make_tables.bootstrap_mean([-1.0] * 5), "ref_loss") == "better"


def test_bootstrap_interval_of_a_symmetric_design_is_known_and_not_significant():
    # n = 100 differences of +-d: the resampled mean has sd d / sqrt(n) = 0.1 d (population variance d^2),
    # so the 95 % interval is about +-1.96 * 0.1 d around 0 (the mean of 100 draws moves in steps of 0.02 d).
    d = 3.0
    interval = make_tables.bootstrap_mean([d, -d] * 50, seed=1)
    assert interval["mean"] == pytest.approx(0.0)
    assert interval["lo"] == pytest.approx(-0.196 * d, abs=0.025 * d)
    assert interval["hi"] == pytest.approx(0.196 * d, abs=0.025 * d)
    assert make_tables.verdict(interval, "rouge1") is None
    # The same design shifted by 1.5 d excludes 0: better.
    shifted = make_tables.bootstrap_mean([2.5 * d, 0.5 * d] * 50, seed=1)
    assert shifted["lo"] == pytest.approx(1.5 * d - 0.196 * d, abs=0.025 * d)
    assert make_tables.verdict(shifted, "rouge1") == "better"
    # Seeded: the same values and seed give the same interval.
    assert make_tables.bootstrap_mean([d, -d] * 50, seed=1) == interval


N_EVAL = 10


def _write_paired_run(folder: Path, selector: str, seed: int, fraction: float, rouge, loss, correct, sources=None,
                      **extra):
    """results.json and predictions.jsonl with the given per-example scores (fine-tuned mode); the metrics
    are their means, as the pipeline writes them. Example k's id is <sources[k]>/ex<k> (one source,
    "alpaca", by default), as the pipeline's <source>/<original id>."""
    sources = sources or ["alpaca"] * len(rouge)
    rows = [{"mode": "finetune", "id": f"{sources[k]}/ex{k}", "prediction": "p", "reference": "r",
             "rouge1": rouge[k], "embed_sim": 0.5, "ref_loss": loss[k]}
            | ({"correct": correct[k]} if correct[k] is not None else {}) for k in range(len(rouge))]
    judged = [c for c in correct if c is not None]
    accuracy = {"accuracy": float(np.mean(judged))} if judged else {}
    _write_run(folder, selector, seed, fraction,
               finetune=_metrics(float(np.mean(rouge)), 0.5, ref_loss=float(np.mean(loss)), **accuracy), **extra)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_paired_grid(root: Path) -> Path:
    """Random's scores differ by example and seed; DELIFT = Random + 0.05 ROUGE and - 0.5 loss on every
    example; Full Data = Random + 0.05 and - 0.05 ROUGE on alternate examples (a symmetric design)."""
    job = iter(range(1000))
    for seed in (0, 1, 2):
        base = [0.2 + 0.03 * k + 0.01 * seed for k in range(N_EVAL)]
        loss = [2.0 + 0.1 * k for k in range(N_EVAL)]
        correct = [k % 2 == 0 if k < 6 else None for k in range(N_EVAL)]  # 6 checkable answers per seed
        runs = {"random": ([r for r in base], loss, correct),
                "delift": ([r + 0.05 for r in base], [x - 0.5 for x in loss], correct),
                "full": ([r + (0.05 if k % 2 else -0.05) for k, r in enumerate(base)], loss, correct)}
        for selector, (rouge, ref_loss, right) in runs.items():
            fraction = 1.0 if selector == "full" else 0.3
            _write_paired_run(root / str(next(job)), selector, seed, fraction, rouge, ref_loss, right)
    # A seed without a Random run to pair with: left out of the comparison.
    _write_paired_run(root / str(next(job)), "delift", 3, 0.3, [0.9] * N_EVAL, [9.0] * N_EVAL, [True] * N_EVAL)
    return root


def _paired(table, reference, selector, key):
    rows = next(ref for ref in table["paired"]["references"] if ref["selector"] == reference)["rows"]
    return next(row for row in rows if row["selector"] == selector)["cells"][key]


def test_paired_differences_vs_random_and_full(tmp_path):
    root = _write_paired_grid(tmp_path / "runs")
    table, _, _ = _table(root)
    assert [c["key"] for c in table["columns"]] == ["finetune/rouge1", "finetune/embed_sim", "finetune/accuracy",
                                                    "finetune/ref_loss"]
    assert [ref["name"] for ref in table["paired"]["references"]] == ["Random", "Full Data"]
    # Constant differences: a zero-width interval at that value, significant.
    rouge = _paired(table, "random", "delift", "finetune/rouge1")
    assert (rouge["mean"], rouge["lo"], rouge["hi"]) == pytest.approx((5.0, 5.0, 5.0))
    assert rouge["verdict"] == "better"
    assert rouge["seeds"] == [0, 1, 2] and rouge["n_eval"] == [N_EVAL] * 3 and rouge["n_pairs"] == 30
    loss = _paired(table, "random", "delift", "finetune/ref_loss")
    assert (loss["mean"], loss["lo"], loss["hi"], loss["verdict"]) == (pytest.approx(-0.5), pytest.approx(-0.5),
                                                                       pytest.approx(-0.5), "better")
    accuracy = _paired(table, "random", "delift", "finetune/accuracy")
    assert accuracy["n_eval"] == [6, 6, 6] and (accuracy["mean"], accuracy["verdict"]) == (0.0, None)
    # +-5 on alternate examples (n = 30): mean 0, interval about +-1.96 * 5 / sqrt(30) = +-1.79, not significant.
    full = _paired(table, "random", "full", "finetune/rouge1")
    assert full["mean"] == pytest.approx(0.0, abs=1e-9)
    assert full["lo"] == pytest.approx(-1.79, abs=0.25) and full["hi"] == pytest.approx(1.79, abs=0.25)
    assert full["verdict"] is None
    # DELIFT - Full is 0 or +10 on alternate examples: mean 5 +- 1.79, significantly better.
    delift_full = _paired(table, "full", "delift", "finetune/rouge1")
    assert delift_full["mean"] == pytest.approx(5.0) and delift_full["lo"] > 2.5 and delift_full["verdict"] == "better"
    assert table["paired"]["resamples"] == 10_000 and table["paired"]["seed"] == 0


def test_paired_tables_in_markdown_latex_and_json(tmp_path):
    root = _write_paired_grid(tmp_path / "runs")
    out = tmp_path / "results" / "paired"
    assert make_tables.main([str(root), "--out", str(out), "--bootstrap", "2000", "--seed", "7"]) == 0
    markdown = out.with_name("paired.md").read_text()
    assert "**Paired differences vs Random**" in markdown and "**Paired differences vs Full Data**" in markdown
    delift_row = next(line for line in markdown.splitlines() if line.startswith("| DELIFT | +5.00"))
    assert "+5.00 [5.00, 5.00] ▲" in delift_row and "-0.50 [-0.50, -0.50] ▲" in delift_row
    assert "+0.00 [" in delift_row and "] ▼" not in delift_row  # accuracy: equal, no mark
    assert "2,000 resamples of the pairs, seed 7" in markdown
    assert "marked only where the interval excludes 0" in markdown
    assert "Loss = mean token negative log-likelihood" in markdown
    tex = out.with_name("paired.tex").read_text()
    assert r"$+5.00$ [5.00, 5.00] $\uparrow$" in tex and r"\label{tab:paired-vs-random}" in tex
    assert "▲" not in tex and tex.count(r"\begin{table}") == 3  # one evaluation source: no per-source tables
    saved = json.loads(out.with_name("paired.json").read_text())
    assert saved["by_source"] is None and "Per evaluation source" not in markdown
    assert saved["paired"]["resamples"] == 2000 and saved["paired"]["seed"] == 7
    vs_random = saved["paired"]["references"][0]
    cell = next(row for row in vs_random["rows"] if row["name"] == "Full Data")["cells"]["finetune/rouge1"]
    assert "| Full Data | +0.00 [-1.67, 1.67] |" in markdown  # no "-0.00", no mark
    assert cell["seeds"] == [0, 1, 2] and cell["n_eval"] == [N_EVAL] * 3 and cell["verdict"] is None


def test_budget_curve_error_bars_are_bootstrap_intervals(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        for fraction, rouge in ((0.1, 0.3), (0.3, 0.5)):
            scores = [rouge + (0.1 if k % 2 else -0.1) for k in range(N_EVAL)]
            _write_paired_run(root / f"{fraction}-{seed}", "random", seed, fraction, scores, [1.0] * N_EVAL,
                              [None] * N_EVAL)
    runs, _ = make_tables.collect_runs([root])
    points = make_tables.budget_curves(runs, resamples=4000)["methods"]["random"]
    # 20 (seed, example) scores of +-10 around the mean: interval about +-1.96 * 10 / sqrt(20) = +-4.4.
    for point, mean in zip(points, (30.0, 50.0)):
        assert point["pooled"]["mean"] == pytest.approx(mean)
        assert point["pooled"]["lo"] == pytest.approx(mean - 4.4, abs=0.8)
        assert point["pooled"]["hi"] == pytest.approx(mean + 4.4, abs=0.8)
    png = make_tables.plot_budget(make_tables.budget_curves(runs), tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_differences_vs_random_at_each_fraction(tmp_path):
    """DELIFT = Random + 5 ROUGE at 10 %, Random - 0.1/+0.1 on alternate examples at 20 % (not significant)."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        base = [0.2 + 0.03 * k for k in range(N_EVAL)]
        shifts = {0.1: [0.05] * N_EVAL, 0.2: [0.1 if k % 2 else -0.1 for k in range(N_EVAL)]}
        for fraction, shift in shifts.items():
            for selector, rouge in (("random", base), ("delift", [r + d for r, d in zip(base, shift)])):
                _write_paired_run(root / f"{selector}-{fraction}-{seed}", selector, seed, fraction, rouge,
                                  [1.0] * N_EVAL, [None] * N_EVAL)
    out = tmp_path / "results" / "budget"
    assert make_tables.main([str(root), "--out", str(out), "--bootstrap", "2000", "--fraction", "0.1"]) == 0
    saved = json.loads(out.with_name("budget.json").read_text())["paired_by_fraction"]
    assert [row["name"] for row in saved["rows"]] == ["DELIFT at 10 %", "DELIFT at 20 %"]
    at_10, at_20 = (row["cells"]["finetune/rouge1"] for row in saved["rows"])
    assert (at_10["mean"], at_10["lo"], at_10["verdict"]) == (pytest.approx(5.0), pytest.approx(5.0), "better")
    assert at_10["seeds"] == [0, 1] and at_10["n_eval"] == [N_EVAL, N_EVAL]
    # +-10 on 20 pairs: interval about +-1.96 * 10 / sqrt(20) = +-4.4 around 0, no verdict.
    assert at_20["mean"] == pytest.approx(0.0, abs=1e-9) and at_20["verdict"] is None
    assert at_20["lo"] == pytest.approx(-4.4, abs=0.8) and at_20["hi"] == pytest.approx(4.4, abs=0.8)
    markdown = out.with_name("budget.md").read_text()
    assert "**Paired differences vs Random at each subset size.**" in markdown
    assert "| DELIFT at 10 % | +5.00 [5.00, 5.00] ▲ |" in markdown
    assert r"\label{tab:budget-vs-random-by-fraction}" in out.with_name("budget.tex").read_text()
    # The curve's lower panel: the same paired differences, for the curve's metric.
    curves = json.loads(out.with_name("budget.json").read_text())["budget_curves"]
    assert [point["vs_random"]["mean"] for point in curves["methods"]["delift"]] == [pytest.approx(5.0),
                                                                                    pytest.approx(0.0, abs=1e-9)]
    assert all("vs_random" not in point for point in curves["methods"]["random"])
    assert out.with_name("budget_budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One fraction only: no such table.
    single, _, _ = _table(_write_paired_grid(tmp_path / "single"))
    assert single["paired_by_fraction"] is None


# -- methods: selector variants, new baselines ----------------------------------------------------------------


def _delift_config(fraction: float, self_utility: str, normalize: str) -> dict:
    """DELIFT's selector_config as the pipeline writes it (the selector's constructor settings)."""
    return {"fraction": fraction, "objective": None, "eta": 1.0, "nu": 1.0, "backend": "ours",
            "self_utility": self_utility, "normalize": normalize, "missing": "neutral", "name": "delift"}


INCLUDE_GLOBAL = "DELIFT (self-utility include, normalize global)"
EXCLUDE_ROW = "DELIFT (self-utility exclude, normalize row)"


def _write_variant_grid(root: Path) -> Path:
    """Random and two DELIFT variants at 30 %, seeds 0 and 1: include/global = Random + 2 ROUGE points on
    every example, exclude/row = Random + 1 on seed 0 and + 3 on seed 1. One more include/global run at
    50 %: its fraction differs from the others', its method does not."""
    loss, unchecked = [1.0] * N_EVAL, [None] * N_EVAL
    for seed in (0, 1):
        base = [0.2 + 0.03 * k + 0.01 * seed for k in range(N_EVAL)]  # mean 33.5 + seed ROUGE points
        _write_paired_run(root / f"random{seed}", "random", seed, 0.3, base, loss, unchecked,
                          selector_config={"fraction": 0.3, "name": "random"})
        _write_paired_run(root / f"include{seed}", "delift", seed, 0.3, [r + 0.02 for r in base], loss, unchecked,
                          selector_config=_delift_config(0.3, "include", "global"))
        _write_paired_run(root / f"exclude{seed}", "delift", seed, 0.3, [r + 0.01 + 0.02 * seed for r in base], loss,
                          unchecked, selector_config=_delift_config(0.3, "exclude", "row"))
    _write_paired_run(root / "include-50", "delift", 0, 0.5, [0.5] * N_EVAL, loss, unchecked,
                      selector_config=_delift_config(0.5, "include", "global"))
    return root


def test_delift_variants_are_rows_of_their_own_with_their_paired_differences(tmp_path):
    root = _write_variant_grid(tmp_path / "runs")
    out = tmp_path / "results" / "variants"
    assert make_tables.main([str(root), "--out", str(out), "--bootstrap", "4000"]) == 0
    saved = json.loads(out.with_name("variants.json").read_text())
    assert saved["fraction"] == 0.3
    assert [row["name"] for row in saved["rows"]] == ["Random", EXCLUDE_ROW, INCLUDE_GLOBAL]
    exclude_row = saved["rows"][1]
    assert exclude_row["method"] == "delift[self_utility=exclude,normalize=row]"
    assert exclude_row["selector"] == "delift"
    assert exclude_row["settings"] == {"self_utility": "exclude", "normalize": "row"}
    assert saved["rows"][0] | {"cells": None} == {
        "method": "random", "selector": "random", "settings": {}, "name": "Random", "fraction": 0.3, "n_seeds": 2,
        "seeds": [0, 1], "cells": None}
    # Seed means: Random 33.5, 34.5; include/global 35.5, 36.5; exclude/row 34.5, 37.5.
    markdown = out.with_name("variants.md").read_text()
    assert "| Random | 34.00 ± 0.71 |" in markdown
    assert f"| {INCLUDE_GLOBAL} | 36.00 ± 0.71 |" in markdown
    assert f"| {EXCLUDE_ROW} | 36.00 ± 2.12 |" in markdown  # sample std of 34.5 and 37.5: 1.5 * sqrt(2)
    assert "named by the settings in which they differ" in markdown
    # vs Random: +2 on all 20 pairs; +1 on 10 and +3 on 10 (mean 2, bootstrap sd 1 / sqrt(20): about +-0.44).
    rows = {row["method"]: row["cells"]["finetune/rouge1"] for row in saved["paired"]["references"][0]["rows"]}
    include = rows["delift[self_utility=include,normalize=global]"]
    assert (include["mean"], include["lo"], include["hi"], include["verdict"]) == (
        pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), "better")
    exclude = rows["delift[self_utility=exclude,normalize=row]"]
    assert exclude["mean"] == pytest.approx(2.0) and exclude["n_pairs"] == 20 and exclude["verdict"] == "better"
    assert exclude["lo"] == pytest.approx(1.56, abs=0.15) and exclude["hi"] == pytest.approx(2.44, abs=0.15)
    assert f"| {INCLUDE_GLOBAL} | +2.00 [2.00, 2.00] ▲ |" in markdown
    tex = out.with_name("variants.tex").read_text()
    assert r"DELIFT (self-utility include, normalize global) & $36.00 \pm 0.71$" in tex
    # The budget curve: one line per method, the 50 % run on its variant's line.
    curves = saved["budget_curves"]
    assert list(curves["methods"]) == ["random", "delift[self_utility=exclude,normalize=row]",
                                       "delift[self_utility=include,normalize=global]"]
    assert [p["fraction"] for p in curves["methods"]["delift[self_utility=include,normalize=global]"]] == [0.3, 0.5]
    assert curves["names"]["delift[self_utility=include,normalize=global]"] == INCLUDE_GLOBAL
    # Two runs of one variant and seed are one seed twice; two variants of one seed are not.
    _write_paired_run(root / "rerun" / "include0", "delift", 0, 0.3, [0.1] * N_EVAL, [1.0] * N_EVAL, [None] * N_EVAL,
                      selector_config=_delift_config(0.3, "include", "global"))
    duplicate = r"same method \(DELIFT \(self-utility include, normalize global\)\), fraction, seed, model and stage"
    with pytest.raises(make_tables.DeliftInputError, match=duplicate + " as .*/include0/"):
        make_tables.collect_runs([root])


def test_variant_labels_for_shared_missing_and_reference_configs(tmp_path):
    def names(folder):
        return [row["name"] for row in _table(folder)[0]["rows"]]

    finetune = _metrics(0.4, 0.5)
    # One configuration (the fractions aside): the plain row name.
    _write_run(tmp_path / "shared" / "a", "delift", 0, 0.3, finetune=finetune,
               selector_config=_delift_config(0.3, "exclude", "global"))
    _write_run(tmp_path / "shared" / "b", "delift", 1, 0.5, finetune=finetune,
               selector_config=_delift_config(0.5, "exclude", "global"))
    assert names(tmp_path / "shared") == ["DELIFT"]
    # A setting one run did not record, and a run without selector_config, among variants.
    older = {key: value for key, value in _delift_config(0.3, "include", "global").items() if key != "self_utility"}
    _write_run(tmp_path / "mixed" / "a", "delift", 0, 0.3, finetune=finetune,
               selector_config=_delift_config(0.3, "exclude", "global"))
    _write_run(tmp_path / "mixed" / "b", "delift", 0, 0.3, finetune=finetune, selector_config=older)
    _write_run(tmp_path / "mixed" / "c", "delift", 0, 0.3, finetune=finetune)
    assert names(tmp_path / "mixed") == ["DELIFT (self-utility exclude)", "DELIFT (self-utility not recorded)",
                                         "DELIFT (settings not recorded)"]
    # Random is what the comparisons refer to: two configurations of it are an error, not two rows.
    for seed, balanced in ((0, False), (1, True)):
        _write_run(tmp_path / "random" / str(seed), "random", seed, 0.3, finetune=finetune,
                   selector_config={"fraction": 0.3, "balanced": balanced, "name": "random"})
    with pytest.raises(make_tables.DeliftInputError, match="the Random runs differ in balanced"):
        make_tables.collect_runs([tmp_path / "random"])


def test_new_baselines_take_their_paper_places(tmp_path):
    selectors = ["full", "delift", "delift_se", "deft_ucs", "less", "selectit", "rds", "longest", "random_balanced",
                 "random", "initial"]
    for selector in selectors:
        _write_run(tmp_path / selector, selector, 0, 0.3, finetune=_metrics(0.4, 0.5))
    assert [row["name"] for row in _table(tmp_path)[0]["rows"]] == [
        "Initial", "Random", "Random (balanced)", "Longest", "RDS+", "SelectIT", "LESS", "DEFT-UCS", "DELIFT (SE)",
        "DELIFT", "Full Data"]


# -- per evaluation source, embedder labels ----------------------------------------------------------------


SOURCES = ["alpaca"] * 4 + ["gsm8k"] * 2


def _write_two_source_grid(root: Path) -> Path:
    """Seeds 0 and 1, four alpaca and two gsm8k examples. Random's seed means: alpaca 25 and 27, gsm8k 55 and 59;
    DELIFT = Random + 5 ROUGE points on every alpaca example, - 10 on every gsm8k one: + 0 over the mixture."""
    for seed in (0, 1):
        random = [0.1 * (k + 1) + 0.02 * seed for k in range(4)] + [0.5 + 0.1 * k + 0.04 * seed for k in range(2)]
        delift = [r + (0.05 if source == "alpaca" else -0.10) for r, source in zip(random, SOURCES)]
        for selector, rouge in (("random", random), ("delift", delift)):
            _write_paired_run(root / f"{selector}{seed}", selector, seed, 0.3, rouge, [1.0] * 6, [None] * 6, SOURCES)
    return root


def test_per_source_cells_and_paired_differences(tmp_path):
    root = _write_two_source_grid(tmp_path / "runs")
    out = tmp_path / "results" / "src"
    assert make_tables.main([str(root), "--out", str(out), "--bootstrap", "2000"]) == 0
    by_source = json.loads(out.with_name("src.json").read_text())["by_source"]
    assert by_source["eval_sources"] == [{"source": "alpaca", "examples_per_run": [4]},
                                         {"source": "gsm8k", "examples_per_run": [2]}]
    cells = {(row["name"], row["source"]): row["cells"]["finetune/rouge1"] for row in by_source["rows"]}
    assert list(cells) == [("Random", "alpaca"), ("Random", "gsm8k"), ("DELIFT", "alpaca"), ("DELIFT", "gsm8k")]
    for key, mean, std in ((("Random", "alpaca"), 26.0, 2 ** 0.5), (("Random", "gsm8k"), 57.0, 2 * 2 ** 0.5),
                           (("DELIFT", "alpaca"), 31.0, 2 ** 0.5), (("DELIFT", "gsm8k"), 47.0, 2 * 2 ** 0.5)):
        assert (cells[key]["mean"], cells[key]["std"], cells[key]["n"]) == (pytest.approx(mean), pytest.approx(std), 2)
    # Constant differences within a source: zero-width intervals, a win on alpaca and a loss on gsm8k.
    differences = {row["source"]: row["cells"] for row in by_source["vs_random"]["rows"]}
    alpaca, gsm8k = differences["alpaca"]["finetune/rouge1"], differences["gsm8k"]["finetune/rouge1"]
    assert (alpaca["mean"], alpaca["lo"], alpaca["hi"], alpaca["verdict"]) == (
        pytest.approx(5.0), pytest.approx(5.0), pytest.approx(5.0), "better")
    assert alpaca["n_eval"] == [4, 4] and alpaca["n_pairs"] == 8
    assert (gsm8k["mean"], gsm8k["lo"], gsm8k["hi"], gsm8k["verdict"]) == (
        pytest.approx(-10.0), pytest.approx(-10.0), pytest.approx(-10.0), "worse")
    assert gsm8k["n_eval"] == [2, 2]
    markdown = out.with_name("src.md").read_text()
    # The mixture hides both: (8 x 5 - 4 x 10) / 12 = 0.
    assert "| DELIFT | +0.00 [" in markdown
    assert "**Per evaluation source**" in markdown
    assert "| Method | Source | Fine-tuned ROUGE |" in markdown
    assert "| Random | alpaca | 26.00 ± 1.41 | 50.00 ± 0.00 | 1.00 ± 0.00 |" in markdown
    assert "| DELIFT | alpaca | +5.00 [5.00, 5.00] ▲ | +0.00 [0.00, 0.00] | +0.00 [0.00, 0.00] |" in markdown
    assert "| DELIFT | gsm8k | -10.00 [-10.00, -10.00] ▼ |" in markdown
    assert "2 sources; evaluation examples per run: alpaca 4, gsm8k 2" in markdown
    assert markdown.index("**Per evaluation source**") > markdown.index("**Paired differences vs Random**")
    tex = out.with_name("src.tex").read_text()
    assert r"\label{tab:src-by-source}" in tex and r"\label{tab:src-by-source-vs-random}" in tex
    assert r"Method & Source & ROUGE" in tex and r"\cmidrule(lr){3-5}" in tex
    assert r"DELIFT & gsm8k & $-10.00$ [-10.00, -10.00] $\downarrow$" in tex


def test_an_example_source_is_its_row_field_else_its_id_prefix():
    assert make_tables._source_of({"source": "gsm8k"}, "alpaca/1") == "gsm8k"
    assert make_tables._source_of({}, "alpaca/train/1") == "alpaca"
    assert make_tables._source_of({}, "1") is None


def test_embedding_column_named_by_the_embedder_used(tmp_path):
    assert make_tables.embedder_label(["all-MiniLM-L6-v2"]) == "Emb. sim. (MiniLM)"
    assert make_tables.embedder_label(["BAAI/bge-large-en-v1.5"]) == "BGE"
    assert make_tables.embedder_label(["BAAI/bge-large-en-v1.5", "BAAI/bge-small-en-v1.5"]) == "BGE"
    assert make_tables.embedder_label(["BAAI/bge-large-en-v1.5", "all-MiniLM-L6-v2"]) == "Emb. sim."
    assert make_tables.embedder_label(["my-embedder"]) == "Emb. sim. (my-embedder)"
    assert make_tables.embedder_label([]) == "Emb. sim."
    for seed in (0, 1):
        _write_run(tmp_path / f"random{seed}", "random", seed, 0.3, icl=_metrics(0.4, 0.8),
                   embedder={"name": "BAAI/bge-large-en-v1.5", "packaged": False})
    table = _table(tmp_path)[0]
    assert [column["metric"] for column in table["columns"]] == ["ROUGE", "BGE"]
    assert "BGE = cosine similarity of sentence embeddings (BAAI/bge-large-en-v1.5)" in table["caption"]
    assert table["units"].startswith("ROUGE, BGE, ")


def _report(subset: dict, pool: dict, p50: float, **delift) -> dict:
    n = sum(pool.values())
    return {"n_pool": n, "n_selected": sum(subset.values()),
            "sources": {s: {"pool": pool[s], "pool_share": pool[s] / n, "subset": subset.get(s, 0)} for s in pool},
            "response_tokens": {"pool": {"p50": 4.0}, "subset": {"p50": p50}}} | delift


def test_what_the_subsets_hold_per_method(tmp_path):
    root, pool = tmp_path / "runs", {"trivia": 6, "gsm8k": 4}
    _write_run(root / "0", "random", 0, 0.3, finetune=_metrics(0.4, 0.8),
               selection_report=_report({"trivia": 2, "gsm8k": 1}, pool, 3.0))
    _write_run(root / "1", "random", 1, 0.3, finetune=_metrics(0.4, 0.8),
               selection_report=_report({"trivia": 3}, pool, 5.0))
    _write_run(root / "2", "delift", 0, 0.3, finetune=_metrics(0.4, 0.8),
               selection_report=_report({"gsm8k": 3}, pool, 40.0, self_coverage_share=0.25,
                                        diagonal_top_overlap=2 / 3))
    _write_run(root / "3", "initial", 0, 0.3, finetune=_metrics(0.3, 0.7), selection_report=_report({}, pool, 4.0))
    _write_run(root / "4", "longest", 0, 0.3, finetune=_metrics(0.4, 0.8))  # an older run: no report
    out = tmp_path / "results" / "mix"
    assert make_tables.main([str(root), "--out", str(out), "--bootstrap", "100"]) == 0
    subsets = json.loads(out.with_name("mix.json").read_text())["subsets"]
    assert subsets["sources"] == [{"source": "trivia", "pool": 6}, {"source": "gsm8k", "pool": 4}]
    assert [row["name"] for row in subsets["rows"]] == ["Random", "DELIFT"]  # Initial chose nothing
    random_row = subsets["rows"][0]
    assert random_row["counts"]["trivia"] == {"mean": 2.5, "std": pytest.approx(0.5 ** 0.5), "n": 2}
    assert random_row["counts"]["gsm8k"] == {"mean": 0.5, "std": pytest.approx(0.5 ** 0.5), "n": 2}
    assert random_row["self_coverage_share"] is None
    markdown = out.with_name("mix.md").read_text()
    assert ("| Method | trivia (pool 6) | gsm8k (pool 4) | Median response tokens (pool 4) | Self-coverage share "
            "| Top-of-diagonal overlap |") in markdown
    assert "| Random | 2.5 ± 0.7 | 0.5 ± 0.7 | 4.0 ± 1.4 | – | – |" in markdown
    assert "| DELIFT | 0.0 | 3.0 | 40.0 | 0.25 | 0.67 |" in markdown
    assert r"\label{tab:mix-subsets}" in out.with_name("mix.tex").read_text()
    assert out.with_name("mix_subsets.png").read_bytes().startswith(b"\x89PNG")


def test_a_selection_report_that_is_not_an_object_names_the_file(tmp_path):
    _write_run(tmp_path / "runs" / "0", "random", 0, 0.3, finetune=_metrics(0.4, 0.8), selection_report=[1, 2])
    with pytest.raises(make_tables.DeliftInputError, match="0/results.json.*selection_report"):
        make_tables.collect_runs([tmp_path / "runs"])
