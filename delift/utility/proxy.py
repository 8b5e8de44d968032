"""A learned utility proxy: a small network that predicts UF[i, j] from the embeddings of row i and column j.

Exact UF costs one LLM forward pass per pair, so only a sample of pairs is measured; the proxy is trained on
them and predicts the other candidate pairs (millions of them). It follows NN-CIFT (an MLP on
concat(e_i, e_j) trained on a small share of the pairs) but by default gives the first layer the interaction
itself: `features="product"` feeds [e_i, e_j, e_i * e_j, cos(e_i, e_j)] (the network need not rebuild a
similarity out of ReLUs); "cosine" feeds [e_i, e_j, cos], "concat" NN-CIFT's [e_i, e_j].

Inputs: unit-norm float32 embeddings of every row record and every column record, and the measured pairs
(rows[k], cols[k]) with their exact utilities values[k]. Targets are z-scored with the training part's mean
and std; predictions come back in UF units.

Held-out split (`split_pairs`): a seeded `holdout` share of the pairs, or with `groups` of the groups, is
kept out of training. The caller passes the row index as the group, so the held-out rows are rows the
network never saw, as are the rows it is then applied to. Training (a Lightning Trainer, AdamW, CPU) stops
when the held-out MSE has not improved for `patience` epochs; the returned network is the best epoch's, and
`metrics` are measured with it on the held-out part. Same inputs + seed give bit-identical predictions.

Prediction is chunked (memory O(chunk), whatever the number of pairs). The first layer's row and column
blocks are computed once per record, so per pair only the interaction block and the later layers run; this
arithmetic is float64, rounded to float32 once, so the output does not depend on `chunk` (float32 BLAS
kernels sum in a different order for different batch sizes).

Cache: with `cache_dir`, `<cache_dir>/utility_proxy/<key>/` holds `network.safetensors` (the weights) and
`proxy.json` (config, target mean/std, metrics); key = content hash of the caller's `cache_parts`, the
resolved config, the seed and hashes of the embeddings, the pairs, their values and the groups. A second
call loads the network without training; an unreadable (half-written) file is retrained. Files are written
atomically; nothing is pickled.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping
from scipy import stats
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from delift.cache import (UnreadableCacheFile, cache_folder, content_hash, file_lock, load_safetensors, save_json,
                          save_safetensors)
from delift.errors import DeliftInputError

CACHE_KIND = "utility_proxy"
WEIGHTS_FILE = "network.safetensors"
META_FILE = "proxy.json"
FEATURES = ("product", "cosine", "concat")
MIN_PAIRS = 10
SAMPLE_FIELD = "kernel.proxy.sample"
CONFIG_FIELD = "kernel.proxy.network"
_EPS = 1e-12  # guards the cosine of a zero vector

# Sized for a few hundred to a few thousand pairs of 384-dim embeddings (~150k weights): one hidden layer
# of 128, light dropout and weight decay, and early stopping on the held-out MSE keep it from memorising
# the sample; batches of 64 give a few dozen steps per epoch even on a small sample.
PROXY_DEFAULTS = {
    "features": "product",
    "hidden": 128,
    "layers": 2,
    "dropout": 0.1,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "batch_size": 64,
    "max_epochs": 200,
    "patience": 10,
    "holdout": 0.2,
}


def resolve_config(config: dict | None) -> dict:
    """PROXY_DEFAULTS with `config`'s overrides, checked."""
    resolved = PROXY_DEFAULTS | dict(config or {})
    unknown = sorted(set(resolved) - set(PROXY_DEFAULTS))
    if unknown:
        raise DeliftInputError(f"unknown option(s) {unknown}; known: {sorted(PROXY_DEFAULTS)}", field=CONFIG_FIELD)
    if resolved["features"] not in FEATURES:
        raise DeliftInputError(f"unknown features {resolved['features']!r}; choose one of {list(FEATURES)}",
                               field=f"{CONFIG_FIELD}.features")
    for key in ("hidden", "layers", "batch_size", "max_epochs", "patience"):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeliftInputError(f"must be a positive integer, got {value!r}", field=f"{CONFIG_FIELD}.{key}")
    for key, wanted, ok in (("dropout", "in [0, 1)", lambda v: 0 <= v < 1),
                            ("holdout", "in (0, 1)", lambda v: 0 < v < 1),
                            ("lr", "> 0", lambda v: v > 0), ("weight_decay", ">= 0", lambda v: v >= 0)):
        value = resolved[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise DeliftInputError(f"must be a number {wanted}, got {value!r}", field=f"{CONFIG_FIELD}.{key}")
    return resolved


def feature_width(features: str, dim: int) -> int:
    return {"product": 3 * dim + 1, "cosine": 2 * dim + 1, "concat": 2 * dim}[features]


def pair_features(e_i: torch.Tensor, e_j: torch.Tensor, features: str) -> torch.Tensor:
    """The network's input for pairs (e_i[k], e_j[k]); `FittedProxy.predict` computes the same in split form."""
    if features == "concat":
        return torch.cat([e_i, e_j], dim=-1)
    product = e_i * e_j
    norms = e_i.norm(dim=-1, keepdim=True) * e_j.norm(dim=-1, keepdim=True)
    cosine = product.sum(-1, keepdim=True) / norms.clamp_min(_EPS)
    return torch.cat([e_i, e_j, product, cosine] if features == "product" else [e_i, e_j, cosine], dim=-1)


class ProxyNetwork(nn.Module):
    """MLP on pair features: `layers` Linear layers (hidden width `hidden`), ReLU + Dropout between them."""

    def __init__(self, dim: int, config: dict):
        super().__init__()
        self.dim, self.features = dim, config["features"]
        widths = [feature_width(self.features, dim)] + [config["hidden"]] * (config["layers"] - 1) + [1]
        blocks = []
        for k in range(config["layers"]):
            blocks.append(nn.Linear(widths[k], widths[k + 1]))
            if k < config["layers"] - 1:
                blocks += [nn.ReLU(), nn.Dropout(config["dropout"])]
        self.mlp = nn.Sequential(*blocks)

    def forward(self, e_i: torch.Tensor, e_j: torch.Tensor) -> torch.Tensor:
        return self.mlp(pair_features(e_i, e_j, self.features)).squeeze(-1)


@dataclass
class FittedProxy:
    network: ProxyNetwork  # eval mode, on CPU
    config: dict
    target_mean: float
    target_std: float
    metrics: dict

    def predict(self, row_vectors: np.ndarray, col_vectors: np.ndarray, rows: np.ndarray, cols: np.ndarray, *,
                chunk: int = 8192) -> np.ndarray:
        """float32 UF predictions for the pairs (rows[k], cols[k]), `chunk` pairs at a time.

        Pass all pairs in one call: the first layer's per-record blocks are computed once per call."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise DeliftInputError(f"chunk must be a positive integer, got {chunk!r}", field="kernel.proxy.chunk")
        row_vectors, col_vectors, rows, cols = _check_pairs(row_vectors, col_vectors, rows, cols,
                                                            field="kernel.proxy.pairs", dim=self.network.dim)
        first = self.network.mlp[0]
        later = copy.deepcopy(self.network.mlp[1:]).double()
        # The first layer's weight splits along its input into blocks for e_i, e_j[, e_i * e_j][, cos].
        blocks = first.weight.detach().double().split(self.network.dim, dim=1)
        used_rows, row_of = np.unique(rows, return_inverse=True)
        used_cols, col_of = np.unique(cols, return_inverse=True)
        predicted = np.empty(len(rows), dtype=np.float32)
        with torch.inference_mode():
            row_part, row_norm = _project(row_vectors, used_rows, blocks[0], chunk)
            col_part, col_norm = _project(col_vectors, used_cols, blocks[1], chunk)
            row_part += first.bias.detach().double()
            for start in range(0, len(rows), chunk):
                span = slice(start, start + chunk)
                r, c = torch.from_numpy(row_of[span]), torch.from_numpy(col_of[span])
                hidden = row_part[r] + col_part[c]
                if self.network.features != "concat":
                    # e_i * e_j rounded to float32 as in training, then summed in float64.
                    e_i, e_j = torch.from_numpy(row_vectors[rows[span]]), torch.from_numpy(col_vectors[cols[span]])
                    product = (e_i * e_j).double()
                    cosine = product.sum(-1) / (row_norm[r] * col_norm[c]).clamp_min(_EPS)
                    if self.network.features == "product":
                        hidden += product @ blocks[2].T
                    hidden += cosine[:, None] * blocks[-1].T
                predicted[span] = (later(hidden).squeeze(-1) * self.target_std + self.target_mean).numpy()
        return predicted


def _project(vectors: np.ndarray, used: np.ndarray, weight: torch.Tensor, chunk: int):
    """(vectors[used] @ weight.T, the norms of vectors[used]) in float64, `chunk` records at a time."""
    projected = torch.empty((len(used), weight.shape[0]), dtype=torch.float64)
    norms = torch.empty(len(used), dtype=torch.float64)
    for start in range(0, len(used), chunk):
        block = torch.from_numpy(vectors[used[start:start + chunk]]).double()
        projected[start:start + chunk] = block @ weight.T
        norms[start:start + chunk] = block.norm(dim=-1)
    return projected, norms


def _check_pairs(row_vectors, col_vectors, rows, cols, *, field: str, dim: int | None = None):
    row_vectors = np.asarray(row_vectors, dtype=np.float32)
    col_vectors = np.asarray(col_vectors, dtype=np.float32)
    if row_vectors.ndim != 2 or col_vectors.ndim != 2 or row_vectors.shape[1] != col_vectors.shape[1]:
        raise DeliftInputError(f"row and column embeddings must be 2-D with one width, got {row_vectors.shape} and "
                               f"{col_vectors.shape}", field=field)
    if dim is not None and row_vectors.shape[1] != dim:
        raise DeliftInputError(f"the proxy was trained on {dim}-dim embeddings, got {row_vectors.shape[1]}",
                               field=field)
    rows, cols = np.asarray(rows), np.asarray(cols)
    if rows.ndim != 1 or rows.shape != cols.shape:
        raise DeliftInputError(f"rows and cols must be 1-D of one length, got {rows.shape} and {cols.shape}",
                               field=field)
    for name, index, bound in (("rows", rows, len(row_vectors)), ("cols", cols, len(col_vectors))):
        if len(index) and (not np.issubdtype(index.dtype, np.integer) or index.min() < 0 or index.max() >= bound):
            raise DeliftInputError(f"{name} must be integer indices in [0, {bound})", field=field)
    return row_vectors, col_vectors, rows.astype(np.int64), cols.astype(np.int64)


def split_pairs(n: int, groups: np.ndarray | None, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) pair indices, sorted: a seeded `holdout` share of the pairs, or of the groups.

    With groups, every pair of a held-out group is held out, so no held-out group is seen in training."""
    rng = np.random.default_rng([seed, 2])  # a stream apart from the sampling of the pairs (sparse.proxy_sample)
    held = np.zeros(n, dtype=bool)
    if groups is None:
        count = min(n - 1, max(2, round(holdout * n)))
        held[rng.permutation(n)[:count]] = True
    else:
        labels = np.unique(groups)
        if len(labels) >= 2:
            count = min(len(labels) - 1, max(1, round(holdout * len(labels))))
            held = np.isin(groups, rng.permutation(labels)[:count])
    if n < MIN_PAIRS or held.sum() < 2:
        sample = f"{n} measured pairs" + ("" if groups is None else f" of {len(np.unique(groups))} group(s) (rows)")
        need = f"at least {MIN_PAIRS} pairs" + ("" if groups is None else " in 2 or more groups") + ", 2 held out"
        raise DeliftInputError(f"{sample} are too few to train the proxy and hold some out to test it: it needs "
                               f"{need}; sample more", field=SAMPLE_FIELD)
    return np.flatnonzero(~held), np.flatnonzero(held)


class ProxyModule(L.LightningModule):
    """Trains the network on z-scored targets; keeps the weights of the epoch with the lowest held-out MSE."""

    def __init__(self, network: ProxyNetwork, row_vectors: torch.Tensor, col_vectors: torch.Tensor, *, lr: float,
                 weight_decay: float):
        super().__init__()
        self.network = network
        # Buffers follow the module to its device; not persistent: the saved weights are the network's alone.
        self.register_buffer("row_vectors", row_vectors, persistent=False)
        self.register_buffer("col_vectors", col_vectors, persistent=False)
        self.lr, self.weight_decay = lr, weight_decay
        self.heldout_mse: list[float] = []  # per epoch, z-scored units
        self.best_state: dict | None = None
        self._squared_error, self._count = 0.0, 0

    def _predicted(self, batch):
        rows, cols, target = batch
        return self.network(self.row_vectors[rows], self.col_vectors[cols]), target

    def training_step(self, batch, batch_idx):
        predicted, target = self._predicted(batch)
        return nn.functional.mse_loss(predicted, target)

    def on_validation_epoch_start(self):
        self._squared_error, self._count = 0.0, 0

    def validation_step(self, batch, batch_idx):
        predicted, target = self._predicted(batch)
        self._squared_error += float(((predicted - target).double() ** 2).sum())
        self._count += len(target)

    def on_validation_epoch_end(self):
        mse = self._squared_error / self._count
        self.log("heldout_mse", mse)  # EarlyStopping monitors it
        if not self.heldout_mse or mse < min(self.heldout_mse):
            self.best_state = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        self.heldout_mse.append(mse)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.network.parameters(), lr=self.lr, weight_decay=self.weight_decay)


