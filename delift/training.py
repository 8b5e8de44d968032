"""LoRA fine-tuning as a LightningModule, run by a Lightning Trainer.

The loss covers the response tokens only (prompt labels are -100). `finetune` wraps
`loaded.model` with a PEFT LoRA adapter in place (call `.unload()` on the result's model to get
the base model back) and saves the adapter in `output_dir/adapter`. With
`save_epoch_checkpoints=True` it also writes, per epoch, the adapter, the Adam moments by
parameter name and the epoch's mean learning rate: what LESS needs.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Sampler

from delift.config import Schedule
from delift.devices import build_trainer, is_quantized, kept_in_place, model_device, trainer_arguments
from delift.errors import DeliftInputError
from delift.prompts import format_prompt, response_token_ids

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def encode_example(tokenizer, record: dict, max_length: int, *, use_chat_template: bool = True) -> dict:
    """Prompt + response + EOS as token ids, labels masked on the prompt.

    An over-long example loses the start of its prompt, never its response (unless the response
    alone exceeds max_length, when its end is cut); `cut` says whether it was shortened.
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, record, use_chat_template=use_chat_template),
                           add_special_tokens=False)["input_ids"]
    response_ids = response_token_ids(tokenizer, record)
    cut = len(prompt_ids) + len(response_ids) > max_length
    response_ids = response_ids[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(response_ids))):]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
            "cut": cut}


