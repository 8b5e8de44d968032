"""The job's experiment run: started with the job, fed as the job goes, closed once.

`start_tracker` instantiates the configured Lightning logger (W&B by default, offline; CSV; none
with `~logger`) right after the run folder exists, for every task, so kernel and selection
timings and a failure land in the run too, not only fine-tuning's. The W&B specifics live here:
the run's name and tags, its artifacts (the selection, the kernel, the adapter) and the plots as
images. Plots are PNG files in the run folder whatever the logger; with the CSV logger or none,
those files are all there is.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from delift.cache import save_npy
from delift.plots import plot_gains, plot_kernel, plot_source_mix
from delift.utility.tiles import CACHE_KIND

TAG_MAX = 64  # W&B's limit on a tag's length
# A dense kernel up to this many entries (16 MB of float32) travels inside its artifact; a larger
# or sparse one is referenced in the kernel cache, whose tiles can run to gigabytes.
KERNEL_FILE_MAX = 4_000_000


def stage_and_selector(cfg: DictConfig) -> tuple[str, str]:
    """The stage's and the selector's names as the pipeline reports them, known before either is built."""
    selector = get_class(cfg.selector._target_)
    return cfg.stage.get("name") or "stage", getattr(selector, "name", selector.__name__)


def run_name(cfg: DictConfig) -> str:
    stage, selector = stage_and_selector(cfg)
    return f"{stage}-{selector}-seed{cfg.seed}"


def data_name(cfg: DictConfig) -> str:
    """The data's name: your pool file's (its stem) with the file stages, else the pool's sources."""
    path = OmegaConf.select(cfg, "stage.pool", default=None, throw_on_missing=False)
    if isinstance(path, str) and path not in ("", "???"):
        return Path(path).stem
    return "+".join(OmegaConf.select(cfg, "stage.roles.pool", default=None) or {})


def run_tags(cfg: DictConfig) -> list[str]:
    """key:value tags to filter runs by; the kernel engine only where the selector reads the utility kernel."""
    from delift.selectors.delift import DeliftSelector

    stage, selector = stage_and_selector(cfg)
    tags = {"stage": stage, "selector": selector, "model": cfg.model.get("name"), "data": data_name(cfg),
            "experiment": cfg.get("experiment_name")}
    if issubclass(get_class(cfg.selector._target_), DeliftSelector):
        tags["engine"] = cfg.kernel.get("engine")
    return [f"{key}:{value}"[:TAG_MAX] for key, value in tags.items() if value not in (None, "")]


def start_tracker(cfg: DictConfig, output_dir: Path) -> Tracker:
    """The configured logger, its run started and given the config; the logger's `name` and `tags`,
    where its config leaves them null (W&B's), become `run_name` and `run_tags`: a value the user sets wins."""
    if not cfg.get("logger"):
        return Tracker(None, output_dir, cfg.paths.cache_dir)
    filled = {key: make(cfg) for key, make in (("name", run_name), ("tags", run_tags))
              if key in cfg.logger and cfg.logger[key] is None}
    logger = instantiate(cfg.logger, **filled, _convert_="all")  # W&B takes tags as a plain list
    # Lightning hands wandb.init `anonymous=None`, which W&B answers with a deprecation warning on every run.
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # a W&B run starts here
    return Tracker(logger, output_dir, cfg.paths.cache_dir)


def kernel_metrics(kernel_report: dict) -> dict:
    """Numbers of a selector's kernel report as flat logger metrics: kernel/<key> for the pool's kernel,
    kernel/<side>/<key> for the others (query_kernel: kernel/query/..., private_kernel: kernel/private/...)."""
    out = {}
    for name, details in kernel_report.items():
        prefix = "kernel/" if name == "kernel" else f"kernel/{name.removesuffix('_kernel')}/"
        for key, value in details.items():
            if key == "proxy":
                out |= {f"{prefix}proxy_{k}": v for k, v in value.items() if isinstance(v, (int, float))}
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{prefix}{key}"] = value
    return out


