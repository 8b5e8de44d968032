"""The documentation stays true: the worked example of docs/adding_a_selector.md runs and selects
what the page says, and no tracked file points outside the repository.

The example's three files are read from the page (a line "`path`:" followed by a fenced block).
The module is executed as the module its path names, without writing into delift/; the YAML goes
to a temporary config folder that Hydra's search path adds; the page's own test functions run
with that search path added to every composed config.
"""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hydra.utils import instantiate

import delift.selectors
from delift.selectors import SELECTORS, SelectionContext
from tests.helpers import ROOT, compose_config

PAGE = ROOT / "docs" / "adding_a_selector.md"
MODULE_PATH = "delift/selectors/longest_words.py"
YAML_PATH = "delift/conf/selector/longest_words.yaml"
TEST_PATH = "tests/test_longest_words.py"

# "`path`:", a blank line, then a fenced block.
FILE_BLOCK = re.compile(r"^`(?P<path>[^`\n]+)`:\n\n```(?P<lang>\w+)\n(?P<code>.*?)^```", re.M | re.S)
# A row of the page's table: | `Constructor(keywords)` | `[indices]` |
CLAIM_ROW = re.compile(r"^\| `(?P<call>\w+\([^`]*\))` \| `(?P<indices>\[[\d, ]*\])` \|$", re.M)

# Spelt in pieces so that this file does not match its own check.
FORBIDDEN = ("../" + "shared", "DESIGN" + ".md")


def page_files() -> dict[str, str]:
    return {m["path"]: m["code"] for m in FILE_BLOCK.finditer(PAGE.read_text(encoding="utf-8"))}


def page_claims() -> list[tuple[str, list[int]]]:
    return [(m["call"], ast.literal_eval(m["indices"])) for m in CLAIM_ROW.finditer(PAGE.read_text(encoding="utf-8"))]


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The page's selector module (importable under its documented name), a config folder holding
    its YAML, and the page's test module; the registry is restored afterwards."""
    files = page_files()
    saved = dict(SELECTORS)
    name = module_name(MODULE_PATH)
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / MODULE_PATH)
    monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(delift.selectors, name.rsplit(".", 1)[1], module, raising=False)
    exec(compile(files[MODULE_PATH], MODULE_PATH, "exec"), module.__dict__)

    conf = tmp_path / "conf"
    yaml_file = conf / Path(YAML_PATH).relative_to("delift/conf")
    yaml_file.parent.mkdir(parents=True)
    yaml_file.write_text(files[YAML_PATH], encoding="utf-8")
    search_path = f"hydra.searchpath=[file://{conf}]"

    page_test = {"__name__": module_name(TEST_PATH), "__file__": str(ROOT / TEST_PATH)}
    exec(compile(files[TEST_PATH], TEST_PATH, "exec"), page_test)
    try:
        yield types.SimpleNamespace(module=module, search_path=search_path, page_test=page_test)
    finally:
        SELECTORS.clear()
        SELECTORS.update(saved)


def test_page_holds_the_worked_example():
    files = page_files()
    assert set(files) == {MODULE_PATH, YAML_PATH, TEST_PATH}
    assert len(page_claims()) >= 3


def test_selects_what_the_page_says(example, tmp_path):
    """Each row of the page's table, built directly and from the page's YAML with the same keywords."""
    pool = example.page_test["pool"]()
    ctx = SelectionContext(stage="instruction", pool=pool)
    for call, expected in page_claims():
        direct = eval(call, vars(example.module))  # noqa: S307 - the page's own constructor call
        assert direct.select(ctx).indices == expected, call
        keywords = {k.arg: ast.literal_eval(k.value) for k in ast.parse(call, mode="eval").body.keywords}
        overrides = [f"selector.{key}={value}" for key, value in keywords.items()]
        cfg = compose_config([example.search_path, "selector=longest_words", *overrides], output_dir=tmp_path)
        built = instantiate(cfg.selector)
        assert type(built) is type(direct) and built.config() == direct.config(), call
        assert built.select(ctx).indices == expected, call


def test_yaml_defaults_match_the_class(example, tmp_path):
    cfg = compose_config([example.search_path, "selector=longest_words"], output_dir=tmp_path)
    built = instantiate(cfg.selector)
    defaults = {k: p.default for k, p in inspect.signature(type(built)).parameters.items()}
    assert built.name == "longest_words" and SELECTORS["longest_words"] is type(built)
    assert {k: v for k, v in built.config().items() if k != "name"} == defaults


def test_the_pages_test_passes(example, tmp_path):
    """The page's test functions, with the temporary YAML on Hydra's search path."""
    page_test = example.page_test
    page_test["compose_config"] = lambda overrides=(), **kw: compose_config([example.search_path, *overrides], **kw)
    tests = {k: f for k, f in page_test.items() if k.startswith("test_") and callable(f)}
    assert len(tests) >= 3
    for name, test in tests.items():
        arguments = {}
        if "tmp_path" in inspect.signature(test).parameters:
            arguments["tmp_path"] = tmp_path / name
            arguments["tmp_path"].mkdir()
        test(**arguments)


def tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {word}" for word in FORBIDDEN if word in text]
    assert not offenders, offenders
