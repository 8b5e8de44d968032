"""The configuration's schema: what every key of the composed config may hold.

`validate(cfg)` runs right after Hydra composes the config, before any data or model loads, so a
misspelt value fails in seconds with one `delift: error:` line (exit 2). Groups built from a
`_target_` (model, embedder, selector, judge, logger, trainer, datasets) are checked against their
target's signature (delift.schema); the rest against the dataclasses below, which also generate
the configuration reference: `python -m delift.config > docs/configuration.md`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from delift.errors import DeliftInputError
from delift.export import ExportFormat
from delift.metrics import LengthNormalization, OptionFormat
from delift.objectives import Objective
from delift.schema import Pattern, Range, Target, check, check_fields, describe, field_key, target_parameters

CONF_DIR = Path(__file__).parent / "conf"

Positive = Annotated[int, Range(1)]
NonNegative = Annotated[int, Range(0)]
Fraction = Annotated[float, Range(0, 1, low_open=True)]  # (0, 1]
Share = Annotated[float, Range(0, 1, high_open=True)]  # [0, 1)
Role = Literal["pool", "target", "existing", "eval"]
# delift.utility.kernel and delift.training read these from here: importing them would load torch and Lightning.
Engine = Literal["naive", "fast", "knn", "proxy"]
Schedule = Literal["constant", "linear"]


def _help(text: str, default=dataclasses.MISSING, **extra):
    return field(default=default, metadata={"help": text, **extra})


@dataclass
class PathsConfig:
    root_dir: str = _help("outputs/ goes under this folder (DELIFT_ROOT, default the working directory)")
    log_dir: str = _help("run and multirun folders")
    output_dir: str = _help("this run's folder (Hydra's run or sweep subdir)")
    cache_dir: str = _help("converted models, kernels, embeddings, gradient features (DELIFT_CACHE_DIR)")


@dataclass
class HoldoutPart:
    source_role: Role = _help("the role it is carved out of", key="from")
    size: NonNegative = _help("how many records")


@dataclass
class StageConfig:
    name: str = _help("the stage's name (run names, tables)")
    objective: Objective = _help("DELIFT's objective for this stage: fl (instruction), flmi (task), flcg (continual)")
    roles: dict[Role, dict[str, Target]] = _help("per role, source name -> dataset config (delift/conf/dataset)")
    sizes: dict[Role, dict[str, NonNegative | None]] = _help("per role and source, a seeded sample of this many rows")
    holdout: dict[Role, HoldoutPart] = _help("parts carved out of a loaded role with the seed, in this order")
    pool_size: Positive | None = _help("after the holdouts, keep a seeded sample of this many pool records, each "
                                       "source its share (the evaluation set stays as it was; absent: all)")
    data_seed: NonNegative | None = _help("sample and hold out with this seed instead of the run's: the same pool "
                                          "and evaluation set for every seed of a grid (absent: the run's seed)")
    pool: str | None = _help("stage=file, file_task, file_continual: your data file to select from (JSONL, JSON, "
                             "CSV, Parquet, or a folder saved with datasets' save_to_disk); ids kept as they are")
    target: str | None = _help("stage=file_task: the file of examples of the task selection aims at (FLMI)")
    existing: str | None = _help("stage=file_continual: the file of data already learned (FLCG)")
    eval: str | None = _help("the file to evaluate on (task=run); task=select and task=kernel need none")
    holdout_eval: Annotated[float, Range(0, low_open=True)] | None = _help(
        "no stage.eval file: task=run holds out this share (< 1) or count of the pool (file_task: of the target) "
        "to evaluate on, and says so in the log; task=select and task=kernel keep every record (null: none)")
    columns: dict[Literal["instruction", "input", "output"], str] | None = _help(
        "the files' column names where they differ from ours, e.g. {input: question, output: answer}")


@dataclass
class AnnConfig:
    flat_max: Positive = _help("exact (flat) faiss search up to this many columns; an IVF index above")
    nlist: Positive | None = _help("IVF lists (null: 4 sqrt(n_cols))")
    nprobe: Positive = _help("IVF lists searched per query")


@dataclass
class ProxySample:
    rows: Annotated[float, Range(0, low_open=True)] = _help("rows scored exactly: a fraction (< 1) or a count")
    random: NonNegative = _help("plus this many random columns per sampled row")


@dataclass
class ProxyNetwork:
    features: Literal["product", "cosine", "concat"] = _help("the pair's input: [e_i, e_j, e_i*e_j, cos] | [cos...] | "
                                                             "NN-CIFT's [e_i, e_j]")
    hidden: Positive = _help("hidden width")
    layers: Positive = _help("hidden layers")
    dropout: Share = _help("dropout")
    lr: Annotated[float, Range(0, low_open=True)] = _help("Adam learning rate")
    weight_decay: Annotated[float, Range(0)] = _help("weight decay")
    batch_size: Positive = _help("pairs per step")
    max_epochs: Positive = _help("epochs at most")
    patience: Positive = _help("early stopping on the held-out MSE")
    holdout: Share = _help("share of the sampled rows held out (whole rows)")


@dataclass
class ProxyConfig:
    sample: ProxySample = _help("the exactly scored sample")
    network: ProxyNetwork = _help("the network that predicts the other candidate pairs")


@dataclass
class KernelConfig:
    engine: Engine = _help(
        "exact: fast | naive (the oracle, same numbers); approximate, sparse: knn | proxy")
    batch_size: Positive = _help("sequences per forward pass")
    max_length: Positive = _help("tokens per sequence (longer demonstrations are cut from the left)")
    tile_size: Positive = _help("rows x columns per tile: the unit of resuming and of sharding")
    dry_run: bool = _help("task=kernel: print the plan and a calibrated time estimate; compute nothing")
    shard: NonNegative | None = _help("task=kernel: this job's shard, 0 .. num_shards - 1")
    num_shards: Positive = _help("task=kernel: independent jobs sharing paths.cache_dir")
    seed: int = _help("the approximations' random columns, the proxy's sample and network")
    knn_k: Positive = _help("knn and proxy: each row's nearest columns in the candidate graph")
    knn_random: NonNegative = _help("plus this many seeded random columns per row")
    features: Literal["embedder", "model"] = _help("record vectors for the graph: the sentence embedder or the LLM's "
                                                   "mean-pooled hidden states")
    template: dict[Literal["prompt", "response", "zero_shot", "zero_shot_instruction", "one_shot",
                           "one_shot_instruction"], str] | None = _help(
        "overrides of the utility prompt templates (delift.utility.formatting.UtilityTemplate), e.g. "
        "+kernel.template.response=' {output}'")
    ann: AnnConfig = _help("faiss index")
    proxy: ProxyConfig = _help("engine=proxy")


@dataclass
class LoraConfig:
    r: Positive = _help("LoRA rank")
    alpha: Annotated[float, Range(0, low_open=True)] = _help("LoRA alpha")
    dropout: Share = _help("LoRA dropout")
    target_modules: str | list[str] = _help("all-linear or a list of module names")


@dataclass
class OptimConfig:
    lr: Annotated[float, Range(0, low_open=True)] = _help("AdamW learning rate")
    epochs: Positive = _help("epochs")
    batch_size: Positive = _help("examples per optimizer step (the global batch under DDP)")
    grad_accum: Positive = _help("micro-batches per optimizer step")
    max_length: Positive = _help("tokens per training sequence")
    weight_decay: Annotated[float, Range(0)] = _help("AdamW weight decay")
    schedule: Schedule = _help("learning-rate schedule (linear: decay to 0 at the last step)")
    warmup_ratio: Share = _help("linear warm-up over this share of the optimizer steps")


@dataclass
class TrainConfig:
    lora: LoraConfig = _help("the adapter")
    optim: OptimConfig = _help("the optimizer and schedule")
    use_chat_template: bool = _help("format records with the model's chat template")
    gradient_checkpointing: bool = _help("recompute activations in the backward pass (less memory, ~30 % slower)")
    checkpoint_every_n_steps: Positive | None = _help("resumable checkpoint cadence (null: every epoch)")
    mix_existing: bool = _help("continual stage: also train on the existing data")


@dataclass
class LikelihoodConfig:
    ref_loss: bool = _help("ref_loss: mean token negative log-likelihood of the reference (output + EOS) after the "
                           "prompt")
    options: bool = _help("multiple-choice records: ll_accuracy, the option of highest log-likelihood as the answer")
    option_format: OptionFormat = _help("the scored continuation: letter_text (B. text: what the prompt asks for, as "
                                        "the records' outputs) | letter (B; lm-evaluation-harness's MMLU) | text")
    normalize: LengthNormalization = _help("none: summed log-probs (lm-evaluation-harness's acc) | token: per token | "
                                     "char: per character (its acc_norm)")


@dataclass
class EvalConfig:
    mode: Literal["finetune", "icl", "both"] = _help("finetune: LoRA on the subset | icl: the nearest selected "
                                                     "examples in the prompt | both")
    icl_k: Positive = _help("demonstrations per query in ICL mode")
    max_new_tokens: Positive = _help("generated tokens per answer")
    batch_size: Positive = _help("prompts per generation batch")
    do_sample: bool = _help("sample instead of greedy decoding")
    rouge_stemmer: bool = _help("Porter stemming before ROUGE-1")
    likelihood: LikelihoodConfig = _help("teacher-forced scores of the same prompts")


@dataclass
class ExportConfig:
    formats: list[ExportFormat] = _help("the subset besides subset.jsonl: a Hugging Face dataset (subset_hf/, "
                                                 "load_from_disk) and chat JSONL (subset_chat.jsonl, TRL's messages)")
    push_to_hub: str | None = _help("a hub dataset repo to push the subset to (needs the hub and a token)")
    private: bool = _help("the pushed dataset is private")


@dataclass
class DeliftConfig:
    """The top level of delift/conf/config.yaml."""

    paths: PathsConfig = _help("folders")
    model: Target = _help("the LLM (delift/conf/model)")
    embedder: Target = _help("the sentence embedder (delift/conf/embedder)")
    stage: StageConfig = _help("which data plays which role (delift/conf/stage)")
    selector: Target = _help("the selection method (delift/conf/selector)")
    kernel: KernelConfig = _help("DELIFT's utility kernel (delift/conf/kernel)")
    train: TrainConfig = _help("fine-tuning (delift/conf/train)")
    trainer: Target = _help("the Lightning Trainer: any Trainer argument, callbacks and profiler as _target_ "
                            "nodes (delift/conf/trainer)")
    eval: EvalConfig = _help("evaluation (delift/conf/eval)")
    logger: Target | None = _help("a Lightning logger (delift/conf/logger), null for none")
    judge: Target | None = _help("the LLM judge (delift/conf/judge), null for none")
    export: ExportConfig = _help("the selected subset's exports (delift/conf/export)")
    task: Literal["run", "select", "kernel"] = _help(
        "run: the whole pipeline | select: selection.json + subset only | kernel: only the kernels")
    seed: NonNegative = _help("data splits, selection, training, random models")
    device: Annotated[str, Pattern(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:N")] = _help(
        "where every model runs: auto = CUDA when present")
    progress: bool = _help("progress bars on long steps")
    resume: bool = _help("continue fine-tuning from the run directory's last checkpoint")
    skip_done: bool = _help("skip a job whose run directory already holds results.json of this same config (up to "
                            "paths, logger, progress, resume) and return those results: continue a multirun with "
                            "hydra.sweep.dir=<its folder>")
    optimized_metric: str = _help("the metric a sweep's objective returns")
    experiment_name: str | None = _help("groups W&B runs and tables; presets name themselves")


def validate(cfg: DictConfig | dict) -> None:
    """Raise a DeliftInputError (key, value, what is allowed) unless `cfg` fits the schema."""
    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "config"
            reason = "must be set (it is ??? in the config)" if "Missing" in type(err).__name__ else str(err)
            raise DeliftInputError(reason.splitlines()[0], field=key) from err
    cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    check_fields("", cfg, DeliftConfig)


# -- the configuration reference -----------------------------------------------------------------


def compose_packaged(overrides=()) -> DictConfig:
    """The shipped config composed with `overrides`, outside a Hydra app (`${hydra:...}` left unresolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    GlobalHydra.instance().clear()
    return cfg


def _yaml_scalar(value) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return str(value).replace("'", "")  # lists as [hf, chat], as YAML writes them inline


def _rows(schema, defaults: dict, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(schema, include_extras=True)
    rows = []
    for f in dataclasses.fields(schema):
        key, annotation = field_key(f), hints[f.name]
        path = f"{prefix}{key}"
        if dataclasses.is_dataclass(annotation):
            rows += _rows(annotation, (defaults or {}).get(key) or {}, f"{path}.")
            continue
        value = (defaults or {}).get(key, dataclasses.MISSING)
        shown = "" if value is dataclasses.MISSING or isinstance(value, dict) else f"`{_yaml_scalar(value)}`"
        cells = (f"`{path}`", describe(annotation), shown, f.metadata["help"])
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return rows


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _target_rows(group: str) -> list[str]:
    """Each option of a `_target_` group: its target and its keys (the option's value; what delift's own
    targets allow)."""
    lines = []
    for option in _group_options(group):
        node = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), resolve=False)
        target = node.get("_target_")
        if target is None:  # an option that extends another (defaults list): shown by its base
            continue
        _, hints, _ = target_parameters(target)
        own = target.startswith("delift.")
        keys = [k for k in node if not k.startswith("_") and k != "defaults"]
        params = ", ".join(
            f"`{k}`" + ("" if isinstance(node[k], dict) else f" = `{_yaml_scalar(node[k])}`")
            + (f" ({describe(hints[k])})" if own and k in hints else "") for k in keys)
        lines.append(f"| `{group}={option}` | `{target}` | {params.replace('|', '/') or '-'} |")
    return lines