def selection_report_metrics(report: dict) -> dict:
    """A selection report's numbers as flat logger metrics: per source its subset share and ratio to
    the pool share, the response lengths' median and mean, the warnings' count and DELIFT's figures."""
    out = {"selection/under_represented_sources": len(report["warnings"])}
    for name, row in report["sources"].items():
        out |= {f"selection/source/{name}/subset_share": row["subset_share"],
                f"selection/source/{name}/ratio": row["ratio"]}
    for part, values in (report.get("response_tokens") or {}).items():
        if values:
            out |= {f"selection/response_tokens/{part}_{stat}": values[stat] for stat in ("p50", "mean")}
    for key in ("self_coverage_share", "diagonal_top_overlap"):
        out[f"selection/{key}"] = report.get(key)
    return {key: value for key, value in out.items() if value is not None}  # e.g. shares of an empty subset


def _artifact_name(kind: str, run_name: str) -> str:
    # W&B artifact names: letters, digits, dashes, underscores and dots, at most 128 characters.
    return re.sub(r"[^\w.-]+", "_", f"{kind}-{run_name}")[:128]


class Tracker:
    """The job's logger (None without one, `~logger`, and on DDP ranks other than 0, which pass no
    output_dir and write nothing) and the run folder its plots go to."""

    def __init__(self, logger=None, output_dir: Path | None = None, cache_dir=None):
        self.logger, self.output_dir, self.cache_dir = logger, output_dir, cache_dir

    @property
    def wandb_run(self):
        """The W&B run, or None with another logger or none."""
        from lightning.pytorch.loggers import WandbLogger

        return self.logger.experiment if isinstance(self.logger, WandbLogger) else None

    def log_timings(self, seconds_by_step: dict[str, float]) -> None:
        if self.logger:
            self.logger.log_metrics({f"time/{step}": seconds for step, seconds in seconds_by_step.items()})

    def log_selection(self, selection, stage, selector) -> None:
        """Sizes and kernel costs as metrics; plots of the kernels, of the picks' gains (or scores)
        and of the subset's source mix; with W&B, selection.json + subset.jsonl as a dataset artifact
        (write_selection has written them)."""
        report = selection.info.get("kernel_report") or {}
        metrics = {"selection/n_pool": len(stage.pool), "selection/n_selected": len(selection.indices)}
        if selection.objective_value is not None:
            metrics["selection/objective_value"] = selection.objective_value
        if self.logger:
            self.logger.log_metrics(metrics | kernel_metrics(report))
        title = f"{selector.name} ({stage.name})"
        plots = {}
        if selection.scores:
            # The kernel selectors' scores are the greedy's marginal gains; other selectors score records.
            gains = "objective" in selection.info
            name = "gains" if gains else "scores"
            plots[name] = plot_gains(selection.scores, self.output_dir / f"{name}.png", title=title,
                                     ylabel="marginal gain" if gains else "score")
        if selection.indices:
            plots["source_mix"] = plot_source_mix([stage.pool[i]["source"] for i in selection.indices],
                                                  [record["source"] for record in stage.pool],
                                                  self.output_dir / "source_mix.png", title=title)
        self._log_images(plots)
        if self.wandb_run is not None:
            import wandb

            artifact = wandb.Artifact(_artifact_name("selection", self.wandb_run.name), type="dataset",
                                      metadata=metrics | {"stage": stage.name, "selector": selector.name})
            for file in ("selection.json", "subset.jsonl"):
                artifact.add_file(str(self.output_dir / file), policy="immutable")  # final: no staging copy
            self.wandb_run.log_artifact(artifact)
        self.log_kernels(selection.kernels, report, title_prefix=selector.name, stage=stage.name)

    def log_selection_report(self, report: dict) -> None:
        """The selection report (delift.selection_report) as flat metrics and, where the logger has
        tables (W&B), its per-source rows, response-length quantiles and answer letters as tables."""
        if not self.logger:
            return
        self.logger.log_metrics(selection_report_metrics(report))
        if not hasattr(self.logger, "log_table"):
            return
        columns = ["source", "pool", "pool_share", "subset", "subset_share", "ratio"]
        rows = [[name, *(row[column] for column in columns[1:])] for name, row in report["sources"].items()]
        self.logger.log_table("selection/sources", columns=columns, data=rows)
        tokens = report.get("response_tokens")
        if tokens:
            stats = list(tokens["pool"])
            rows = [[part, *(values[stat] for stat in stats)] for part, values in tokens.items() if values]
            self.logger.log_table("selection/response_tokens", columns=["records", *stats], data=rows)
        letters = report.get("answer_letters")
        if letters:
            self.logger.log_table("selection/answer_letters", columns=["letter", "pool", "subset"],
                                  data=[[letter, count, letters["subset"][letter]]
                                        for letter, count in letters["pool"].items()])

    def log_kernels(self, kernels: dict, report: dict, *, title_prefix: str, stage: str) -> None:
        """Each kernel's plot (<name>.png); with W&B the plots as images and a kernel artifact: the
        plots, a small dense kernel's .npy, and otherwise a reference to the utility kernel cache."""
        plots = {name: plot_kernel(kernel, self.output_dir / f"{name}.png", title=f"{title_prefix} {name} ({stage})")
                 for name, kernel in kernels.items() if kernel is not None}
        self._log_images(plots)
        if self.wandb_run is None or not (plots or report):
            return
        import wandb

        shapes = {name: list(kernel.shape) for name, kernel in kernels.items() if kernel is not None}
        artifact = wandb.Artifact(_artifact_name("kernel", self.wandb_run.name), type="kernel",
                                  metadata={"stage": stage, "shapes": shapes, "report": report})
        for plot in plots.values():
            artifact.add_file(str(plot), policy="immutable")
        embedded = set()
        for name, kernel in kernels.items():
            if kernel is not None and not sp.issparse(kernel) and kernel.size <= KERNEL_FILE_MAX:
                save_npy(self.output_dir / f"{name}.npy", np.asarray(kernel))
                artifact.add_file(str(self.output_dir / f"{name}.npy"), policy="immutable")
                embedded.add(name)
        cache = Path(self.cache_dir).expanduser() / CACHE_KIND if self.cache_dir else None
        # Only utility kernels (those with a report) live in the cache; shards leave only tiles there.
        if set(report) - embedded and cache is not None and cache.is_dir():
            artifact.add_reference(cache.resolve().as_uri(), name="cache", checksum=False)  # by path: tiles are many
        self.wandb_run.log_artifact(artifact)

    def log_adapter(self, adapter_dir: Path) -> None:
        """The fine-tuned PEFT adapter as a model artifact (W&B only)."""
        if self.wandb_run is None:
            return
        import wandb

        artifact = wandb.Artifact(_artifact_name("adapter", self.wandb_run.name), type="model")
        artifact.add_dir(str(adapter_dir), policy="immutable")
        self.wandb_run.log_artifact(artifact)

    def log_evaluation(self, metrics_by_mode: dict, rows: list[dict]) -> None:
        """The evaluation's metrics and, where the logger has tables, the predictions."""
        if not self.logger:
            return
        self.logger.log_metrics({f"eval/{mode}/{k}": v for mode, metrics in metrics_by_mode.items()
                                 for k, v in metrics.items()})
        if hasattr(self.logger, "log_table"):
            columns = ["mode", "id", "prediction", "reference", "rouge1", "embed_sim"]
            self.logger.log_table("predictions", columns=columns, data=[[r[c] for c in columns] for r in rows])

    def close(self, failed: bool, exit_code: int | None = None) -> None:
        """Ends the run: a W&B run finishes with the job's exit status, `exit_code` (the command's: 2 for
        bad input, 1 for other failures; default 1 when failed, 0 otherwise), and is marked failed for any
        but 0; one W&B run per job, also inside a multirun."""
        if not self.logger:
            return
        code = (1 if failed else 0) if exit_code is None else exit_code
        self.logger.finalize("failed" if failed else "success")
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=code)

    def _log_images(self, plots: dict[str, Path]) -> None:
        if plots and self.wandb_run is not None:
            import wandb

            self.wandb_run.log({f"plots/{name}": wandb.Image(str(path)) for name, path in plots.items()})
