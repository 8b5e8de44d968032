"""LESS (Xia et al., ICML 2024): select the pool examples whose gradients align with the target's.

1. Warm-up: LoRA fine-tuning on a seeded random `warmup_fraction` of the pool for `warmup_epochs`
   epochs, saving per epoch the adapter, the Adam moments (by parameter name) and the epoch's
   mean learning rate (delift.training.finetune does the training).
2. Per checkpoint, per example, the gradient of the response-token loss w.r.t. the LoRA weights.
   Pool examples get Adam's update direction as LESS computes it (collect_grad_reps.py,
   obtain_gradients_with_adam): with (m, v) from the checkpoint, m' = b1 m + (1 - b1) g,
   v' = b2 v + (1 - b2) g^2, feature = m' / sqrt(v' + eps), eps inside the root and no bias
   correction. LESS hard-codes b1 0.9, b2 0.999, eps 1e-8; we read the warm-up optimizer's own,
   which are those (torch's AdamW defaults). Target examples keep the plain gradient (what an SGD
   step on them would follow).
3. One seeded Rademacher projection (entries +-1/sqrt(d)) to d dimensions, shared by every
   gradient, then L2 normalisation.
4. score(pool i) = max over target subtasks s of sum over checkpoints e of
   w_e * mean_{q in s} cos(pool_i^e, target_q^e), with w_e the epoch's mean learning rate
   renormalised to sum to 1. A target's subtask is its `meta.subtask` (set by the loaders: MMLU's
   subject, GPQA's subdomain, ...; see delift.data), else its `source`, as LESS's matching.py
   averages over each MMLU subject's targets, then takes the best subject. The top fraction is kept.

The projection is generated tile by tile (PROJECTION_TILE_ROWS gradient coordinates at a time, each
tile from its own seed), so the D x d matrix never exists in memory and the same seed always gives
the same matrix on a given device type. Projected features are cached as .npy per checkpoint.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from delift.cache import cache_folder, content_hash, load_npy, records_hash, save_json, save_npy
from delift.devices import model_device, resolve_device
from delift.errors import DeliftInputError
from delift.selectors.base import Fraction, Selection, SelectionContext, Selector, register

PROJECTION_TILE_ROWS = 2048  # part of the projection's definition: changing it changes the matrix


def _tile_seed(seed: int, tile: int) -> int:
    return int(content_hash("less-projection", int(seed), int(tile))[:15], 16)


def projection_tile(seed: int, tile: int, rows: int, dim: int, device="cpu") -> torch.Tensor:
    """Rows [tile * PROJECTION_TILE_ROWS, + rows) of the (D, dim) Rademacher matrix, scaled by 1/sqrt(dim).

    Each random byte gives eight signs (its bits): drawing one value per sign made generating the
    matrix, not multiplying by it, the whole cost of LESS on a CPU.
    """
    generator = torch.Generator(device=device).manual_seed(_tile_seed(seed, tile))
    packed = torch.randint(0, 256, (rows, -(-dim // 8)), generator=generator, device=device, dtype=torch.uint8)
    bits = (packed[..., None] >> torch.arange(8, device=device, dtype=torch.uint8)) & 1
    return bits.reshape(rows, -1)[:, :dim].float().mul_(2.0 / math.sqrt(dim)).sub_(1.0 / math.sqrt(dim))


def rademacher_matrix(seed: int, in_dim: int, dim: int, device="cpu") -> torch.Tensor:
    """The whole (in_dim, dim) projection matrix; for small in_dim (tests, inspection)."""
    tiles = []
    for tile, start in enumerate(range(0, in_dim, PROJECTION_TILE_ROWS)):
        tiles.append(projection_tile(seed, tile, min(PROJECTION_TILE_ROWS, in_dim - start), dim, device))
    return torch.cat(tiles)


def project(vectors: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """(B, D) -> (B, dim) = vectors @ rademacher_matrix(seed, D, dim), one tile at a time."""
    vectors = vectors.float()
    out = torch.zeros((vectors.shape[0], dim), dtype=torch.float32, device=vectors.device)
    for tile, start in enumerate(range(0, vectors.shape[1], PROJECTION_TILE_ROWS)):
        stop = min(start + PROJECTION_TILE_ROWS, vectors.shape[1])
        out += vectors[:, start:stop] @ projection_tile(seed, tile, stop - start, dim, vectors.device)
    return out


def adam_preconditioned(grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                        betas, eps: float) -> torch.Tensor:
    """Adam's update direction for gradients `grads` (rows) from the moments of a checkpoint, as LESS
    writes it: eps under the square root, moments not bias-corrected."""
    beta1, beta2 = betas
    m = beta1 * exp_avg + (1.0 - beta1) * grads
    v = beta2 * exp_avg_sq + (1.0 - beta2) * grads.square()
    return m / (v + eps).sqrt()


def lr_weights(epoch_lrs) -> np.ndarray:
    """Each checkpoint's weight: its epoch's mean learning rate, renormalised to sum to 1."""
    lrs = np.asarray(epoch_lrs, dtype=np.float64)
    if lrs.size == 0 or (lrs < 0).any() or lrs.sum() <= 0:
        raise DeliftInputError(f"need positive epoch learning rates, got {list(epoch_lrs)}",
                               field="train_options.optim.lr")
    return lrs / lrs.sum()


def target_subtasks(target: list[dict]) -> list[str]:
    """Each target's group: `<source>/<meta.subtask>`, or its source when the dataset has no subtasks.

    The source is part of the name so that two datasets' subtasks never merge.
    """
    groups = []
    for rec in target:
        source, subtask = str(rec.get("source") or ""), (rec.get("meta") or {}).get("subtask")
        groups.append(f"{source}/{subtask}" if subtask else source)
    return groups


def less_scores(pool_features, target_features, weights, subtasks) -> np.ndarray:
    """Max over subtasks of sum_e w_e * mean over the subtask's targets of the cosine.

    `pool_features[e]` (n, d) and `target_features[e]` (m, d) hold unit rows for checkpoint e.
    """
    subtasks = np.asarray(subtasks)
    best = None
    for name in sorted(set(subtasks.tolist())):
        members = np.flatnonzero(subtasks == name)
        score = sum(w * (np.asarray(p, dtype=np.float64) @ np.asarray(t, dtype=np.float64)[members].T).mean(axis=1)
                    for w, p, t in zip(weights, pool_features, target_features))
        best = score if best is None else np.maximum(best, score)
    return best


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def example_gradients(model, params: list[torch.Tensor], examples: list[dict], device) -> torch.Tensor:
    """(B, D) flattened gradients of each example's own loss (mean over its response tokens)."""
    rows = []
    for example in examples:
        input_ids = torch.tensor([example["input_ids"]], device=device)
        labels = torch.tensor([example["labels"]], device=device)
        with torch.enable_grad():
            loss = model(input_ids=input_ids, labels=labels).loss
            grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1).float() for g in grads]))
    return torch.stack(rows)


