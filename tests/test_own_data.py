"""Your own data in one command (stage=file, file_task, file_continual), the same selection from the
Python API, ids kept, over-long records under every selector, failed jobs, file permissions, the
dry run's estimate, the help and the W&B names. The command runs in-process (`delift.cli.main`)."""

from __future__ import annotations

import json
import logging
import os
import stat
import warnings
from pathlib import Path

import pytest
from datasets import load_from_disk

import delift
import delift.pipeline
from delift.config import validate
from delift.data import build_stage
from delift.errors import DeliftInputError
from delift.pipeline import run
from delift.records import make_record
from delift.tracking import kernel_metrics, run_tags
from tests.helpers import CONF_DIR, compose_config, isolated_cache, run_cli, run_py
from tests.test_wandb_run import OfflineRun, offline_wandb  # noqa: F401 - a fixture

QUESTIONS = ["capital of France", "colour of the sky", "legs of a spider", "author of Hamlet", "12 times 12",
             "gas plants absorb", "largest planet", "boiling point of water", "speed of light", "author of Emma"]
TINY = ["model=tiny_qwen2", "progress=false", "kernel.batch_size=8"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def rows(n: int, prefix: str = "q", long: int | None = None) -> list[dict]:
    out = [{"id": f"{prefix}{i}", "instruction": "Answer the question.", "input": f"{QUESTIONS[i % 10]} ({i})",
            "output": f"answer {i}"} for i in range(n)]
    if long is not None:  # about 4,500 tokens of prompt before a short response
        out[long]["input"] = "a very long context " * 1100 + out[long]["input"]
    return out


@pytest.fixture
def data_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "mydata.jsonl", rows(25))


def cli(tmp_path, monkeypatch, cache, *overrides, name="run", code=0):
    """`delift OVERRIDES` in-process (delift.cli.main), its run folder under tmp_path: (folder, CliResult)."""
    folder = tmp_path / name
    result = run_cli([*overrides, f"hydra.run.dir={folder}", f"paths.cache_dir={cache}"], tmp_path, monkeypatch)
    assert result.returncode == code, result.stderr[-3000:]
    return folder, result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- one command, the same selection as the API --------------------------------------------------------


def test_one_command_selects_from_a_file_as_the_api_does_with_the_file_ids(data_file, tmp_path, monkeypatch):
    cache = isolated_cache(tmp_path)
    folder, result = cli(tmp_path, monkeypatch, cache, "task=select", "stage=file", f"stage.pool={data_file}",
                         "selector=delift", "selector.fraction=0.3", "logger=none", *TINY)
    assert result.stdout.rstrip().splitlines()[-1] == "run folder: run"  # relative to the working directory
    selection = json.loads((folder / "selection.json").read_text())
    api = delift.select(data_file, method="delift", fraction=0.3, model="tiny_qwen2", progress=False,
                        overrides=[f"paths.cache_dir={cache}", "kernel.batch_size=8"])
    assert selection["indices"] == api.indices and len(api.indices) == 8 and selection["n_pool"] == 25
    assert selection["ids"] == api.ids == [f"q{i}" for i in api.indices]  # the file's own ids
    # ... in every output: subset.jsonl and the exports.
    assert [r["id"] for r in read_jsonl(folder / "subset.jsonl")] == api.ids
    assert [r["id"] for r in read_jsonl(folder / "subset_chat.jsonl")] == api.ids
    assert load_from_disk(str(folder / "subset_hf"))["id"] == api.ids
    assert not (folder / "FAILED").exists()


def test_kernel_task_needs_no_evaluation_set(data_file, tmp_path, monkeypatch):
    folder, _ = cli(tmp_path, monkeypatch, isolated_cache(tmp_path), "task=kernel", "stage=file",
                    f"stage.pool={data_file}", "logger=none", *TINY)
    results = json.loads((folder / "results.json").read_text())
    assert results["kernels"]["kernel"]["shape"] == [25, 25]


