"""The stage builder: which data plays which role in one fine-tuning stage.

A stage config (delift/conf/stage/*.yaml) names, per role, a mapping source name -> dataset config:

    roles:    {pool: {trivia: <dataset cfg>, ...}, target: {...}, existing: {...}, eval: {...}}
    sizes:    {pool: {trivia: 36, ...}, ...}       # per-source caps: a seeded sample of that many rows
    holdout:  {eval: {from: pool, size: 24}, ...}  # parts carved out of a loaded role, in this order
    pool_size: 150                                 # optional: then keep a seeded sample of the pool, by source
    data_seed: 0                                   # optional: sample with this seed, not the run's

Your own files (the file, file_task and file_continual stages) are named by role instead:

    pool: /data/mine.jsonl    # and target:, existing:, eval: (each a source named after its role)
    holdout_eval: 0.2         # no eval file: a job that evaluates holds out this share (or count)
    columns: {input: question, output: answer}   # the files' column names, where they differ from ours

Roles: `pool` is what selection chooses from; `target` the examples selection aims at (FLMI, and
LESS's dev set); `existing` the data already learned (FLCG); `eval` the test part, which selection
never sees; only a job that evaluates (task=run) needs it. All sampling is seeded: the same config
and seed give the same stage.

Record ids stay as the data gives them (a user file's `id` column as it is), so selection.json and
subset.jsonl name the records the way their file does; only where two sources share an id do the
records of both get the prefix `<source>/` (the `source` they carry, see `disambiguate_ids`).
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
# The loader of the files a stage names per role (stage.pool, .target, .existing, .eval: the file stages).
FILE_LOADER = "delift.data.load_file"
# The roles each objective cannot do without: FL selects from a pool, FLMI/FL2MI toward a target,
# FLCG against existing data; a job that evaluates (task=run) needs eval too.
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


def build_stage(stage_cfg, seed: int, *, evaluates: bool = True) -> StageData:
    """Load every source of every role, sample each to its size cap, carve out the holdout parts; with the
    run's `seed`, or the stage's `data_seed` where set (the same data, above all the same evaluation set,
    across runs whose seeds differ). `evaluates`: the job evaluates (task=run), so the stage needs an
    evaluation set, held out with `holdout_eval` when no role gives one; task=select and task=kernel
    need none and select from the whole pool."""
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
    roles_cfg = _with_files(cfg, _mapping(cfg.get("roles"), "stage.roles"))
    sizes = _mapping(cfg.get("sizes"), "stage.sizes")
    for where, given in (("stage.roles", roles_cfg), ("stage.sizes", sizes)):
        for role in given:
            if role not in ROLES:
                raise DeliftInputError(f"stage {name}: unknown role {role!r}; the roles are {list(ROLES)}", field=where)

    parts = [(role, source, records) for role in ROLES
             for source, records in _load_role(name, role, _mapping(roles_cfg.get(role), f"stage.roles.{role}"),
                                               _mapping(sizes.get(role), f"stage.sizes.{role}"), seed)]
    data = {role: [] for role in ROLES}
    for (role, _, _), records in zip(parts, disambiguate_ids([(source, records) for _, source, records in parts])):
        data[role] += records
    for part, spec in _mapping(cfg.get("holdout"), "stage.holdout").items():
        _hold_out(name, part, _mapping(spec, f"stage.holdout.{part}"), data, seed)
    if evaluates and not data["eval"] and cfg.get("holdout_eval") is not None:
        _hold_out_eval(name, objective, cfg["holdout_eval"], data, seed)
    _keep_eval_unseen(name, data)
    _cap_pool(name, cfg.get("pool_size"), data, seed)

    for role in REQUIRED_ROLES[objective]:
        if role == "eval" and not evaluates:
            continue
        if role == "eval" and not data["eval"]:
            raise DeliftInputError(f"stage {name}: role 'eval' is empty, and task=run evaluates: give an evaluation "
                                   "set (stage.eval=PATH, or hold one out: stage.holdout_eval=0.2), or only select "
                                   "(task=select)", field="stage.eval")
        if not data[role]:
            raise DeliftInputError(f"stage {name}: role {role!r} is empty, and objective {objective} needs it",
                                   field=f"stage.{role}" if cfg.get(role) is not None else f"stage.roles.{role}")
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


def _with_files(cfg: dict, roles_cfg: dict) -> dict:
    """`roles` plus the stage's file keys (stage.pool, .target, .existing, .eval): each file a source
    of its role, named after the role, read by delift.data.load_file with the stage's `columns`."""
    roles_cfg = dict(roles_cfg)
    for role in ROLES:
        path = cfg.get(role)
        if path is None:
            continue
        if not isinstance(path, str) or not path.strip():
            raise DeliftInputError(f"must be the path of a data file or dataset folder, got {path!r}",
                                   field=f"stage.{role}")
        sources = dict(_mapping(roles_cfg.get(role), f"stage.roles.{role}"))
        if role in sources:
            raise DeliftInputError(f"stage.{role} names a file, and stage.roles.{role} already has a source "
                                   f"named {role!r}", field=f"stage.{role}")
        sources[role] = {"_target_": FILE_LOADER, "path": path, "columns": cfg.get("columns")}
        roles_cfg[role] = sources
    return roles_cfg


