"""The stage builder: which data plays which role in one fine-tuning stage.

A stage config (delift/conf/stage/*.yaml) names, per role, a mapping source name -> dataset config:

    roles:    {pool: {trivia: <dataset cfg>, ...}, target: {...}, existing: {...}, eval: {...}}
    sizes:    {pool: {trivia: 36, ...}, ...}       # per-source caps: a seeded sample of that many rows
    holdout:  {eval: {from: pool, size: 24}, ...}  # parts carved out of a loaded role, in this order
    pool_size: 150                                 # optional: then keep a seeded sample of the pool, by source
    data_seed: 0                                   # optional: sample with this seed, not the run's

Roles: `pool` is what selection chooses from; `target` the examples selection aims at (FLMI, and
LESS's dev set); `existing` the data already learned (FLCG); `eval` the test part, which selection
never sees. All sampling is seeded: the same config and seed give the same stage.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from delift.errors import DeliftInputError
from delift.records import record_prompt

log = logging.getLogger(__name__)

ROLES = ("pool", "target", "existing", "eval")
# The roles each objective cannot do without: FL selects from a pool, FLMI/FL2MI toward a target,
# FLCG against existing data; every stage is evaluated.
REQUIRED_ROLES = {
    "fl": ("pool", "eval"),
    "flmi": ("pool", "target", "eval"),
    "fl2mi": ("pool", "target", "eval"),
    "flcg": ("pool", "existing", "eval"),
}


@dataclass
class StageData:
    name: str
    objective: str
    pool: list[dict]
    target: list[dict] = field(default_factory=list)
    existing: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, int]]:
        """Record counts per role and source, for logs."""
        return {role: dict(Counter(r["source"] for r in getattr(self, role))) for role in ROLES}


def build_stage(stage_cfg, seed: int) -> StageData:
    """Load every source of every role, sample each to its size cap, carve out the holdout parts; with the
    run's `seed`, or the stage's `data_seed` where set (the same data, above all the same evaluation set,
    across runs whose seeds differ)."""
    if isinstance(stage_cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(stage_cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:
            raise DeliftInputError("must be set (it is ??? in the config)", field=err.full_key) from err
    else:
        cfg = dict(stage_cfg)
    name = cfg.get("name") or "stage"
    if cfg.get("data_seed") is not None:
        seed = cfg["data_seed"]
    objective = cfg.get("objective")
    if objective not in REQUIRED_ROLES:
        raise DeliftInputError(f"stage {name}: unknown objective {objective!r}; choose one of {sorted(REQUIRED_ROLES)}",
                               field="stage.objective")
    roles_cfg = _mapping(cfg.get("roles"), "stage.roles")
    sizes = _mapping(cfg.get("sizes"), "stage.sizes")
    for where, given in (("stage.roles", roles_cfg), ("stage.sizes", sizes)):
        for role in given:
            if role not in ROLES:
                raise DeliftInputError(f"stage {name}: unknown role {role!r}; the roles are {list(ROLES)}", field=where)

    data = {role: _load_role(name, role, _mapping(roles_cfg.get(role), f"stage.roles.{role}"),
                             _mapping(sizes.get(role), f"stage.sizes.{role}"), seed) for role in ROLES}
    for part, spec in _mapping(cfg.get("holdout"), "stage.holdout").items():
        _hold_out(name, part, _mapping(spec, f"stage.holdout.{part}"), data, seed)
    _keep_eval_unseen(name, data)
    _cap_pool(name, cfg.get("pool_size"), data, seed)

    for role in REQUIRED_ROLES[objective]:
        if not data[role]:
            raise DeliftInputError(f"stage {name}: role {role!r} is empty, and objective {objective} needs it",
                                   field=f"stage.roles.{role}")
    if objective in ("flmi", "fl2mi") and len(data["target"]) > len(data["pool"]):
        raise DeliftInputError(f"stage {name}: the target ({len(data['target'])} records) is larger than the pool "
                               f"({len(data['pool'])}); selection would aim at more examples than it can choose",
                               field="stage.sizes.target")
    _check_unique_ids(name, data)
    stage = StageData(name=name, objective=objective, **data)
    log.info("stage %s (seed %d): %s", name, seed, stage.summary())
    return stage


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DeliftInputError(f"must be a mapping, got {type(value).__name__}", field=where)
    return dict(value)


def _load_role(stage: str, role: str, sources: dict, caps: dict, seed: int) -> list[dict]:
    unknown = sorted(set(caps) - set(sources))
    if unknown:
        raise DeliftInputError(f"stage {stage}: sizes for {unknown}, which are not sources of role {role} "
                               f"(its sources: {sorted(sources)}); after removing a source, remove its size too "
                               f"(~stage.sizes.{role}.{unknown[0]})", field=f"stage.sizes.{role}")
    records = []
    for source, dataset_cfg in sources.items():
        if not isinstance(dataset_cfg, Mapping) or "_target_" not in dataset_cfg:
            raise DeliftInputError(f"stage {stage}: must be a dataset config with a _target_ (a loader)",
                                   field=f"stage.roles.{role}.{source}")
        cap = caps.get(source)
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
            raise DeliftInputError(f"stage {stage}: must be a non-negative integer or null, got {cap!r}",
                                   field=f"stage.sizes.{role}.{source}")
        loaded = _load_source(dataset_cfg, f"stage.roles.{role}.{source}")
        records += _with_source_prefix(_sample(loaded, cap, seed, f"sample/{role}/{source}"), source)
    return records


def _load_source(dataset_cfg: Mapping, where: str) -> list[dict]:
    try:
        return instantiate(dataset_cfg, _convert_="all")
    except InstantiationException as err:
        # Hydra wraps the loader's own errors: surface ours unchanged, and name the config for the rest
        # (an unknown argument, a _target_ that does not exist).
        cause = err.__cause__ or err
        if isinstance(cause, DeliftInputError):
            raise cause from None
        raise DeliftInputError(f"cannot load ({type(cause).__name__}: {cause})", field=where) from err


def _sample(records: list[dict], cap: int | None, seed: int, key: str) -> list[dict]:
    """A seeded sample of at most `cap` records, kept in their loaded order."""
    if cap is None or cap >= len(records):
        return list(records)
    picked = sorted(random.Random(f"{seed}/{key}").sample(range(len(records)), cap))
    return [records[i] for i in picked]


def _with_source_prefix(records: list[dict], source: str) -> list[dict]:
    """Ids become `<source>/<id>` (unless already so), so they stay unique across sources."""
    prefix = f"{source}/"
    return [r if r["id"].startswith(prefix) else {**r, "id": prefix + r["id"]} for r in records]


def _hold_out(stage: str, part: str, spec: dict, data: dict, seed: int) -> None:
    origin, size = spec.get("from"), spec.get("size")
    where = f"stage.holdout.{part}"
    if part not in ("eval", "target") or origin not in ("pool", "target", "existing") or origin == part:
        raise DeliftInputError(f"stage {stage}: holds out {part!r} from {origin!r}; hold out eval or target from "
                               "another role (pool, target or existing)", field=where)
    if data[part]:
        raise DeliftInputError(f"stage {stage}: {part} is both loaded from roles.{part} and held out from {origin}",
                               field=where)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise DeliftInputError(f"stage {stage}: size must be a non-negative integer, got {size!r}",
                               field=f"{where}.size")
    if size > len(data[origin]):
        raise DeliftInputError(f"stage {stage}: cannot hold out {size} records for {part} from role {origin}, "
                               f"which has {len(data[origin])}", field=f"{where}.size")
    picked = _stratified_sample(data[origin], size, seed, f"holdout/{part}")
    data[part] = [r for i, r in enumerate(data[origin]) if i in picked]
    data[origin] = [r for i, r in enumerate(data[origin]) if i not in picked]


def _cap_pool(stage: str, size, data: dict, seed: int) -> None:
    """Keep a seeded sample of `size` pool records, each source its proportional share. It runs after the
    holdouts, so a smaller pool (e.g. one whose exact kernel is affordable) keeps the same evaluation set."""
    if size is None:
        return
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise DeliftInputError(f"stage {stage}: must be a positive integer or null, got {size!r}",
                               field="stage.pool_size")
    if size >= len(data["pool"]):
        log.info("stage %s: pool_size %d >= the pool's %d records: all kept", stage, size, len(data["pool"]))
        return
    picked = _stratified_sample(data["pool"], size, seed, "pool_size")
    data["pool"] = [r for i, r in enumerate(data["pool"]) if i in picked]


def _stratified_sample(records: list[dict], size: int, seed: int, key: str) -> set[int]:
    """Indices of `size` records, each source getting its proportional share (largest remainder),
    sampled with the seed within the source: small holdouts keep the pool's mix of sources."""
    by_source: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_source.setdefault(record["source"], []).append(index)
    quotas = {source: size * len(indices) / len(records) for source, indices in by_source.items()}
    shares = {source: int(quota) for source, quota in quotas.items()}
    # Leftover slots go to the largest remainders; sorted() is stable, so ties keep the source order.
    by_remainder = sorted(quotas, key=lambda source: quotas[source] - shares[source], reverse=True)
    for source in by_remainder[: size - sum(shares.values())]:
        shares[source] += 1
    return {index for source, indices in by_source.items()
            for index in random.Random(f"{seed}/{key}/{source}").sample(indices, shares[source])}


def _keep_eval_unseen(stage: str, data: dict) -> None:
    """Drop from the roles selection sees any record whose prompt is also an eval prompt (datasets
    have duplicate questions, and a source may feed two roles)."""
    eval_prompts = {record_prompt(r) for r in data["eval"]}
    for role in ("pool", "target", "existing"):
        kept = [r for r in data[role] if record_prompt(r) not in eval_prompts]
        if len(kept) < len(data[role]):
            log.info("stage %s: dropped %d %s records whose prompt is also in eval", stage,
                     len(data[role]) - len(kept), role)
        data[role] = kept


def _check_unique_ids(stage: str, data: dict) -> None:
    first_role = {}
    for role in ROLES:
        for record in data[role]:
            if record["id"] in first_role:
                raise DeliftInputError(f"stage {stage}: duplicate id, in roles {first_role[record['id']]} and {role} "
                                       "(give the sources different names)", record=record["id"], field="id")
            first_role[record["id"]] = role
