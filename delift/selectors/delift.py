"""DELIFT and DELIFT (SE): one submodular objective per stage over a pairwise kernel.

DELIFT's kernel is the model's in-context utility UF (delift.utility); DELIFT (SE)'s is the
cosine of sentence embeddings of whole records, as (cos + 1) / 2. The objective follows the
stage (instruction -> FL on pool x pool, task -> FLMI with pool x target, continual -> FLCG with
pool x existing) unless `objective` overrides it (e.g. `fl` everywhere: the paper's ablation).
"""

from __future__ import annotations

import time

import numpy as np

from delift.embeddings import cosine_kernel01
from delift.errors import DeliftInputError
from delift.objectives import maximize
from delift.records import record_text
from delift.selectors.base import Selection, SelectionContext, Selector, register

DEVICE_KEYS = ("accelerator", "devices", "strategy", "num_nodes")
STAGE_OBJECTIVES = {"instruction": "fl", "task": "flmi", "continual": "flcg"}
POOL_KERNEL_OBJECTIVES = ("fl", "flmi", "flcg")  # FL2MI reads only the pool x target kernel
# Which second kernel each objective needs, and which role supplies its columns.
SIDE_KERNELS = {"flmi": ("query_kernel", "target"), "fl2mi": ("query_kernel", "target"),
                "flcg": ("private_kernel", "existing")}


class KernelObjectiveSelector(Selector):
    """Greedy maximisation of a submodular objective over kernels that subclasses define."""

    def __init__(self, fraction: float = 0.3, objective: str | None = None, eta: float = 1.0, nu: float = 1.0,
                 backend: str = "ours"):
        super().__init__(fraction)
        self.objective, self.eta, self.nu, self.backend = objective, eta, nu, backend

    def pairwise(self, ctx: SelectionContext, rows: list[dict], cols: list[dict]) -> np.ndarray:
        """Kernel entry [i, j]: how much column j helps row i (non-negative after normalisation)."""
        raise NotImplementedError

    def resolve_objective(self, ctx: SelectionContext) -> str:
        objective = self.objective or ctx.objective or STAGE_OBJECTIVES.get(ctx.stage)
        if objective is None:
            raise DeliftInputError(f"no objective for stage {ctx.stage!r}; set selector.objective",
                                   field="selector.objective")
        return objective

    def kernels(self, ctx: SelectionContext, objective: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """The kernels `objective` needs: pool x pool (not FL2MI), pool x target/existing where it has one;
        and the seconds each took."""
        timings, kernels = {}, {"kernel": None}
        if objective in POOL_KERNEL_OBJECTIVES:
            started = time.perf_counter()
            kernels["kernel"] = self.pairwise(ctx, ctx.pool, ctx.pool)
            timings["kernel_pool"] = time.perf_counter() - started
        if objective in SIDE_KERNELS:
            name, role = SIDE_KERNELS[objective]
            columns = getattr(ctx, role)
            if not columns:
                raise DeliftInputError(f"objective {objective} needs the stage's {role} data, which is empty",
                                       field=f"stage.roles.{role}")
            started = time.perf_counter()
            kernels[name] = self.pairwise(ctx, ctx.pool, columns)
            timings[f"kernel_{role}"] = time.perf_counter() - started
        return kernels, {k: round(v, 2) for k, v in timings.items()}

    def select(self, ctx: SelectionContext) -> Selection:
        objective = self.resolve_objective(ctx)
        kernels, timings = self.kernels(ctx, objective)
        started = time.perf_counter()
        result = maximize(kernels.pop("kernel"), self.budget(len(ctx.pool)), objective, eta=self.eta, nu=self.nu,
                          backend=self.backend, progress=ctx.progress, **kernels)
        timings["greedy"] = round(time.perf_counter() - started, 2)
        return Selection(indices=list(result.indices), scores=[float(g) for g in result.gains],
                         objective_value=float(result.value),
                         info={"objective": objective, "backend": self.backend, "timings": timings})


@register("delift")
class DeliftSelector(KernelObjectiveSelector):
    """DELIFT: the in-context utility kernel of the model being fine-tuned."""

    def pairwise(self, ctx, rows, cols):
        from delift.utility import compute_kernel

        loaded = ctx.model
        # Where the kernel runs follows the Trainer config (devices, DDP); its dtype is the model's.
        placement = {k: ctx.trainer_options[k] for k in DEVICE_KEYS if k in ctx.trainer_options}
        return compute_kernel(loaded.model, loaded.tokenizer, rows, cols, cache_dir=ctx.cache_dir,
                              model_identity=loaded.identity, progress=ctx.progress, trainer_options=placement,
                              embedder=ctx.embedder, **ctx.kernel_options)


@register("delift_se")
class DeliftSESelector(KernelObjectiveSelector):
    """DELIFT (SE): model-independent sentence-embedding similarity of whole records."""

    def pairwise(self, ctx, rows, cols):
        return cosine_kernel01(ctx.embedder.encode([record_text(r) for r in rows]),
                               ctx.embedder.encode([record_text(r) for r in cols]))
