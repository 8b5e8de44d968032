"""Bad input through the real entry point: one error line naming file/record/field, exit 2, no traceback.

The command (delift.cli.main, what run.py runs) is called in-process (`run_cli`); one case goes through
`python run.py` to show the same holds for the process: its exit status and its stderr."""

import json

import pytest

from tests.helpers import run_cli, run_py

GOOD = [{"id": f"r{i}", "instruction": "Answer.", "input": f"What is {i} + {i}?", "output": str(2 * i)}
        for i in range(40)]


def _pool_args(path):
    # The instruction stage with the user's file as its only pool source.
    return ["task=select", "selector=random", "progress=false", "~dataset@stage.roles.pool.trivia",
            "~stage.sizes.pool.trivia",
            "~dataset@stage.roles.pool.mmlu", "~stage.sizes.pool.mmlu", "~dataset@stage.roles.pool.gsm8k",
            "~stage.sizes.pool.gsm8k", "+dataset@stage.roles.pool.mine=file", f"stage.roles.pool.mine.path={path}"]


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("delift: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


BAD_FILES = {
    "malformed_line": ([json.dumps(r) for r in GOOD[:3]] + ['{"id": "r3", "output": '], ["line 4"]),
    "missing_output": ([json.dumps(r) for r in GOOD[:2]] + [json.dumps({"id": "x9", "input": "q"})],
                       ["x9", "output"]),
    "empty_pool": ([], ["pool"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_file(case, tmp_path, monkeypatch):
    lines, needles = BAD_FILES[case]
    path = _write(tmp_path / f"{case}.jsonl", lines)
    proc = run_cli(_pool_args(path) + [f"paths.log_dir={tmp_path}"], tmp_path, monkeypatch)
    _assert_one_line_error(proc, *needles)
    if case != "empty_pool":
        assert str(path) in proc.stderr


def test_bad_data_file_through_run_py_exits_2_with_one_error_line(tmp_path):
    """The process contract, once: exit status 2, one `delift: error:` line naming the file and line, no traceback."""
    lines, needles = BAD_FILES["malformed_line"]
    path = _write(tmp_path / "malformed.jsonl", lines)
    proc = run_py(_pool_args(path) + [f"paths.log_dir={tmp_path}"], cwd=tmp_path)
    _assert_one_line_error(proc, str(path), *needles)
    assert not list(tmp_path.rglob("selection.json"))


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_bad_budget(fraction, tmp_path, monkeypatch):
    path = _write(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD])
    proc = run_cli(_pool_args(path) + [f"selector.fraction={fraction}", f"paths.log_dir={tmp_path}"], tmp_path,
                   monkeypatch)
    _assert_one_line_error(proc, "selector.fraction")


@pytest.mark.parametrize("override,needle", [("model=no_such_model", "model"),
                                             ("dataset@stage.roles.pool.trivia=no_such_data", "no_such_data")])
def test_unknown_names(override, needle, tmp_path, monkeypatch):
    proc = run_cli([override, "task=select", f"paths.log_dir={tmp_path}"], tmp_path, monkeypatch)
    _assert_one_line_error(proc, needle)


def test_missing_model_path(tmp_path, monkeypatch):
    proc = run_cli(["model=phi3", f"model.name={tmp_path}/nowhere", "selector=initial", "logger=csv",
                    f"paths.log_dir={tmp_path}"], tmp_path, monkeypatch)
    _assert_one_line_error(proc, "nowhere", "model.name")


def test_earlier_run_directory_untouched(tmp_path, monkeypatch):
    good = _write(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD])
    assert run_cli(_pool_args(good) + [f"paths.log_dir={tmp_path}"], tmp_path, monkeypatch).returncode == 0
    (earlier,) = [p for p in (tmp_path / "runs").glob("*/*")]
    # lstat: W&B links logs/debug-core.log to its service's log elsewhere, which is not the run directory.
    before = {p: p.lstat().st_mtime_ns for p in earlier.rglob("*")}
    bad = _write(tmp_path / "bad.jsonl", ["not json"])
    _assert_one_line_error(run_cli(_pool_args(bad) + [f"paths.log_dir={tmp_path}"], tmp_path, monkeypatch),
                           "line 1")
    assert {p: p.lstat().st_mtime_ns for p in earlier.rglob("*")} == before


# In-process: the same DeliftInputError run.py turns into its one error line (see the tests above).
def _expect_error(tmp_path, overrides, *needles):
    from delift.errors import DeliftInputError
    from delift.pipeline import run
    from tests.helpers import compose_config

    cfg = compose_config(overrides, output_dir=tmp_path / "run")
    with pytest.raises(DeliftInputError) as caught:
        run(cfg)
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)
    assert not (tmp_path / "run" / "results.json").exists()
    assert not (tmp_path / "run" / "selection.json").exists()


IN_PROCESS_FILES = {
    "invalid_utf8": (b'{"id": "a", "input": "q", "output": "\xff\xfe"}\n', ["line 1", "UTF-8"]),
    "non_string_field": (json.dumps({"id": "n1", "input": "q", "output": 42}).encode() + b"\n", ["n1", "output"]),
    "empty_instruction_and_output": (json.dumps({"id": "e1", "instruction": "", "input": "q", "output": ""})
                                     .encode() + b"\n", ["e1", "output"]),
    "duplicate_ids": ((json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[0]) + "\n").encode(), ["r0", "duplicate"]),
}


@pytest.mark.parametrize("case", sorted(IN_PROCESS_FILES))
def test_bad_records(case, tmp_path):
    content, needles = IN_PROCESS_FILES[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(content)
    _expect_error(tmp_path, _pool_args(path), str(path), *needles)


def test_budget_that_rounds_to_zero_or_reaches_the_pool(tmp_path):
    path = _write(tmp_path / "good.jsonl", [json.dumps(r) for r in GOOD])
    _expect_error(tmp_path, _pool_args(path) + ["selector.fraction=0.01"], "rounds to 0")
    _expect_error(tmp_path, _pool_args(path) + ["selector.fraction=1.0"], "selector=full")


def test_target_larger_than_pool(tmp_path):
    _expect_error(tmp_path, ["stage=task", "stage.sizes.pool.trivia=3", "stage.sizes.pool.gsm8k=2", "task=select"],
                  "larger than the pool", "stage.sizes.target")


def test_empty_target(tmp_path):
    _expect_error(tmp_path, ["stage=task", "stage.sizes.target.mmlu=24", "task=select"], "target")


@pytest.mark.parametrize("override", ["selector=no_such_selector", "stage=no_such_stage"])
def test_unknown_selector_or_stage(override, tmp_path, monkeypatch):
    proc = run_cli([override, "task=select", f"paths.log_dir={tmp_path}"], tmp_path, monkeypatch)
    _assert_one_line_error(proc, override.split("=")[1])


def test_record_far_longer_than_the_context_is_truncated_not_fatal(tmp_path):
    rows = [dict(r) for r in GOOD]
    rows[0]["input"] = "a very long question " * 2000  # ~8k tokens against max_length 256
    path = _write(tmp_path / "long.jsonl", [json.dumps(r) for r in rows])
    cfg_args = [a for a in _pool_args(path) if a != "selector=random"] + ["model=tiny_qwen2", "selector=full",
                                                                          "trainer.max_steps=1",
                                   "eval.max_new_tokens=2", "logger=csv"]
    from delift.pipeline import run
    from tests.helpers import compose_config

    results = run(compose_config([a for a in cfg_args if a != "task=select"], output_dir=tmp_path / "run"))
    assert results["n_selected"] == results["n_pool"]