@contextmanager
def _quiet_training():
    """Silences Lightning's device lines, its advice to use dataloader workers (the data is a few in-memory
    tensors) and a deprecation notice; puts back torch's global deterministic-algorithms switch, which
    deterministic=True turns on."""
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero_log.level
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    rank_zero_log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message="GPU available but not used.*")
            # Lightning 2.6's pytree helper on torch 2.13, raised once per batch.
            warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*", category=FutureWarning)
            yield
    finally:
        rank_zero_log.setLevel(level)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _train(row_vectors, col_vectors, rows, cols, values, train, heldout, config: dict, seed: int,
           progress: bool) -> FittedProxy:
    started = time.perf_counter()
    L.seed_everything(seed, workers=True, verbose=False)
    mean = float(values[train].astype(np.float64).mean())
    std = float(values[train].astype(np.float64).std()) or 1.0  # a constant target has nothing to scale
    # The module holds only the records the sample uses, indexed locally.
    used_rows, local_rows = np.unique(rows, return_inverse=True)
    used_cols, local_cols = np.unique(cols, return_inverse=True)
    targets = torch.from_numpy(((values - mean) / std).astype(np.float32))

    def loader(part, batch_size: int, generator=None):
        # Whole batches are fetched by one tensor index (batch_size=None): no per-pair collation.
        order = RandomSampler(part, generator=generator) if generator is not None else SequentialSampler(part)
        data = TensorDataset(torch.from_numpy(local_rows[part]), torch.from_numpy(local_cols[part]),
                             targets[torch.from_numpy(part)])
        return DataLoader(data, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last=False))

    network = ProxyNetwork(row_vectors.shape[1], config)
    module = ProxyModule(network, torch.from_numpy(row_vectors[used_rows]), torch.from_numpy(col_vectors[used_cols]),
                         lr=config["lr"], weight_decay=config["weight_decay"])
    with _quiet_training():
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=progress, enable_model_summary=False, deterministic=True,
                            max_epochs=config["max_epochs"], num_sanity_val_steps=0,
                            callbacks=[EarlyStopping("heldout_mse", mode="min", patience=config["patience"])])
        trainer.fit(module, loader(train, config["batch_size"], torch.Generator().manual_seed(seed)),
                    loader(heldout, 4096))
    network.load_state_dict(module.best_state)
    network.eval()
    proxy = FittedProxy(network, config, mean, std, {})
    predicted = proxy.predict(row_vectors, col_vectors, rows[heldout], cols[heldout]).astype(np.float64)
    truth = values[heldout].astype(np.float64)
    proxy.metrics = {
        "heldout_mse": float(np.mean((predicted - truth) ** 2)),
        "heldout_spearman": float(stats.spearmanr(predicted, truth).statistic),
        "heldout_pearson": float(stats.pearsonr(predicted, truth).statistic),
        "n_train": int(len(train)),
        "n_heldout": int(len(heldout)),
        "epochs": len(module.heldout_mse),
        "best_epoch": int(np.argmin(module.heldout_mse)) + 1,
        "train_seconds": time.perf_counter() - started,
    }
    return proxy


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _load(folder: Path, config: dict, dim: int) -> FittedProxy | None:
    """The cached proxy, or None if absent or unreadable (a crash mid-write elsewhere: retrain)."""
    if not (folder / META_FILE).exists() or not (folder / WEIGHTS_FILE).exists():
        return None
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
        weights = load_safetensors(folder / WEIGHTS_FILE)
    except (UnreadableCacheFile, ValueError, OSError):
        return None
    network = ProxyNetwork(dim, config)
    try:
        network.load_state_dict(weights)
        proxy = FittedProxy(network.eval(), meta["config"], meta["target_mean"], meta["target_std"], meta["metrics"])
    except (RuntimeError, KeyError, TypeError) as err:
        raise DeliftInputError(f"does not hold this proxy ({err}); this cache entry is not ours: delete it to "
                               "recompute", file=folder) from err
    return proxy