def encode_for_selection(tokenizer, records: list[dict], max_length: int, *, use_chat_template: bool, key: str,
                         what: str, long_response: str = "error") -> list[dict]:
    """`encode_example` for every record, as the selectors that read the model fit records: an over-long
    one loses the start of its prompt and keeps its response, with one warning naming `key` (the config key
    of `max_length`) and how many records. A response that does not fit alone is an error naming `key`,
    or, with `long_response="cut"` (LESS: its gradients are those of fine-tuning's loss), loses its end
    as in fine-tuning, and the warning counts it."""
    examples, too_long = [], 0
    for record in records:
        response = len(response_token_ids(tokenizer, record))
        if response > max_length:
            if long_response == "error":
                raise DeliftInputError(f"the response is {response} tokens with its EOS, more than {key}="
                                       f"{max_length} ({what} keeps responses whole): raise {key} or drop the record",
                                       record=record["id"], field="output")
            too_long += 1
        examples.append(encode_example(tokenizer, record, max_length, use_chat_template=use_chat_template))
    cut = sum(e["cut"] for e in examples)
    if cut:
        log.warning("%d of %d records exceed %s=%d tokens (%s): their prompts lose their start (the response is kept "
                    "whole%s); raise %s to keep them whole", cut, len(examples), key, max_length, what,
                    f"; {too_long} responses longer than that alone lose their end" if too_long else "", key)
    return examples


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a batch; padding is masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class EpochSeededShuffle(Sampler):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the batches it would have.

    Under DDP (`shard`) rank r takes every world-th example of that one order, so with a per-rank
    batch of batch_size / world the ranks together hold exactly the examples one process would
    batch; a rank left short is padded with index `pad_index` (an example with no scored token),
    since every rank must run the same number of steps.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self.rank, self.world = 0, 1
        self.skip = 0  # examples of this epoch already trained on (a run resumed mid-epoch)

    @property
    def pad_index(self) -> int:
        return self.n

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        remaining = order[self.skip:].tolist()
        share = remaining[self.rank::self.world]
        return iter(share + [self.pad_index] * (-(-len(remaining) // self.world) - len(share)))

    def __len__(self) -> int:
        return -(-self.n // self.world)


SCHEDULES = get_args(Schedule)


class LoRAFineTuner(L.LightningModule):
    def __init__(self, model, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 schedule: str = "constant", warmup_ratio: float = 0.0):
        super().__init__()
        if schedule not in SCHEDULES:
            raise DeliftInputError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}",
                                   field="train.optim.schedule")
        if not 0.0 <= warmup_ratio < 1.0:
            raise DeliftInputError(f"must be in [0, 1), got {warmup_ratio}", field="train.optim.warmup_ratio")
        self.model = model
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.schedule, self.warmup_ratio = schedule, warmup_ratio
        self.strict_loading = False  # checkpoints hold the adapter only

    def training_step(self, batch, batch_idx):
        # The loss is the mean over the response tokens of the step's whole batch, wherever they are:
        # each rank divides its token sum by (global token count / world size) and DDP averages the
        # gradients, so N processes take the steps one process would.
        world = self.trainer.world_size
        scored = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        total = self.all_gather(scored).sum() if world > 1 else scored
        loss = self.model(**batch, num_items_in_batch=total.float() / world).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=world > 1)
        return loss

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.lr, betas=self.betas, eps=self.eps,
                                      weight_decay=self.weight_decay)
        if self.schedule == "constant" and self.warmup_ratio == 0.0:
            return optimizer
        from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

        # As HF's Trainer: ceil(warmup_ratio x optimizer steps) of linear warm-up, then constant or linear decay to 0.
        total = int(self.trainer.estimated_stepping_batches)
        warmup = math.ceil(self.warmup_ratio * total)
        scheduler = (get_linear_schedule_with_warmup(optimizer, warmup, total) if self.schedule == "linear"
                     else get_constant_schedule_with_warmup(optimizer, warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self):
        self.on_train_epoch_start()  # a run resumed mid-epoch gets no epoch-start hook for that epoch

    def on_train_epoch_start(self):
        # Lightning replays a resumed epoch from its first batch; skip the batches already trained on.
        trainer, loader = self.trainer, self.trainer.train_dataloader
        if isinstance(loader.sampler, EpochSeededShuffle):
            # An epoch ends with an optimizer step even when its last accumulation is short.
            batches = trainer.num_training_batches
            steps_per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
            steps_this_epoch = trainer.global_step - trainer.current_epoch * steps_per_epoch
            done = min(batches, max(0, steps_this_epoch * trainer.accumulate_grad_batches))
            loader.sampler.skip = done * loader.batch_size * trainer.world_size

    def on_save_checkpoint(self, checkpoint):
        # Resumable checkpoints carry the adapter only, not the frozen base model.
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


class EpochCheckpoints(L.Callback):
    """Per epoch: adapter, Adam moments by parameter name, and the epoch's mean learning rate."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.saved: list[Path] = []
        self.epoch_lrs: list[float] = []
        self._lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        epoch_dir = self.folder / f"epoch_{trainer.current_epoch + 1}"
        mean_lr = sum(self._lrs) / len(self._lrs)
        self.saved.append(epoch_dir)
        self.epoch_lrs.append(mean_lr)
        self._lrs = []
        if trainer.is_global_zero:  # DDP ranks hold the same adapter and moments: one writes, all wait
            self._write(epoch_dir, trainer, pl_module, mean_lr)
        trainer.strategy.barrier("epoch-checkpoint-written")

    @staticmethod
    def _write(epoch_dir: Path, trainer, pl_module, mean_lr: float) -> None:
        pl_module.model.save_pretrained(epoch_dir)
        optimizer = trainer.optimizers[0]
        moments = {}
        for name, param in pl_module.model.named_parameters():
            state = optimizer.state.get(param)
            if param.requires_grad and state:
                moments[f"exp_avg/{name}"] = state["exp_avg"].detach().cpu().contiguous()
                moments[f"exp_avg_sq/{name}"] = state["exp_avg_sq"].detach().cpu().contiguous()
        save_file(moments, str(epoch_dir / "optimizer.safetensors"))
        group = optimizer.param_groups[0]
        (epoch_dir / "state.json").write_text(json.dumps({
            "epoch": trainer.current_epoch + 1, "step": trainer.global_step, "mean_lr": mean_lr,
            "betas": list(group["betas"]), "eps": group["eps"]}, indent=2))


@dataclass
class FinetuneResult:
    model: torch.nn.Module
    adapter_dir: Path
    epoch_checkpoints: list[Path] = field(default_factory=list)
    epoch_lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0


def prepare_for_training(model, gradient_checkpointing: bool = False):
    """QLoRA's preparation of a 4-bit model (norms in fp32, inputs that carry gradients), and gradient
    checkpointing (activations recomputed in the backward pass: far less memory for ~30 % more time)."""
    checkpointing = {"use_reentrant": False}
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                               gradient_checkpointing_kwargs=checkpointing)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    return model


def finetune(loaded, records: list[dict], *, lora: dict, optim: dict, trainer_options: dict | None = None,
             output_dir, seed: int = 0, save_epoch_checkpoints: bool = False, logger=False,
             use_chat_template: bool = True, resume: bool = False, checkpoint_every_n_steps: int | None = None,
             gradient_checkpointing: bool = False) -> FinetuneResult:
    """Fine-tune `loaded.model` with LoRA on `records`; returns the PEFT model in eval mode, on the
    device the model was on (Lightning's teardown would leave it on CPU).

    `lora`: r, alpha, dropout, target_modules. `optim`: lr, epochs, batch_size (the global batch:
    under DDP each of N ranks takes batch_size / N), max_length, weight_decay, grad_accum, schedule
    (constant | linear decay to 0) and warmup_ratio (linear warm-up over that share of the steps).
    `trainer_options`: Lightning Trainer arguments (delift.devices.trainer_arguments: accelerator and
    precision `auto` follow the model's device). With `resume=True` training continues from
    `output_dir/checkpoints/last.ckpt` if it exists; that checkpoint (adapter + optimizer) is written
    every epoch, or every `checkpoint_every_n_steps`. Only rank 0 writes files.
    """
    import time

    if not records:
        raise DeliftInputError("nothing to fine-tune on: the selected subset is empty", field="selection")
    started = time.perf_counter()
    output_dir = Path(output_dir)
    L.seed_everything(seed, workers=True, verbose=False)
    tokenizer = loaded.tokenizer
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM")
    model = get_peft_model(prepare_for_training(loaded.model, gradient_checkpointing), config)
    examples = [encode_example(tokenizer, r, optim["max_length"], use_chat_template=use_chat_template)
                for r in records]
    cut = sum(e.pop("cut") for e in examples)
    if cut:
        log.warning("%d of %d training examples exceed train.optim.max_length=%d tokens: their prompts lose their "
                    "start (the response is kept whole where it fits); raise train.optim.max_length to keep them",
                    cut, len(examples), optim["max_length"])
    sampler = EpochSeededShuffle(len(examples), seed)
    examples.append({"input_ids": [tokenizer.pad_token_id], "labels": [IGNORE_INDEX]})  # a rank's padding
    cadence = {"every_n_train_steps": checkpoint_every_n_steps} if checkpoint_every_n_steps else {"every_n_epochs": 1}
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True,
                                                     save_top_k=0, **cadence)]
    epoch_checkpoints = EpochCheckpoints(output_dir / "epoch_checkpoints") if save_epoch_checkpoints else None
    if epoch_checkpoints:
        callbacks.append(epoch_checkpoints)
    options = {"devices": 1, "enable_model_summary": False, "log_every_n_steps": 1} | trainer_arguments(
        trainer_options, model_device(model))
    # The sampler shards the data itself (Lightning's distributed sampler would not pass epochs on to it).
    trainer = build_trainer(options, max_epochs=optim["epochs"], accumulate_grad_batches=optim.get("grad_accum", 1),
                            logger=logger, callbacks=callbacks, default_root_dir=output_dir,
                            use_distributed_sampler=False)
    if optim["batch_size"] % trainer.world_size:
        raise DeliftInputError(f"the batch of {optim['batch_size']} is split over {trainer.world_size} processes: "
                               "make it a multiple of their number", field="train.optim.batch_size")
    sampler.shard(trainer.global_rank, trainer.world_size)
    loader = DataLoader(examples, batch_size=optim["batch_size"] // trainer.world_size, sampler=sampler,
                        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id))
    model.train()
    module = LoRAFineTuner(model, lr=optim["lr"], weight_decay=optim.get("weight_decay", 0.0),
                           schedule=optim.get("schedule", "constant"), warmup_ratio=optim.get("warmup_ratio", 0.0))
    last = output_dir / "checkpoints" / "last.ckpt"
    with kept_in_place(model):
        trainer.fit(module, loader, ckpt_path=str(last) if resume and last.exists() else None, weights_only=True)
    model.eval()
    adapter_dir = output_dir / "adapter"
    if trainer.is_global_zero:
        model.save_pretrained(adapter_dir)
    return FinetuneResult(model, adapter_dir,
                          epoch_checkpoints.saved if epoch_checkpoints else [],
                          epoch_checkpoints.epoch_lrs if epoch_checkpoints else [],
                          time.perf_counter() - started)
