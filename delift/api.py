"""One call to select a subset from Python, with the same defaults as the `delift` command.

    import delift
    selection = delift.select("data.jsonl", method="delift", fraction=0.3)
    selection.indices, selection.ids   # positions in the file, and the records' ids, in selection order

The same file gives the same indices and ids as `delift task=select stage=file stage.pool=data.jsonl`
(selection.json's `indices` and `ids`): the records are read and named alike (`disambiguate_ids`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from delift.errors import DeliftInputError
from delift.records import validate_records
from delift.selectors.base import Selection


@dataclass
class PoolSelection(Selection):
    """A Selection (`indices` into the pool, in selection order; `scores`, `objective_value`, `info`)
    and `ids`: the selected records' ids in the same order, as selection.json lists them."""

    ids: list[str] = field(default_factory=list)


def _records(records, role: str) -> list[dict]:
    if isinstance(records, (str, Path)):
        from delift.data import load_file

        return load_file(records)
    if not isinstance(records, Sequence):
        raise DeliftInputError("must be a list of records or a data file path", field=role)
    return validate_records(records, file=f"<{role}>")


def select(records, method: str = "delift", fraction: float = 0.3, *, model=None, stage: str = "instruction",
           target=(), existing=(), seed: int = 0, overrides: Sequence[str] = (), output_dir=None,
           progress: bool = True):
    """Select from `records` with `method` (any name of delift/conf/selector: delift, delift_se, random, less,
    selectit, deft_ucs, full, initial); returns a PoolSelection (`indices` into `records`, in selection
    order, the selected records' `ids` in that order, `scores`, `objective_value`, `info`).

    - `records`: a list of {id, instruction, input, output, source, meta} mappings (id, input, source and
      meta optional), or the path of a JSONL / JSON / CSV / Parquet file or of a folder saved with
      datasets' `save_to_disk`. Ids are kept as they are; only where `records` and `target` (or
      `existing`) share ids do both get the prefix `<source>/`, exactly as the command does.
    - `model`: a model config name (delift/conf/model: smollm2, the offline default; qwen2, phi3,
      tiny_qwen2, ...), a `_target_` mapping like those files, a spec object from delift.models, or a
      loaded `delift.models.LoadedModel`.
    - `stage`: instruction (FL over the pool), task (FLMI toward `target`) or continual (FLCG against
      `existing`).
    - `overrides`: further config overrides, as on the command line (e.g. "kernel.engine=knn").
    - `output_dir`: where selectors may write (LESS's warm-up checkpoints); a temporary folder by default.
    Caches (kernels, embeddings, converted models) go to paths.cache_dir, as for the command. Nothing but
    progress bars (`progress`) and warnings about your data is printed: no Lightning tips or library
    deprecation notices.
    """
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from delift.cli import quiet_logs
    from delift.config import compose_packaged, validate
    from delift.data.stages import StageData, disambiguate_ids
    from delift.models import LoadedModel
    from delift.pipeline import selection_context
    from delift.selectors.delift import STAGE_OBJECTIVES

    quiet_logs()
    if stage not in STAGE_OBJECTIVES:
        raise DeliftInputError(f"unknown stage {stage!r}; choose one of {list(STAGE_OBJECTIVES)}", field="stage")
    pool, target, existing = _records(records, "records"), _records(target, "target"), _records(existing, "existing")
    # Named by role, as the file stages name their files' sources: the same ids as the command's.
    pool, target, existing = disambiguate_ids([("pool", pool), ("target", target), ("existing", existing)])
    needed = {"task": ("target", target), "continual": ("existing", existing)}.get(stage)
    if needed and not needed[1]:
        raise DeliftInputError(f"the {stage} stage selects against `{needed[0]}` records: pass them",
                               field=needed[0])
    model_override = [f"model={model}"] if isinstance(model, str) else []
    cfg = compose_packaged([f"selector={method}", f"seed={seed}", f"progress={str(bool(progress)).lower()}",
                            *model_override, *overrides])
    with tempfile.TemporaryDirectory(prefix="delift-select-") as scratch:
        out = Path(output_dir or scratch)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.experiment_name = "api"
            if "fraction" in cfg.selector:  # full and initial take no fraction
                cfg.selector.fraction = fraction
        validate(cfg)
        data = StageData(name=stage, objective=STAGE_OBJECTIVES[stage], pool=pool, target=target, existing=existing)
        ctx = selection_context(cfg, data, out)
        if isinstance(model, LoadedModel):
            ctx.loader = lambda: model
        elif isinstance(model, Mapping):  # a config node, as in delift/conf/model/*.yaml
            ctx.model_spec = instantiate(model)
        elif model is not None and not isinstance(model, str):
            ctx.model_spec = model
        selection = instantiate(cfg.selector).select(ctx)
    return PoolSelection(**{f: getattr(selection, f) for f in ("indices", "scores", "objective_value", "info",
                                                              "kernels")},
                         ids=[pool[i]["id"] for i in selection.indices])