def load_moments(checkpoint: Path, names: list[str], device) -> tuple[torch.Tensor, torch.Tensor, tuple, float]:
    """(exp_avg, exp_avg_sq) flattened in `names` order, and Adam's betas and eps, from a checkpoint."""
    path = Path(checkpoint) / "optimizer.safetensors"
    moments = load_file(str(path))
    flat = {}
    for kind in ("exp_avg", "exp_avg_sq"):
        parts = []
        for name in names:
            key = f"{kind}/{name}"
            if key not in moments:
                raise DeliftInputError("missing the Adam moment of a trainable parameter", file=path, field=key)
            parts.append(moments[key].reshape(-1).float())
        flat[kind] = torch.cat(parts).to(device)
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    return flat["exp_avg"], flat["exp_avg_sq"], tuple(state["betas"]), float(state["eps"])


@register("less")
class LESSSelector(Selector):
    """LESS with a LoRA warm-up; `lora` / `optim` override keys of `ctx.train_options` for the warm-up."""

    def __init__(self, fraction: Fraction = 0.3, warmup_fraction: Fraction = 0.05, warmup_epochs: int = 2,
                 projection_dim: int = 8192, grad_batch: int = 16, projection_memory_gb: float = 2.0,
                 lora: dict | None = None, optim: dict | None = None, device: str = "auto"):
        super().__init__(fraction)
        if not 0.0 < warmup_fraction <= 1.0:
            raise DeliftInputError(f"must be in (0, 1], got {warmup_fraction}", field="selector.warmup_fraction")
        if warmup_epochs < 1 or projection_dim < 1:
            raise DeliftInputError("warmup_epochs and projection_dim must be positive", field="selector")
        self.warmup_fraction = float(warmup_fraction)
        self.warmup_epochs = int(warmup_epochs)
        self.projection_dim = int(projection_dim)
        self.grad_batch = int(grad_batch)
        self.projection_memory_gb = float(projection_memory_gb)
        self.lora = dict(lora or {})
        self.optim = dict(optim or {})
        self.device = device

    def warmup_options(self, ctx: SelectionContext) -> tuple[dict, dict]:
        lora = dict(ctx.train_options.get("lora") or {}) | self.lora
        optim = dict(ctx.train_options.get("optim") or {}) | self.optim | {"epochs": self.warmup_epochs}
        for name, options, keys in (("lora", lora, ("r", "alpha", "dropout")),
                                    ("optim", optim, ("lr", "batch_size", "max_length"))):
            for key in keys:
                if key not in options:
                    raise DeliftInputError("is missing (LESS's warm-up fine-tunes with it)",
                                           field=f"train_options.{name}.{key}")
        return lora, optim

    @staticmethod
    def use_chat_template(ctx: SelectionContext) -> bool:
        """The prompt format of the run's fine-tuning, so the warm-up learns what training will see."""
        return bool(ctx.train_options.get("use_chat_template", True))

    def warmup_indices(self, n: int, seed: int) -> list[int]:
        size = max(1, int(math.floor(self.warmup_fraction * n + 0.5)))
        return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=size, replace=False))

    def _device(self, model):
        """`auto`: where the run's device policy put the model."""
        return model_device(model) if self.device == "auto" else resolve_device(self.device)

    def gradient_rows(self, model, params, examples, checkpoint, *, adam: bool, device, progress: bool, desc: str):
        """Yield (example index, gradient row) for `examples` at one checkpoint (Adam direction if `adam`)."""
        if adam:
            names = [name for name, _ in params]
            exp_avg, exp_avg_sq, betas, eps = load_moments(checkpoint, names, device)
        for start in tqdm(range(0, len(examples), self.grad_batch), desc=desc, disable=not progress):
            grads = example_gradients(model, [p for _, p in params], examples[start:start + self.grad_batch], device)
            if adam:
                grads = adam_preconditioned(grads, exp_avg, exp_avg_sq, betas, eps)
            yield from zip(range(start, start + len(grads)), grads)

    def _all_gradient_rows(self, model, params, checkpoints, pool_examples, target_examples, device, progress):
        """((epoch, is_pool), index, gradient) for every pool and target example at every checkpoint."""
        from peft import set_peft_model_state_dict

        for epoch, checkpoint in enumerate(checkpoints, start=1):
            adapter = load_file(str(Path(checkpoint) / "adapter_model.safetensors"))
            set_peft_model_state_dict(model, {k: v.to(device) for k, v in adapter.items()})
            for adam, examples in ((True, pool_examples), (False, target_examples)):
                desc = f"LESS {'pool' if adam else 'target'} gradients, epoch {epoch}"
                for index, gradient in self.gradient_rows(model, params, examples, checkpoint, adam=adam,
                                                          device=device, progress=progress, desc=desc):
                    yield (epoch, adam), index, gradient

    def project_rows(self, rows, outputs: dict, gradient_size: int, seed: int) -> None:
        """Project (key, index, gradient) rows into unit rows of `outputs[key][index]`.

        Generating the projection costs as much as D x d random signs per pass, so rows are
        gathered up to `projection_memory_gb` of gradients and projected together.
        """
        per_pass = max(1, int(self.projection_memory_gb * 2 ** 30 // (4 * gradient_size)))
        pending = []

        def flush():
            projected = _unit_rows(project(torch.stack([g for _, _, g in pending]), self.projection_dim, seed))
            for (key, index, _), row in zip(pending, projected.cpu().numpy()):
                outputs[key][index] = row
            pending.clear()

        for row in rows:
            pending.append(row)
            if len(pending) == per_pass:
                flush()
        if pending:
            flush()

    def select(self, ctx: SelectionContext) -> Selection:
        pool, target = ctx.pool, ctx.target
        if not target:
            raise DeliftInputError("LESS needs target examples (the stage's dev or benchmark split)",
                                   field="stage.target")
        budget = self.budget(len(pool))
        lora, optim = self.warmup_options(ctx)
        loaded = ctx.model
        device = self._device(loaded.model)
        warmup = self.warmup_indices(len(pool), ctx.seed)
        key = content_hash("less/v3", loaded.identity, records_hash(pool), lora, optim, warmup, self.projection_dim,
                           PROJECTION_TILE_ROWS, ctx.seed, device.type, self.use_chat_template(ctx))
        target_key = records_hash(target)[:16]
        folder = cache_folder(ctx.cache_dir, "less", key) if ctx.cache_dir is not None else None
        files = [(folder / f"pool_epoch{e}.npy", folder / f"target_{target_key}_epoch{e}.npy")
                 for e in range(1, self.warmup_epochs + 1)] if folder else []
        lrs_path = folder / "epoch_lrs.json" if folder else None
        if folder and lrs_path.exists() and all(p.exists() and t.exists() for p, t in files):
            epoch_lrs = json.loads(lrs_path.read_text())
            pool_features = [load_npy(p, shape=(len(pool), self.projection_dim), dtype=np.float32) for p, _ in files]
            target_features = [load_npy(t, shape=(len(target), self.projection_dim), dtype=np.float32)
                               for _, t in files]
        else:
            epoch_lrs, pool_features, target_features = self._compute(ctx, loaded, lora, optim, warmup, device, files)
            if lrs_path:
                save_json(lrs_path, epoch_lrs)
        weights = lr_weights(epoch_lrs)
        scores = less_scores(pool_features, target_features, weights, target_subtasks(target))
        ranked = np.lexsort((np.arange(len(pool)), -scores))  # highest first, ties by index
        top = [int(i) for i in ranked[:budget]]
        return Selection(indices=top, scores=[float(scores[i]) for i in top],
                         info={"warmup_indices": warmup, "lr_weights": weights.tolist(),
                               "subtasks": sorted(set(target_subtasks(target))), "all_scores": scores.tolist()})

    def _compute(self, ctx, loaded, lora, optim, warmup, device, files):
        """Warm up, then features per checkpoint (written to `files` when caching)."""
        from delift.training import encode_for_selection, finetune

        base_device = next(loaded.model.parameters()).device
        requires_grad = {name: p.requires_grad for name, p in loaded.model.named_parameters()}
        chat = self.use_chat_template(ctx)
        key = "selector.optim.max_length" if "max_length" in self.optim else "train.optim.max_length"
        pool_examples, target_examples = (
            encode_for_selection(loaded.tokenizer, records, optim["max_length"], use_chat_template=chat, key=key,
                                 what=f"LESS {role} gradients", long_response="cut")
            for role, records in (("pool", ctx.pool), ("target", ctx.target)))
        with tempfile.TemporaryDirectory(prefix="less-warmup-") as scratch:
            output_dir = Path(ctx.output_dir) / "less_warmup" if ctx.output_dir is not None else Path(scratch)
            result = finetune(loaded, [ctx.pool[i] for i in warmup], lora=lora, optim=optim,
                              trainer_options=ctx.trainer_options, output_dir=output_dir, seed=ctx.seed,
                              save_epoch_checkpoints=True, use_chat_template=chat,
                              gradient_checkpointing=bool(ctx.train_options.get("gradient_checkpointing")))
            model = result.model
            try:
                model.to(device).eval()  # dropout off: each gradient is a deterministic function of the example
                params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
                epochs = range(1, len(result.epoch_checkpoints) + 1)
                parts = {(epoch, adam): np.zeros((len(examples), self.projection_dim), dtype=np.float32)
                         for epoch in epochs for adam, examples in ((True, pool_examples), (False, target_examples))}
                rows = self._all_gradient_rows(model, params, result.epoch_checkpoints, pool_examples,
                                               target_examples, device, ctx.progress)
                self.project_rows(rows, parts, sum(p.numel() for _, p in params), ctx.seed)
                for (epoch, adam), features in parts.items() if files else ():
                    save_npy(files[epoch - 1][0 if adam else 1], features)
                pool_features = [parts[(epoch, True)] for epoch in epochs]
                target_features = [parts[(epoch, False)] for epoch in epochs]
            finally:
                model.unload()  # removes the LoRA layers: ctx.model is the base model again
                for name, p in loaded.model.named_parameters():
                    p.requires_grad_(requires_grad.get(name, p.requires_grad))
                loaded.model.to(base_device).eval()
        return list(result.epoch_lrs), pool_features, target_features