def reference_markdown() -> str:
    """docs/configuration.md: every key of the top level and of the groups without a `_target_`,
    and each option of the `_target_` groups with its parameters."""
    defaults = OmegaConf.to_container(compose_packaged(), resolve=False)
    out = ["# Configuration reference", "",
           "Generated from the schemas in `delift/config.py` (`python -m delift.config > docs/configuration.md`); "
           "a test keeps it current. Every value is checked before any data or model loads: a value outside "
           "what is listed here stops the run with one `delift: error:` line and exit status 2.", "",
           "Defaults are those of `delift/conf/config.yaml` (the instruction stage, SmolLM2, DELIFT).", "",
           "## Keys", "", "| key | allowed | default | meaning |", "|---|---|---|---|"]
    out += _rows(DeliftConfig, defaults)
    out += ["", "## Options of the `_target_` groups", "",
            "Each option's keys are checked against its target's signature: an unknown key is an error; for "
            "delift's own targets the types and ranges below are checked too.", "",
            "| option | target | keys = the option's value (allowed) |", "|---|---|---|"]
    for group in ("model", "embedder", "selector", "judge", "logger", "trainer", "dataset"):
        out += _target_rows(group)
    out += ["", "Other groups: " + "; ".join(f"`{g}`: {', '.join(_group_options(g))}"
                                           for g in ("stage", "kernel", "train", "eval", "experiment")), ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(reference_markdown(), end="")
