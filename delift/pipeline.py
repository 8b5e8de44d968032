"""The one pipeline: records -> (kernel) -> selection -> fine-tuning -> generation -> metrics -> logs.

`run(cfg)` is what `python run.py` calls with the composed Hydra config; each step lives in its
own module and is usable alone (see the README's Python API section).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from delift.cache import save_json, save_jsonl
from delift.data import build_stage
from delift.devices import is_global_zero
from delift.errors import DeliftInputError, exit_status
from delift.evaluation import evaluate
from delift.export import export_subset
from delift.icl import nearest_demonstrations
from delift.selection_report import log_lines, selection_report, source_table
from delift.selectors import SelectionContext
from delift.tracking import Tracker, start_tracker
from delift.training import finetune

log = logging.getLogger(__name__)

# Selection info that differs between runs of one config (seconds): results.json only.
RUN_DEPENDENT_INFO = ("timings", "kernel_report")
# Top-level keys that say where and how a job runs, not what it computes: `skip_done` finds a job
# done whatever they hold (another machine's folders, another logger, resume on or off).
NOT_RESULT_KEYS = ("paths", "logger", "progress", "resume", "skip_done")
# A failed job's marker in its run folder (written by delift.cli): the exit status and the error line.
FAILED_FILE = "FAILED"


@contextmanager
def _timed(timings: dict, name: str, tracker: Tracker):
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 2)
    tracker.log_timings({name: timings[name]})  # as each step ends: a job that dies later keeps them


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def selection_context(cfg: DictConfig, stage, output_dir: Path) -> SelectionContext:
    return SelectionContext(
        stage=stage.name, objective=stage.objective, pool=stage.pool, target=stage.target,
        existing=stage.existing, seed=cfg.seed,
        cache_dir=cfg.paths.cache_dir, output_dir=output_dir, model_spec=instantiate(cfg.model),
        embedder=instantiate(cfg.embedder), kernel_options=_container(cfg.kernel),
        train_options=_container(cfg.train), trainer_options=_container(cfg.trainer), progress=cfg.progress,
        device=cfg.get("device", "auto"),
    )


def write_selection(output_dir: Path, selection, selector, stage, budget: int | None, seed: int) -> None:
    save_json(output_dir / "selection.json", {
        "selector": selector.name, "selector_config": selector.config(), "stage": stage.name,
        "budget": budget, "n_pool": len(stage.pool), "seed": seed, "indices": selection.indices,
        "ids": [stage.pool[i]["id"] for i in selection.indices], "scores": selection.scores,
        "objective_value": selection.objective_value,
        # Timings and costs go to results.json: the same config must give a byte-identical selection.json.
        "info": {k: v for k, v in selection.info.items() if k not in RUN_DEPENDENT_INFO},
    })
    save_jsonl(output_dir / "subset.jsonl", [stage.pool[i] for i in selection.indices])


def report_selection(selection, selector, ctx: SelectionContext, tokenizer) -> dict:
    """The selection report (delift.selection_report); a kernel selector's objective read as it read it."""
    if not selection.kernels:
        return selection_report(ctx.pool, selection.indices, tokenizer)
    objective = selection.info["objective"]
    reading = selector.reading(ctx, objective, selection.kernels)
    reading.pop("self_utility")  # the self-coverage share reads every record's own entry, whatever the choice
    return selection_report(ctx.pool, selection.indices, tokenizer, kernels=selection.kernels, objective=objective,
                            eta=selector.eta, nu=selector.nu, **reading)


def report_tokenizer(ctx: SelectionContext, job_loads_model: bool):
    """The tokenizer the report counts response tokens with: the model's where the job loads it
    anyway (or a selector already has), else the model spec's tokenizer alone (no weights read); None
    (no lengths) where that load fails."""
    if job_loads_model or "model" in vars(ctx):  # `model` is a cached_property: in vars once loaded
        return ctx.model.tokenizer
    try:
        return ctx.model_spec.load_tokenizer()
    except (OSError, ImportError, DeliftInputError) as err:  # the report is no reason to fail a selection
        log.warning("Selection report without response lengths: cannot load the tokenizer (%s)", err)
        return None