def test_run_holds_out_an_evaluation_part_and_says_so(data_file, tmp_path, monkeypatch):
    folder, _ = cli(tmp_path, monkeypatch, isolated_cache(tmp_path), "stage=file", f"stage.pool={data_file}",
                    "selector=random", "logger=none", "trainer.max_steps=2", "eval.max_new_tokens=4",
                    "stage.holdout_eval=0.2", *TINY)
    results = json.loads((folder / "results.json").read_text())
    assert results["n_pool"] == 20 and results["n_selected"] == 6
    log = (folder / "cli.log").read_text()
    assert "5 of the 25 pool records are held out to evaluate on (stage.holdout_eval=0.2)" in log
    assert len(read_jsonl(folder / "predictions.jsonl")) == 5
    # An evaluation file instead: nothing held out, the whole file is the pool.
    test_file = write_jsonl(tmp_path / "test.jsonl", [dict(r, input="Test: " + r["input"]) for r in rows(4, "t")])
    stage = build_stage(compose_config(["stage=file", f"stage.pool={data_file}", f"stage.eval={test_file}"]).stage, 0)
    assert (len(stage.pool), [r["id"] for r in stage.eval]) == (25, ["t0", "t1", "t2", "t3"])
    # Without either, a job that evaluates says what to give.
    cfg = compose_config(["stage=file", f"stage.pool={data_file}", "stage.holdout_eval=null"])
    with pytest.raises(DeliftInputError, match=r"stage\.eval=PATH.*stage\.holdout_eval"):
        build_stage(cfg.stage, 0)
    assert len(build_stage(cfg.stage, 0, evaluates=False).pool) == 25


@pytest.mark.parametrize("suffix", ["json", "csv", "hf"])
def test_json_csv_and_dataset_folders_give_the_jsonl_records(suffix, data_file, tmp_path):
    records = rows(25)
    if suffix == "json":
        path = tmp_path / "mydata.json"
        path.write_text(json.dumps(records), encoding="utf-8")
    elif suffix == "csv":
        import pandas as pd

        path = tmp_path / "mydata.csv"
        pd.DataFrame(records).to_csv(path, index=False)
    else:
        import datasets

        path = tmp_path / "mydata"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    stage = build_stage(compose_config(["stage=file", f"stage.pool={path}"]).stage, 0, evaluates=False)
    reference = build_stage(compose_config(["stage=file", f"stage.pool={data_file}"]).stage, 0, evaluates=False)
    assert stage.pool == reference.pool and stage.pool[3]["id"] == "q3" and stage.pool[3]["source"] == "mydata"


def test_a_subset_hf_export_reads_back_as_a_pool(tmp_path):
    from delift.export import export_subset

    records = [dict(r, source="mine", meta={"k": i}) for i, r in enumerate(rows(6))]
    export_subset(tmp_path, records, list(range(6)), formats=["hf"])
    stage = build_stage({"name": "s", "objective": "fl", "pool": str(tmp_path / "subset_hf")}, 0, evaluates=False)
    assert [(r["id"], r["source"], r["meta"]) for r in stage.pool] == [(f"q{i}", "mine", {"k": i}) for i in range(6)]


def test_task_stage_files_sharing_ids_are_prefixed_alike_on_the_cli_and_in_the_api(tmp_path, monkeypatch):
    cache = isolated_cache(tmp_path)
    pool = write_jsonl(tmp_path / "pool.jsonl", rows(12))
    task = write_jsonl(tmp_path / "task.jsonl", [dict(r, input="Target: " + r["input"]) for r in rows(4)])
    folder, _ = cli(tmp_path, monkeypatch, cache, "task=select", "stage=file_task", f"stage.pool={pool}",
                    f"stage.target={task}", "selector=delift", "logger=none", *TINY)
    selection = json.loads((folder / "selection.json").read_text())
    api = delift.select(pool, "delift", 0.3, stage="task", target=task, model="tiny_qwen2", progress=False,
                        overrides=[f"paths.cache_dir={cache}", "kernel.batch_size=8"])
    assert selection["info"]["objective"] == api.info["objective"] == "flmi"
    assert (selection["indices"], selection["ids"]) == (api.indices, api.ids)
    assert all(i.startswith("pool/q") for i in api.ids)  # both files use q0..: each gets its file's name
    subset = read_jsonl(folder / "subset.jsonl")
    assert {r["source"] for r in subset} == {"pool"} and [r["id"] for r in subset] == api.ids
    # Files of one name in two folders: the role names then tell them apart, source and prefix alike.
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    same = [write_jsonl(tmp_path / d / "train.jsonl", rows(6)) for d in ("a", "b")]
    stage = build_stage(compose_config(["stage=file_continual", f"stage.pool={same[0]}",
                                        f"stage.existing={same[1]}"]).stage, 0, evaluates=False)
    assert [(r["id"], r["source"]) for r in stage.existing[:1]] == [("existing/q0", "existing")]
    assert [(r["id"], r["source"]) for r in stage.pool[:1]] == [("pool/q0", "pool")]