def fit_proxy(row_vectors: np.ndarray, col_vectors: np.ndarray, rows: np.ndarray, cols: np.ndarray,
              values: np.ndarray, *, config: dict | None = None, seed: int = 0, groups: np.ndarray | None = None,
              cache_dir=None, cache_parts: dict | None = None, progress: bool = True) -> FittedProxy:
    """Train the proxy on the measured pairs (rows[k], cols[k]) -> values[k]; see the module docstring.

    `groups[k]` (e.g. the row index) makes the held-out split hold out whole groups."""
    config = resolve_config(config)
    row_vectors, col_vectors, rows, cols = _check_pairs(row_vectors, col_vectors, rows, cols, field=SAMPLE_FIELD)
    values = np.asarray(values, dtype=np.float32)
    if values.shape != rows.shape or not np.isfinite(values).all():
        raise DeliftInputError(f"values must be finite, one per pair ({len(rows)}), got shape {values.shape}",
                               field=SAMPLE_FIELD)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != rows.shape:
            raise DeliftInputError(f"groups must be one per pair ({len(rows)}), got shape {groups.shape}",
                                   field=SAMPLE_FIELD)
    train, heldout = split_pairs(len(rows), groups, config["holdout"], seed)
    if cache_dir is None:
        return _train(row_vectors, col_vectors, rows, cols, values, train, heldout, config, seed, progress)
    key = content_hash({"parts": cache_parts, "config": config, "seed": seed, "row_vectors": _digest(row_vectors),
                        "col_vectors": _digest(col_vectors), "pairs": _digest(rows, cols, values),
                        "groups": None if groups is None else _digest(groups)})
    folder = cache_folder(cache_dir, CACHE_KIND, key)
    with file_lock(folder / WEIGHTS_FILE):
        proxy = _load(folder, config, row_vectors.shape[1])
        if proxy is None:
            proxy = _train(row_vectors, col_vectors, rows, cols, values, train, heldout, config, seed, progress)
            save_safetensors(folder / WEIGHTS_FILE, proxy.network.state_dict())
            save_json(folder / META_FILE, {"config": proxy.config, "target_mean": proxy.target_mean,
                                           "target_std": proxy.target_std, "metrics": proxy.metrics})
    return proxy