def compute_kernels(selector, ctx: SelectionContext, output_dir: Path, timings: dict, tracker: Tracker,
                    dry_run: bool = False) -> dict:
    """`task=kernel`: compute (and cache) the kernels the selector's objective needs, and plot them;
    with `dry_run`, only plan them and estimate their time (plan.json); with `kernel.shard`, only
    that shard's tiles of each (results.json lists them per kernel). Under DDP rank 0 writes."""
    from delift.selectors.delift import DeliftSelector, KernelObjectiveSelector

    if not isinstance(selector, KernelObjectiveSelector):
        raise DeliftInputError(f"task=kernel needs a kernel selector (delift, delift_se), not {selector.name!r}",
                               field="selector")
    objective = selector.resolve_objective(ctx)
    if dry_run:
        if not isinstance(selector, DeliftSelector):
            raise DeliftInputError("kernel.dry_run plans the model's utility kernel: use selector=delift",
                                   field="kernel.dry_run")
        return plan_kernels(selector, ctx, objective, output_dir)
    with _timed(timings, "kernel", tracker):
        kernels, _, details = selector.kernels(ctx, objective)
    if not is_global_zero():  # under DDP every rank computed its share of the tiles; rank 0 writes
        return {"rank_zero": False}
    tracker.log_kernels(kernels, details, title_prefix=selector.name, stage=ctx.stage)
    summary = {}
    for name, kernel in kernels.items():
        if kernel is not None:
            summary[name] = kernel_summary(kernel) | ({"details": details[name]} if name in details else {})
        elif "shard" in details.get(name, {}):  # kernel.shard: its tiles are in the cache, no kernel to describe
            summary[name] = {"details": details[name]}
    results = {"stage": ctx.stage, "selector": selector.name, "objective": objective, "kernels": summary,
               "timings": timings}
    save_json(output_dir / "results.json", results)
    return results


def kernel_summary(kernel) -> dict:
    """Shape and value range; for a sparse kernel over its stored entries, with their count."""
    import scipy.sparse as sp

    sparse = sp.issparse(kernel)
    values = kernel.data if sparse else kernel
    summary = {"shape": list(kernel.shape)} | ({"sparse": True, "nnz": int(kernel.nnz)} if sparse else {})
    if values.size == 0:  # a sparse kernel that stores nothing
        return summary | {"min": 0.0, "max": 0.0, "mean": 0.0}
    return summary | {"min": float(values.min()), "max": float(values.max()), "mean": float(values.mean())}


def plan_kernels(selector, ctx: SelectionContext, objective: str, output_dir: Path) -> dict:
    """The dry run: each kernel's plan and a time estimate from its calibration on warm batches (the
    model, the tokenizer and a few batches; no embeddings, no kernel), and the whole job's estimate,
    model loading included: what task=kernel's `kernel` timing will measure."""
    from delift.utility.kernel import PLAN_OPTIONS, kernel_plan
    from delift.utility.plan import describe, estimate_seconds, format_seconds

    options = {k: v for k, v in ctx.kernel_options.items() if k in PLAN_OPTIONS}
    started = time.perf_counter()
    loaded = ctx.model
    load_seconds = round(time.perf_counter() - started, 1)
    plans, lines, spreads = {}, [], []
    for name, (rows, cols) in selector.kernel_sources(ctx, objective).items():
        plan, calibration = kernel_plan(loaded.model, loaded.tokenizer, rows, cols, **options)
        estimate = round(estimate_seconds(plan, calibration), 1)
        plans[name] = plan.to_dict() | calibration | {"estimated_seconds": estimate}
        spreads.append(calibration["relative_spread"])
        lines.append(describe(plan, calibration, name=name))
    total = round(load_seconds + sum(p["estimated_seconds"] for p in plans.values()), 1)
    lines.append(f"in all: estimated {format_seconds(total)} here, {format_seconds(load_seconds)} of it to load the "
                 f"model (uncertainty ± {max(spreads):.0%} on the kernels, more on a machine whose load changes)")
    results = {"stage": ctx.stage, "selector": selector.name, "objective": objective, "dry_run": True,
               "plans": plans, "model_load_seconds": load_seconds, "estimated_seconds": total, "plan_lines": lines}
    save_json(output_dir / "plan.json", results)
    return results


