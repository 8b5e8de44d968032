"""DELIFT and DELIFT (SE): one submodular objective per stage over a pairwise kernel.

DELIFT's kernel is the model's in-context utility UF (delift.utility); DELIFT (SE)'s is the
cosine of sentence embeddings of whole records, as (cos + 1) / 2. The objective follows the
stage (instruction -> FL on pool x pool, task -> FLMI with pool x target, continual -> FLCG with
pool x existing) unless `objective` overrides it (e.g. `fl` everywhere: the paper's ablation;
`fl2mi`: target x pool only, since there the targets are what the pool must help). Every kernel
is built as rows = the examples helped, columns = the demonstrations, as delift.objectives reads it.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from delift.embeddings import cosine_kernel01, encode_records
from delift.errors import DeliftInputError
from delift.objectives import (NORMALIZATIONS, SELF_UTILITIES, Backend, Missing, Normalization, Objective, SelfUtility,
                               maximize)
from delift.selectors.base import Fraction, Selection, SelectionContext, Selector, register

DEVICE_KEYS = ("accelerator", "devices", "strategy", "num_nodes")
# Kernel config keys that are not compute_kernel arguments.
PLAN_ONLY_KEYS = ("dry_run",)
STAGE_OBJECTIVES = {"instruction": "fl", "task": "flmi", "continual": "flcg"}
POOL_KERNEL_OBJECTIVES = ("fl", "flmi", "flcg")  # FL2MI reads only the target x pool kernel
# Which second kernel each objective needs, and which role supplies its columns (FL2MI: its rows,
# the targets being the examples helped; the pool supplies the other axis).
SIDE_KERNELS = {"flmi": ("query_kernel", "target"), "fl2mi": ("query_kernel", "target"),
                "flcg": ("private_kernel", "existing")}
SIDE_ROWS = ("fl2mi",)


class KernelObjectiveSelector(Selector):
    """Greedy maximisation of a submodular objective over kernels that subclasses define."""

    def __init__(self, fraction: Fraction = 0.3, objective: Objective | None = None, eta: float = 1.0, nu: float = 1.0,
                 backend: Backend = "ours", self_utility: SelfUtility = "include", normalize: Normalization = "global"):
        super().__init__(fraction)
        if normalize not in NORMALIZATIONS:
            raise DeliftInputError(f"must be one of {list(NORMALIZATIONS)}, got {normalize!r}",
                                   field="selector.normalize")
        if self_utility not in SELF_UTILITIES:
            raise DeliftInputError(f"must be one of {list(SELF_UTILITIES)}, got {self_utility!r}",
                                   field="selector.self_utility")
        self.objective, self.eta, self.nu, self.backend = objective, eta, nu, backend
        self.self_utility, self.normalize = self_utility, normalize

    def pairwise(self, ctx: SelectionContext, rows: list[dict], cols: list[dict] | None,
                 details: dict) -> np.ndarray | sp.csr_matrix:
        """Kernel entry [i, j]: how much column j helps row i (non-negative after normalisation);
        `cols` None means the rows themselves. Fills `details` with what the kernel cost, if anything."""
        raise NotImplementedError

    def resolve_objective(self, ctx: SelectionContext) -> str:
        objective = self.objective or ctx.objective or STAGE_OBJECTIVES.get(ctx.stage)
        if objective is None:
            raise DeliftInputError(f"no objective for stage {ctx.stage!r}; set selector.objective",
                                   field="selector.objective")
        return objective

    def kernel_sources(self, ctx: SelectionContext, objective: str) -> dict[str, tuple[list[dict], list[dict] | None]]:
        """The kernels `objective` reads, as name -> (rows, columns or None for the pool itself)."""
        sources = {}
        if objective in POOL_KERNEL_OBJECTIVES:
            sources["kernel"] = (ctx.pool, None)
        if objective in SIDE_KERNELS:
            name, role = SIDE_KERNELS[objective]
            side = getattr(ctx, role)
            if not side:
                raise DeliftInputError(f"objective {objective} needs the stage's {role} data, which is empty",
                                       field=f"stage.roles.{role}")
            sources[name] = (side, ctx.pool) if objective in SIDE_ROWS else (ctx.pool, side)
        return sources

    def kernels(self, ctx: SelectionContext, objective: str) -> tuple[dict, dict[str, float], dict[str, dict]]:
        """The kernels `objective` needs (pool x pool unless FL2MI; pool x target for FLMI, target x
        pool for FL2MI, pool x existing for FLCG; dense arrays or, from approximate engines, CSR
        matrices), the seconds each took, and what each cost (`details`, per kernel name)."""
        timings, kernels, details = {}, {"kernel": None}, {}
        for name, (rows, cols) in self.kernel_sources(ctx, objective).items():
            started = time.perf_counter()
            details[name] = {}
            kernels[name] = self.pairwise(ctx, rows, cols, details[name])
            role = "pool" if cols is None else SIDE_KERNELS[objective][1]
            timings[f"kernel_{role}"] = round(time.perf_counter() - started, 2)
        return kernels, timings, {name: d for name, d in details.items() if d}

    def select(self, ctx: SelectionContext) -> Selection:
        objective = self.resolve_objective(ctx)
        kernels, timings, details = self.kernels(ctx, objective)
        raw = {name: kernel for name, kernel in kernels.items() if kernel is not None}
        side = {name: kernel for name, kernel in raw.items() if name != "kernel"}
        started = time.perf_counter()
        result = maximize(raw.get("kernel"), self.budget(len(ctx.pool)), objective, **side,
                          **self.reading(ctx, objective, raw), eta=self.eta, nu=self.nu, backend=self.backend,
                          progress=ctx.progress)
        timings["greedy"] = round(time.perf_counter() - started, 2)
        info = {"objective": objective, "backend": self.backend, "self_utility": self.self_utility,
                "normalize": self.normalize, "timings": timings}
        if details:
            info["kernel"] = self.kernel_label(ctx)
            info["kernel_report"] = details  # passes and the proxy's held-out error: results.json, not selection.json
        return Selection(indices=list(result.indices), scores=[float(g) for g in result.gains],
                         objective_value=float(result.value), info=info, kernels=raw)

    def kernel_label(self, ctx: SelectionContext) -> dict:
        """Which kernel the selection used: for selection.json (no timings, nothing run-dependent)."""
        return {}

    def reading(self, ctx: SelectionContext, objective: str, kernels: dict) -> dict:
        """How the objective reads the kernels: `delift.objectives.maximize`'s normalize, self_utility,
        groups (the covered rows' sources, for normalize=source) and floor keywords."""
        covered = ctx.target if objective in SIDE_ROWS else ctx.pool
        return {"normalize": self.normalize, "self_utility": self.self_utility,
                "groups": [r["source"] for r in covered], "floor": "min"}


@register("delift")
class DeliftSelector(KernelObjectiveSelector):
    """DELIFT: the in-context utility kernel of the model being fine-tuned."""

    def __init__(self, fraction: Fraction = 0.3, objective: Objective | None = None, eta: float = 1.0, nu: float = 1.0,
                 backend: Backend = "ours", self_utility: SelfUtility = "exclude", normalize: Normalization = "global",
                 missing: Missing = "neutral"):
        super().__init__(fraction, objective, eta, nu, backend, self_utility, normalize)
        self.missing = missing

    def reading(self, ctx, objective, kernels):
        from delift.utility.kernel import similarity_floor

        return super().reading(ctx, objective, kernels) | {"floor": similarity_floor(kernels, self.missing)}

    def pairwise(self, ctx, rows, cols, details):
        from delift.utility import compute_kernel

        loaded = ctx.model
        # Where the kernel runs follows the Trainer config (devices, DDP); its dtype is the model's.
        placement = {k: ctx.trainer_options[k] for k in DEVICE_KEYS if k in ctx.trainer_options}
        return compute_kernel(loaded.model, loaded.tokenizer, rows, cols, cache_dir=ctx.cache_dir,
                              model_identity=loaded.identity, progress=ctx.progress, trainer_options=placement,
                              embedder=ctx.embedder, details=details, **engine_options(ctx.kernel_options))

    def kernel_label(self, ctx):
        from delift.utility.plan import APPROXIMATE_ENGINES

        options = engine_options(ctx.kernel_options)
        label = {"engine": options.get("engine", "fast"), "approximation": options.get("engine") in APPROXIMATE_ENGINES}
        if label["approximation"]:
            label |= {k: options.get(k) for k in ("knn_k", "knn_random", "features", "ann", "seed")}
            label["missing"] = self.missing
            if label["engine"] == "proxy":
                label["proxy"] = options.get("proxy")
        return label


@register("delift_se")
class DeliftSESelector(KernelObjectiveSelector):
    """DELIFT (SE): model-independent sentence-embedding similarity of whole records."""

    def pairwise(self, ctx, rows, cols, details):
        vectors = encode_records(ctx.embedder, rows)
        columns = vectors if cols is None else encode_records(ctx.embedder, cols)
        return cosine_kernel01(vectors, columns)


def engine_options(kernel_options: dict) -> dict:
    """The kernel config as compute_kernel arguments."""
    return {k: v for k, v in kernel_options.items() if k not in PLAN_ONLY_KEYS}