def test_a_shipped_stage_keeps_its_ids():
    stage = build_stage(compose_config(["stage=instruction"]).stage, 0)
    assert all(r["id"].startswith(f"{r['source']}/") for role in ("pool", "eval") for r in getattr(stage, role))


# -- over-long records ---------------------------------------------------------------------------------

SELECTORS = sorted(p.stem for p in (Path(CONF_DIR) / "selector").glob("*.yaml"))
# Where each selector fits records into a length: the key its warning names.
LENGTH_KEYS = {"delift": "kernel.max_length", "delift_exclude_global": "kernel.max_length",
               "delift_exclude_row": "kernel.max_length", "delift_include_global": "kernel.max_length",
               "delift_reference": "kernel.max_length", "selectit": "selector.max_length",
               "rds": "selector.max_length", "less": "train.optim.max_length",
               "less_paper": "selector.optim.max_length"}  # LESS's own (the published 2048) over train.optim's


# Selectors that need target examples (their queries) select on the task stage, the rest on the plain one.
TARGETED = ("rds", "less", "less_paper")


@pytest.mark.parametrize("selector", SELECTORS)
def test_an_over_long_record_warns_and_runs_under_every_selector(selector, tmp_path, caplog):
    pool = write_jsonl(tmp_path / "pool.jsonl", rows(12, long=3))
    task = write_jsonl(tmp_path / "task.jsonl", [dict(r, input="Task: " + r["input"]) for r in rows(3, "t")])
    stage = ["stage=file_task", f"stage.target={task}"] if selector in TARGETED else ["stage=file"]
    options = [] if selector in ("full", "initial") else ["selector.fraction=0.5"]
    if selector == "less_paper":  # its 32-example optimizer steps on a 1-example warm-up would never step
        options.append("selector.optim.grad_accum=1")
    cfg = compose_config(["task=select", *stage, f"stage.pool={pool}", f"selector={selector}", *options, "logger=none",
                          "trainer.max_steps=2", *TINY],
                         output_dir=tmp_path / "job", cache_dir=isolated_cache(tmp_path))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        results = run(cfg)
    assert results["n_pool"] == 12 and (tmp_path / "job" / "selection.json").is_file()
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    about = [line for line in said if "max_length" in line]
    if selector in LENGTH_KEYS:
        key = LENGTH_KEYS[selector]
        assert len(about) == 1 and f"{key}=" in about[0] and f"raise {key}" in about[0], said
        assert "prompts" in about[0] and ("1 of the 12 records" in about[0] or "1 of 12 records" in about[0])
    else:  # nothing of the records is cut: nothing to say
        assert about == []


def test_a_response_too_long_alone_is_an_error_naming_the_key(tmp_path):
    records = rows(8)
    records[5]["output"] = "a long answer " * 20  # 60 tokens: more than kernel.max_length alone
    pool = write_jsonl(tmp_path / "pool.jsonl", records)
    cfg = compose_config(["task=select", "stage=file", f"stage.pool={pool}", "kernel.max_length=48",
                          "logger=none", *TINY], output_dir=tmp_path / "job", cache_dir=isolated_cache(tmp_path))
    with pytest.raises(DeliftInputError, match=r"record q5, field 'output'.*exceeds kernel\.max_length=48.*raise "
                                               r"kernel\.max_length"):
        run(cfg)


# -- typos, failures, permissions ----------------------------------------------------------------------