def run(cfg: DictConfig) -> dict:
    """Run one job; returns the results dict also written to results.json.

    Under DDP (trainer=ddp) every rank runs this function; the kernel's tiles and fine-tuning's
    batches are split over the ranks, and only rank 0 writes files, logs and evaluates (generation
    is a small share of a job, and one process keeps the predictions those of a single-process run).
    The other ranks return {"rank_zero": False} once fine-tuning is done. With `skip_done`, a job whose
    folder already holds this config's results returns them and computes nothing (`finished_results`).
    """
    check_launch(cfg)
    writes = is_global_zero()
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("skip_done"):
        done = finished_results(cfg, output_dir)
        if done is not None:
            log.info("Skipped: %s already holds the results of this config (skip_done=true)", output_dir)
            return done if writes else {"rank_zero": False}
    if writes:
        output_dir.mkdir(parents=True, exist_ok=True)
        # results.json is written last: one left from an earlier run here (another config, or this job
        # before it was interrupted) must not pass for this run's while it is under way; nor an earlier
        # failure's FAILED marker (delift.cli writes it) for this run's.
        (output_dir / "results.json").unlink(missing_ok=True)
        (output_dir / FAILED_FILE).unlink(missing_ok=True)
        (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # The logger's run starts with the job: kernel and selection timings and failures land in it too.
    tracker = start_tracker(cfg, output_dir) if writes else Tracker()
    try:
        results = _run_job(cfg, output_dir, writes, tracker)
    except BaseException as err:
        tracker.close(failed=True, exit_code=exit_status(err))  # the W&B run ends as the command does
        raise
    tracker.close(failed=False)
    return results


def finished_results(cfg: DictConfig, output_dir: Path) -> dict | None:
    """The results of `output_dir` when a run of this same config finished there, else None.

    Finished: results.json exists (written last, atomically). Same config: its config_resolved.yaml
    equals `cfg` resolved with that run's `paths` (so interpolations of the folders agree across
    machines), both without NOT_RESULT_KEYS.
    """
    results_path, config_path = output_dir / "results.json", output_dir / "config_resolved.yaml"
    if not (results_path.is_file() and config_path.is_file()):
        return None
    stored = OmegaConf.load(config_path)
    current = cfg.copy()  # a shallow copy: replacing its paths leaves cfg's alone
    with open_dict(current):
        current.paths = stored.paths
    ours, theirs = OmegaConf.to_container(current, resolve=True), OmegaConf.to_container(stored, resolve=False)
    for key in NOT_RESULT_KEYS:
        ours.pop(key, None)
        theirs.pop(key, None)
    if ours != theirs:
        return None
    return json.loads(results_path.read_text(encoding="utf-8"))


def _run_job(cfg: DictConfig, output_dir: Path, writes: bool, tracker: Tracker) -> dict:
    timings: dict[str, float] = {}
    started = time.perf_counter()
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)

    with _timed(timings, "load_data", tracker):
        stage = build_stage(cfg.stage, cfg.seed, evaluates=cfg.task == "run")
    selector = instantiate(cfg.selector)
    ctx = selection_context(cfg, stage, output_dir)
    log.info("Stage %s: pool %d, target %d, existing %d, eval %d", stage.name, len(stage.pool), len(stage.target),
             len(stage.existing), len(stage.eval))

    if cfg.task == "kernel":
        return compute_kernels(selector, ctx, output_dir, timings, tracker, dry_run=bool(cfg.kernel.get("dry_run")))

    budget = selector.budget(len(stage.pool)) if selector.trains else 0
    with _timed(timings, "select", tracker):
        selection = selector.select(ctx)
    select_steps = {f"select/{k}": v for k, v in selection.info.get("timings", {}).items()}
    timings.update(select_steps)
    tracker.log_timings(select_steps)
    kernel_report = selection.info.get("kernel_report")
    if writes:
        write_selection(output_dir, selection, selector, stage, budget, cfg.seed)
        if cfg.get("export"):  # the subset for other trainers: a HF dataset, chat JSONL, the hub
            export_subset(output_dir, [stage.pool[i] for i in selection.indices], selection.indices,
                          **_container(cfg.export))
        tracker.log_selection(selection, stage, selector)
        # Before the kernels go: DELIFT's report reads them.
        report = report_selection(selection, selector, ctx, report_tokenizer(ctx, cfg.task == "run"))
        tracker.log_selection_report(report)
    selection.kernels.clear()  # plotted and logged; fine-tuning has better use for the memory
    log.info("Selected %d of %d with %s", len(selection.indices), len(stage.pool), selector.name)
    if writes:
        for level, line in log_lines(report):
            log.log(level, line)
    results = {"stage": stage.name, "selector": selector.name, "model": ctx.model_spec.name,
               "n_pool": len(stage.pool), "n_selected": len(selection.indices), "seed": cfg.seed,
               "fraction": selector.fraction, "experiment": cfg.get("experiment_name"),
               "selector_config": selector.config()}
    if kernel_report:
        results["kernel"] = kernel_report
    if writes:
        results["selection_report"] = report
    if cfg.task == "select":
        results["timings"] = timings
        if writes:
            save_json(output_dir / "results.json", results)
        return results

    judge = instantiate(cfg.judge) if cfg.get("judge") else None
    loaded = ctx.model
    subset = [stage.pool[i] for i in selection.indices]
    evaluate_options = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                            use_chat_template=cfg.train.use_chat_template, do_sample=cfg.eval.do_sample,
                            rouge_stemmer=cfg.eval.rouge_stemmer, progress=cfg.progress, judge=judge,
                            ref_loss=cfg.eval.likelihood.ref_loss, option_ll=cfg.eval.likelihood.options,
                            option_format=cfg.eval.likelihood.option_format,
                            normalize=cfg.eval.likelihood.normalize)
    metrics_by_mode, rows = {}, []
    # ICL first: it prompts the base model, which fine-tuning then adapts in place. (config.validate has
    # checked eval.mode against EvalConfig's choices before anything loaded.)
    if cfg.eval.mode in ("icl", "both") and writes:
        demonstrations = nearest_demonstrations(stage.eval, subset, ctx.embedder, cfg.eval.icl_k)
        with _timed(timings, "evaluate_icl", tracker):
            metrics_by_mode["icl"], icl_rows = evaluate(loaded.model, loaded.tokenizer, stage.eval, ctx.embedder,
                                                        demonstrations=demonstrations, **evaluate_options)
        rows += [{"mode": "icl", **row} for row in icl_rows]
    if cfg.eval.mode in ("finetune", "both"):
        model = loaded.model
        if selector.trains:
            if cfg.train.get("mix_existing") and stage.existing:
                subset = subset + list(stage.existing)
            with _timed(timings, "finetune", tracker):
                tuned = finetune(loaded, subset, lora=_container(cfg.train.lora),
                                 optim=_container(cfg.train.optim), trainer_options=_container(cfg.trainer),
                                 output_dir=output_dir, seed=cfg.seed, logger=tracker.logger or False,
                                 use_chat_template=cfg.train.use_chat_template, resume=cfg.resume,
                                 checkpoint_every_n_steps=cfg.train.checkpoint_every_n_steps,
                                 gradient_checkpointing=bool(cfg.train.get("gradient_checkpointing")))
            model = tuned.model
            if writes:
                tracker.log_adapter(tuned.adapter_dir)
        if writes:
            with _timed(timings, "evaluate_finetune", tracker):
                metrics_by_mode["finetune"], ft_rows = evaluate(model, loaded.tokenizer, stage.eval, ctx.embedder,
                                                                **evaluate_options)
            rows += [{"mode": "finetune", **row} for row in ft_rows]
    if not writes:
        return {"rank_zero": False}
    save_jsonl(output_dir / "predictions.jsonl", rows)
    timings["total"] = round(time.perf_counter() - started, 2)
    tracker.log_timings({"total": timings["total"]})
    primary = "finetune" if "finetune" in metrics_by_mode else "icl"
    results |= {"metrics": metrics_by_mode[primary], "metrics_by_mode": metrics_by_mode,
                "judge": {"name": judge.name, "stand_in": judge.stand_in,
                          "method": "feedback" if judge.feedback else "direct"} if judge else None,
                "embedder": ctx.embedder.name, "timings": timings}
    save_json(output_dir / "results.json", results)
    tracker.log_evaluation(metrics_by_mode, rows)
    return results


