"""Every option of every config group composes, fits the schema, and instantiates where it is a _target_."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from delift.config import validate
from delift.schema import check_target
from tests.helpers import CONF_DIR, compose_config

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name not in {"hydra", "experiment"})
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((Path(CONF_DIR) / group).glob("*.yaml"))]


# Options with keys the user must give (??? in their YAML), given here.
MANDATORY = {("stage", "file"): ["stage.pool=x.jsonl"],
             ("stage", "file_task"): ["stage.pool=x.jsonl", "stage.target=y.jsonl"],
             ("stage", "file_continual"): ["stage.pool=x.jsonl", "stage.existing=y.jsonl"]}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(group, option, tmp_path):
    if group == "dataset":
        cfg = compose_config([f"+dataset@probe={option}"], output_dir=tmp_path)
        node = cfg.probe
    else:
        cfg = compose_config([f"{group}={option}", *MANDATORY.get((group, option), [])], output_dir=tmp_path)
        node = cfg[group]
    resolved = OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
    assert resolved or option == "none", f"{group}={option} is empty"
    if group == "dataset":
        check_target("probe", resolved)
    else:
        validate(cfg)


EXPERIMENTS = sorted(f.stem for f in (Path(CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_preset_composes(name, tmp_path):
    cfg = compose_config([f"+experiment={name}"], output_dir=tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["experiment_name"] == name
    assert resolved["stage"]["roles"]["pool"], name
    validate(cfg)


def _refuse_to_load(monkeypatch):
    """Every way a spec could read weights or a tokenizer raises here."""
    import safetensors.torch
    import sentence_transformers
    import torch
    import transformers

    def loads(*args, **kwargs):
        raise AssertionError("instantiating a spec loaded weights or a tokenizer")

    for owner, name in [(transformers.AutoModelForCausalLM, "from_pretrained"),
                        (transformers.AutoModelForCausalLM, "from_config"),
                        (transformers.AutoTokenizer, "from_pretrained"),
                        (transformers.PreTrainedModel, "from_pretrained"),
                        (transformers.PreTrainedTokenizerBase, "from_pretrained"),
                        (sentence_transformers.SentenceTransformer, "__init__"), (safetensors.torch, "load_file"),
                        (torch, "load")]:
        monkeypatch.setattr(owner, name, loads)


@pytest.mark.parametrize("group", ["model", "selector", "embedder", "logger", "judge"])
def test_targets_instantiate_without_loading(group, tmp_path, monkeypatch):
    # Specs are lazy: instantiating one loads no weights (every loader raises here) and needs no network.
    from hydra.utils import get_class

    _refuse_to_load(monkeypatch)
    targets = 0
    for f in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
        cfg = compose_config([f"{group}={f.stem}"], output_dir=tmp_path)
        built = instantiate(cfg[group])
        if cfg[group] and "_target_" in cfg[group]:
            assert type(built) is get_class(cfg[group]._target_), f.stem
            targets += 1
    assert targets >= 2


def test_defaults_are_offline(tmp_path):
    cfg = compose_config([], output_dir=tmp_path)
    assert cfg.model._target_.endswith("PackagedGGUFModel")
    assert cfg.embedder.packaged is True
    assert cfg.logger.mode == "offline"
    assert cfg.model.get("trust_remote_code", False) is False
    for f in (Path(CONF_DIR) / "model").glob("*.yaml"):
        assert OmegaConf.load(f).get("trust_remote_code", False) is False, f


@pytest.mark.parametrize("env_cache", [None, "/elsewhere/delift-cache"])
def test_scripts_default_cache_dir_is_the_configs(env_cache, monkeypatch):
    from delift.cache import default_cache_dir

    monkeypatch.setenv("HOME", "/home/someone")
    if env_cache is None:
        monkeypatch.delenv("DELIFT_CACHE_DIR", raising=False)
    else:
        monkeypatch.setenv("DELIFT_CACHE_DIR", env_cache)
    configured = OmegaConf.load(Path(CONF_DIR) / "paths" / "default.yaml").cache_dir
    assert default_cache_dir() == Path(configured) == Path(env_cache or "/home/someone/.cache/delift")


def test_a_cache_dir_under_home_is_expanded(tmp_path, monkeypatch):
    from delift.cache import cache_folder

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    folder = cache_folder("~/delift-cache", "utility_kernel", "abc")
    assert folder == tmp_path / "home" / "delift-cache" / "utility_kernel" / "abc" and folder.is_dir()
    assert not (tmp_path / "~").exists()