@pytest.mark.parametrize("override,line", [
    ("selector.fracton=0.2", "delift: error: field 'selector.fracton': unknown key; did you mean `selector.fraction`?"),
    ("selector=delfit", "delift: error: field 'selector': 'delfit' is not an option of selector; did you mean "
                        "`selector=delift`?"),
    ("kernel.ann.nprob=3", "delift: error: field 'kernel.ann.nprob': unknown key; did you mean `kernel.ann.nprobe`?"),
    ("selectr=random", "delift: error: field 'selectr': unknown key; did you mean `selector`?"),
    ("+experiment=evidence_instrction", "delift: error: field 'experiment': 'evidence_instrction' is not an option "
                                        "of experiment; did you mean `+experiment=evidence_instruction`?"),
    ("dataset=file", "delift: error: field 'dataset': there is no top-level dataset"),
    ("stage=fiel", "delift: error: field 'stage': 'fiel' is not an option of stage; did you mean `stage=file`?"),
])
def test_typos_exit_2_with_one_line_naming_the_closest_valid_name(override, line, tmp_path, monkeypatch):
    result = run_cli([override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, monkeypatch)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(line), result.stderr
    assert "+selector" not in result.stderr and "To append" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_typos_exit_2_through_run_py(tmp_path):
    """The process contract, once: `python run.py` with a misspelt key, then a misspelt group option."""
    for override, closest in (("selector.fracton=0.2", "`selector.fraction`"),
                              ("selector=delfit", "`selector=delift`")):
        proc = run_py([override], cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-2000:]
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("delift: error: ") and f"did you mean {closest}?" in line


def test_an_added_key_that_is_misspelt_names_the_closest_one():
    with pytest.raises(DeliftInputError, match=r"did you mean `selector\.fraction`\?"):
        validate(compose_config(["+selector.fractoin=0.2"]))


def test_a_failed_job_leaves_its_error_in_its_folder_and_its_wandb_run(tmp_path, monkeypatch,
                                                                       offline_wandb):  # noqa: F811
    folder, result = cli(tmp_path, monkeypatch, isolated_cache(tmp_path), "task=select", "stage=file",
                         f"stage.pool={tmp_path / 'missing.jsonl'}", "logger=wandb", *TINY, code=2)
    error = f"delift: error: file {tmp_path / 'missing.jsonl'}: does not exist"
    assert result.stderr.strip().splitlines() == [error]
    assert result.stdout.strip().splitlines()[-1].startswith("run folder: run (failed, exit status 2")
    assert (folder / "FAILED").read_text().splitlines() == ["exit status 2", error]
    assert error in (folder / "cli.log").read_text()
    assert not (folder / "results.json").exists()
    assert OfflineRun.of(folder).exit_code == 2  # the W&B run ends as the command does


def test_a_crash_exits_1_with_its_traceback_and_leaves_the_error(tmp_path, monkeypatch, data_file):
    def broken(*args, **kwargs):
        raise RuntimeError("fine-tuning broke")

    cache = isolated_cache(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(delift.pipeline, "finetune", broken)
        folder, result = cli(tmp_path, monkeypatch, cache, "stage=file", f"stage.pool={data_file}",
                             "selector=random", "logger=none", *TINY, code=1)
    assert "Traceback" in result.stderr and "RuntimeError: fine-tuning broke" in result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("run folder: run (failed, exit status 1")
    assert (folder / "FAILED").read_text().splitlines()[1] == "delift: error: RuntimeError: fine-tuning broke"
    assert "RuntimeError: fine-tuning broke" in (folder / "cli.log").read_text()
    # A later successful run in the folder is not taken for a failed one.
    cli(tmp_path, monkeypatch, cache, "task=select", "stage=file", f"stage.pool={data_file}", "selector=random",
        "logger=none", *TINY)
    assert not (folder / "FAILED").exists() and (folder / "results.json").is_file()


def test_outputs_are_readable_by_others_under_umask_022(data_file, tmp_path, monkeypatch):
    previous = os.umask(0o022)
    try:
        folder, _ = cli(tmp_path, monkeypatch, isolated_cache(tmp_path), "task=select", "stage=file",
                        f"stage.pool={data_file}", "selector=random", "logger=none", *TINY)
    finally:
        os.umask(previous)
    outputs = [folder / name for name in ("results.json", "selection.json", "subset.jsonl", "subset_chat.jsonl")]
    outputs += [folder / "subset_hf", *(folder / "subset_hf").iterdir()]
    for path in outputs:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{path.name}: {oct(mode)}"
        assert not path.is_dir() or mode & 0o011 == 0o011, f"{path.name}: {oct(mode)}"


# -- the Python API is quiet; help; W&B names ----------------------------------------------------------


def test_the_python_api_prints_no_tips_or_deprecations(data_file, tmp_path, capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selection = delift.select(data_file, "delift", 0.3, model="tiny_qwen2", progress=False,
                                  overrides=[f"paths.cache_dir={isolated_cache(tmp_path)}", "kernel.batch_size=8"])
    assert len(selection.ids) == 8
    printed = capfd.readouterr()
    noise = ("Tip:", "litlogger", "deprecated", "GPU available", "TPU available", "FutureWarning")
    assert not [w for w in caught if "deprecated" in str(w.message) or issubclass(w.category, FutureWarning)]
    assert not [line for line in (printed.out + printed.err).splitlines() if any(n in line for n in noise)]


def test_help_starts_with_what_delift_does_then_the_groups(tmp_path, monkeypatch):
    result = run_cli(["--help"], tmp_path, monkeypatch)
    assert result.returncode == 0
    text = result.stdout
    assert text.startswith("delift chooses which examples to fine-tune an LLM on")
    commands = text[text.index("Common commands:"):]
    assert commands.splitlines()[1].strip() == ("delift task=select stage=file stage.pool=data.jsonl selector=delift "
                                                "selector.fraction=0.3")
    assert text.index("Tasks (task=...)") < text.index("Docs") < text.index("== Configuration groups")
    assert "+dataset@stage.roles.pool.NAME=OPTION" in text and "\nselector: deft_ucs, delift" in text
    assert "stage: continual, file, file_continual, file_task" in text


def test_wandb_metric_names_have_no_doubled_segments_and_the_run_names_its_data(data_file):
    report = {"kernel": {"exact_pairs": 4, "proxy": {"mse": 0.1}}, "query_kernel": {"exact_pairs": 2},
              "private_kernel": {"all_pairs": 6}}
    assert kernel_metrics(report) == {"kernel/exact_pairs": 4, "kernel/proxy_mse": 0.1,
                                      "kernel/query/exact_pairs": 2, "kernel/private/all_pairs": 6}
    assert "data:mydata" in run_tags(compose_config(["stage=file", f"stage.pool={data_file}"]))
    assert "data:trivia+mmlu+gsm8k" in run_tags(compose_config(["stage=instruction"]))


# -- the dry run's estimate against a real kernel ------------------------------------------------------


@pytest.mark.benchmark  # a wall-clock ratio (minutes of SmolLM2 kernel): make test ARGS='-m benchmark'
def test_the_dry_run_estimate_is_within_2x_of_the_real_kernel_time(tmp_path):
    """On the default pool (stage=instruction: 28 records) and model (SmolLM2): the plan's estimate
    against task=kernel's measured `kernel` time (model load included in both), a fresh kernel cache."""
    cache = isolated_cache(tmp_path)
    plan = run(compose_config(["task=kernel", "kernel.dry_run=true", "logger=none", "progress=false"],
                              output_dir=tmp_path / "plan", cache_dir=cache))
    real = run(compose_config(["task=kernel", "logger=none", "progress=false"], output_dir=tmp_path / "real",
                              cache_dir=cache))
    ratio = plan["estimated_seconds"] / real["timings"]["kernel"]
    print(f"estimated {plan['estimated_seconds']} s, real {real['timings']['kernel']} s, ratio {ratio:.2f}; "
          f"{plan['plan_lines']}")
    assert 0.5 <= ratio <= 2, (plan["plan_lines"], real["timings"])


def test_sentence_embeddings_of_over_long_records_keep_the_response(tmp_path):
    from delift.embeddings import Embedder

    embedder = Embedder("all-MiniLM-L6-v2", packaged=True, cache_dir=str(tmp_path / "cache"))
    long = make_record("long", "Answer.", "filler words " * 400, "the final answer is forty two", source="s")
    short = make_record("short", "Answer.", "What is six times seven?", "forty two", source="s")
    with pytest.warns(UserWarning, match="1 record.*prompt is cut from the start and the response kept"):
        texts = embedder.record_texts([long, short])
    assert texts[0].endswith("the final answer is forty two") and not texts[0].startswith("answer")
    assert len(embedder.model.tokenizer(texts[0], add_special_tokens=False)["input_ids"]) <= \
        embedder.model.max_seq_length - 2
    assert texts[1] == "Answer.\nWhat is six times seven?\nforty two"