def check_launch(cfg: DictConfig) -> None:
    """Fail at once on what cannot work: DDP inside a multirun, kernel shards outside task=kernel."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from delift.devices import process_count

    trainer = _container(cfg.trainer)
    ddp = "ddp" in str(trainer.get("strategy", "auto")) and process_count(trainer) > 1
    # Lightning re-launches `run.py` for each extra rank, which a multirun's job cannot be (a known
    # Lightning + Hydra breakage); under SLURM the ranks are SLURM's own tasks, and that works.
    external = int(os.environ.get("SLURM_NTASKS", 1)) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    if ddp and multirun and not external:
        raise DeliftInputError(
            "trainer=ddp cannot run inside a multirun (-m): Lightning re-launches run.py for every rank. Run each "
            "job as its own `python run.py ... trainer=ddp` command (e.g. a shell loop over the grid), or use "
            "`hydra/launcher=slurm`, where SLURM starts one task per GPU", field="trainer.strategy")
    if int(cfg.kernel.get("num_shards") or 1) > 1 and cfg.task != "kernel":
        raise DeliftInputError("kernel shards only compute tiles: use task=kernel, then run without "
                               "kernel.shard/num_shards to assemble the kernel and select", field="kernel.num_shards")


def results_table(results: dict) -> str:
    """A short plain-text summary printed at the end of a run."""
    if results.get("dry_run"):
        return "\n".join(results["plan_lines"])
    if "kernels" in results:
        lines = []
        for name, k in results["kernels"].items():
            if "shape" in k:
                lines.append(f"{name:<15} shape {tuple(k['shape'])}  min {k['min']:.4f}  mean {k['mean']:.4f}  "
                             f"max {k['max']:.4f}")
            else:  # one shard of the kernel
                d = k["details"]
                lines.append(f"{name:<15} shard {d['shard']}/{d['num_shards']}: {d['shard_tiles']} of {d['tiles']} "
                             f"tiles ({d['computed']} computed)")
        return "\n".join(lines)
    sources = source_table(results["selection_report"]) if "selection_report" in results else []
    by_mode = results.get("metrics_by_mode") or {"-": results.get("metrics", {})}
    keys = list(dict.fromkeys(k for metrics in by_mode.values() for k in metrics))
    lines = [f"{'stage':<12} {'selector':<10} {'selected':>10} {'mode':<9}" + "".join(f"{k:>20}" for k in keys)]
    for mode, metrics in by_mode.items():
        cells = "".join(f"{metrics[k]:>20.4f}" if isinstance(metrics.get(k), float) else f"{metrics.get(k, '-'):>20}"
                        for k in keys)
        lines.append(f"{results['stage']:<12} {results['selector']:<10} "
                     f"{results['n_selected']:>4}/{results['n_pool']:<5} {mode:<9}{cells}")
    return "\n".join(lines + sources)