def _load_role(stage: str, role: str, sources: dict, caps: dict, seed: int) -> list[tuple[str, list[dict]]]:
    """(source name, its records) per source of `role`, each sampled to its size cap."""
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
        records.append((source, _sample(loaded, cap, seed, f"sample/{role}/{source}")))
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


def disambiguate_ids(parts: list[tuple[str, list[dict]]]) -> list[list[dict]]:
    """Each part's records (a part: (source name, records)) with their ids as given, except where two
    sources share an id: then every record of both becomes `<source>/<id>`, `source` being the name the
    record carries (a file's stem or `source` column; unless the id starts so already), or, where that
    still leaves the sources sharing ids (two files of one name), the source's own name, which the records
    then carry as their `source` too. The stage builder and the Python API (`delift.select`) both call
    this, with the role names as the names of user files, so both name a record alike."""
    names = [source for source, _ in parts]
    out = [list(records) for _, records in parts]
    clashing = _clashing(names, out)
    for k in clashing:
        out[k] = [_prefixed(r, r["source"] or names[k]) for r in parts[k][1]]
    for k in _clashing(names, out) & clashing:  # sources of one name (two files called train.jsonl)
        out[k] = [_prefixed(r, names[k]) for r in parts[k][1]]
    return out


def _clashing(names: list[str], parts: list[list[dict]]) -> set[int]:
    """Positions of the parts that share an id with a part of another source name."""
    owners: dict[str, set[str]] = {}
    for name, records in zip(names, parts):
        for r in records:
            owners.setdefault(r["id"], set()).add(name)
    shared = {rid for rid, sources in owners.items() if len(sources) > 1}
    return {k for k, records in enumerate(parts) if any(r["id"] in shared for r in records)}


def _prefixed(record: dict, source: str) -> dict:
    prefix = f"{source}/"
    return {**record, "id": record["id"] if record["id"].startswith(prefix) else prefix + record["id"],
            "source": source}


def _hold_out_eval(stage: str, objective: str, share, data: dict, seed: int) -> None:
    """No evaluation set but a job that evaluates: hold out `share` (a fraction < 1, or a count) of the
    pool, or of the target where the objective aims at one (FLMI, FL2MI: the task evaluated on)."""
    origin = "target" if objective in ("flmi", "fl2mi") else "pool"
    n = len(data[origin])
    if isinstance(share, bool) or not isinstance(share, (int, float)) or share <= 0 or (share >= 1 and share % 1):
        raise DeliftInputError(f"stage {stage}: must be a fraction in (0, 1) or a whole count, got {share!r}",
                               field="stage.holdout_eval")
    size = int(share) if share >= 1 else max(1, int(share * n + 0.5))
    if size >= n:
        raise DeliftInputError(f"stage {stage}: holding out {size} of the {n} {origin} records for evaluation leaves "
                               f"none to {'select from' if origin == 'pool' else 'aim at'}; lower "
                               "stage.holdout_eval or give an evaluation file (stage.eval=PATH)",
                               field="stage.holdout_eval")
    _hold_out(stage, "eval", {"from": origin, "size": size}, data, seed)
    log.info("stage %s: no evaluation file (stage.eval), so %d of the %d %s records are held out to evaluate on "
             "(stage.holdout_eval=%s); task=select and task=kernel keep them all", stage, size, n, origin, share)


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


def proportional_quotas(counts: dict[str, int], size: int) -> dict[str, int]:
    """Split `size` over sources in proportion to `counts` by largest remainder: each source gets
    floor(size * count / n), and the units left go to the largest fractional parts, equal parts to
    the source listed first (dict order)."""
    n = sum(counts.values())
    # Integer arithmetic: remainders compare exactly, so ties are real ties.
    quotas = {source: size * count // n for source, count in counts.items()}
    remainders = {source: size * count % n for source, count in counts.items()}
    order = list(counts)
    left = size - sum(quotas.values())
    for source in sorted(order, key=lambda s: (-remainders[s], order.index(s)))[:left]:
        quotas[source] += 1
    return quotas


def _stratified_sample(records: list[dict], size: int, seed: int, key: str) -> set[int]:
    """Indices of `size` records, each source getting its proportional share (largest remainder),
    sampled with the seed within the source: small holdouts keep the pool's mix of sources."""
    by_source: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_source.setdefault(record["source"], []).append(index)
    shares = proportional_quotas({source: len(indices) for source, indices in by_source.items()}, size)
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
