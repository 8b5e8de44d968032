"""The one pipeline: records -> (kernel) -> selection -> fine-tuning -> generation -> metrics -> logs.

`run(cfg)` is what `python run.py` calls with the composed Hydra config; each step lives in its
own module and is usable alone (see the README's Python API section).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from delift.cache import save_json, save_jsonl
from delift.data import build_stage
from delift.evaluation import evaluate
from delift.selectors import SelectionContext
from delift.training import finetune

log = logging.getLogger(__name__)


@contextmanager
def _timed(timings: dict, name: str):
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 2)


def _container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def selection_context(cfg: DictConfig, stage, output_dir: Path) -> SelectionContext:
    return SelectionContext(
        stage=stage.name, objective=stage.objective, pool=stage.pool, target=stage.target,
        existing=stage.existing, seed=cfg.seed,
        cache_dir=cfg.paths.cache_dir, output_dir=output_dir, model_spec=instantiate(cfg.model),
        embedder=instantiate(cfg.embedder), kernel_options=_container(cfg.kernel),
        train_options=_container(cfg.train), trainer_options=_container(cfg.trainer), progress=cfg.progress,
    )


def write_selection(output_dir: Path, selection, selector, stage, budget: int | None, seed: int) -> None:
    save_json(output_dir / "selection.json", {
        "selector": selector.name, "selector_config": selector.config(), "stage": stage.name,
        "budget": budget, "n_pool": len(stage.pool), "seed": seed, "indices": selection.indices,
        "ids": [stage.pool[i]["id"] for i in selection.indices], "scores": selection.scores,
        "objective_value": selection.objective_value, "info": selection.info,
    })
    save_jsonl(output_dir / "subset.jsonl", [stage.pool[i] for i in selection.indices])


def run(cfg: DictConfig) -> dict:
    """Run one job; returns the results dict also written to results.json."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    import lightning as L

    L.seed_everything(cfg.seed, workers=True, verbose=False)

    with _timed(timings, "load_data"):
        stage = build_stage(cfg.stage, cfg.seed)
    selector = instantiate(cfg.selector)
    ctx = selection_context(cfg, stage, output_dir)
    log.info("Stage %s: pool %d, target %d, existing %d, eval %d", stage.name, len(stage.pool), len(stage.target),
             len(stage.existing), len(stage.eval))

    budget = selector.budget(len(stage.pool)) if selector.trains else 0
    with _timed(timings, "select"):
        selection = selector.select(ctx)
    timings.update({f"select/{k}": v for k, v in selection.info.get("timings", {}).items()})
    write_selection(output_dir, selection, selector, stage, budget, cfg.seed)
    log.info("Selected %d of %d with %s", len(selection.indices), len(stage.pool), selector.name)
    results = {"stage": stage.name, "selector": selector.name, "model": ctx.model_spec.name,
               "n_pool": len(stage.pool), "n_selected": len(selection.indices), "seed": cfg.seed}
    if cfg.task == "select":
        results["timings"] = timings
        save_json(output_dir / "results.json", results)
        return results

    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    if logger:
        logger.log_hyperparams(_container(cfg))
    loaded = ctx.model
    model = loaded.model
    if selector.trains:
        subset = [stage.pool[i] for i in selection.indices]
        if cfg.train.get("mix_existing") and stage.existing:
            subset = subset + list(stage.existing)
        with _timed(timings, "finetune"):
            model = finetune(loaded, subset, lora=_container(cfg.train.lora), optim=_container(cfg.train.optim),
                             trainer_options=_container(cfg.trainer), output_dir=output_dir, seed=cfg.seed,
                             logger=logger, use_chat_template=cfg.train.use_chat_template,
                             resume=cfg.get("resume", False)).model
    with _timed(timings, "evaluate"):
        metrics, rows = evaluate(model, loaded.tokenizer, stage.eval, ctx.embedder,
                                 max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                                 use_chat_template=cfg.train.use_chat_template, do_sample=cfg.eval.do_sample,
                                 progress=cfg.progress)
    save_jsonl(output_dir / "predictions.jsonl", rows)
    timings["total"] = round(time.perf_counter() - started, 2)
    results |= {"metrics": metrics, "timings": timings}
    save_json(output_dir / "results.json", results)
    if logger:
        logger.log_metrics({f"eval/{k}": v for k, v in metrics.items()})
        if hasattr(logger, "log_table"):
            columns = ["id", "prediction", "reference", "rouge1", "embed_sim"]
            logger.log_table("predictions", columns=columns, data=[[r[c] for c in columns] for r in rows])
        logger.finalize("success")
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()  # one W&B run per job, also inside a multirun
    return results


def results_table(results: dict) -> str:
    """A short plain-text summary printed at the end of a run."""
    metrics = results.get("metrics", {})
    head = f"{'stage':<12} {'selector':<10} {'selected':>10} " + " ".join(f"{k:>10}" for k in metrics)
    row = (f"{results['stage']:<12} {results['selector']:<10} {results['n_selected']:>4}/{results['n_pool']:<5} "
           + " ".join(f"{v:>10.4f}" if isinstance(v, float) else f"{v:>10}" for v in metrics.values()))
    return f"{head}\n{row}"
