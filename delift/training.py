"""LoRA fine-tuning as a LightningModule, run by a Lightning Trainer.

The loss covers the response tokens only (prompt labels are -100). `finetune` wraps
`loaded.model` with a PEFT LoRA adapter in place (call `.unload()` on the result's model to get
the base model back) and saves the adapter in `output_dir/adapter`. With
`save_epoch_checkpoints=True` it also writes, per epoch, the adapter, the Adam moments by
parameter name and the epoch's mean learning rate: what LESS needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Sampler

from delift.errors import DeliftInputError
from delift.prompts import format_prompt

IGNORE_INDEX = -100


def encode_example(tokenizer, record: dict, max_length: int, *, use_chat_template: bool = True) -> dict:
    """Prompt + response + EOS as token ids, labels masked on the prompt.

    An over-long example loses the start of its prompt, never its response (unless the response
    alone exceeds max_length, when its end is cut).
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, record, use_chat_template=use_chat_template),
                           add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    response_ids = response_ids[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(response_ids))):]
    return {"input_ids": prompt_ids + response_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids}


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
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the batches it would have."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self.skip = 0  # examples of this epoch already trained on (a run resumed mid-epoch)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        return iter(order[self.skip:].tolist())

    def __len__(self) -> int:
        return self.n


class LoRAFineTuner(L.LightningModule):
    def __init__(self, model, *, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__()
        self.model = model
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, tuple(betas), eps
        self.strict_loading = False  # checkpoints hold the adapter only

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.lr, betas=self.betas, eps=self.eps,
                                 weight_decay=self.weight_decay)

    def on_train_start(self):
        self.on_train_epoch_start()  # a run resumed mid-epoch gets no epoch-start hook for that epoch

    def on_train_epoch_start(self):
        # Lightning replays a resumed epoch from its first batch; skip the batches already trained on.
        trainer, loader = self.trainer, self.trainer.train_dataloader
        if isinstance(loader.sampler, EpochSeededShuffle):
            done = (trainer.global_step * trainer.accumulate_grad_batches
                    - trainer.current_epoch * trainer.num_training_batches)
            loader.sampler.skip = max(0, done) * loader.batch_size

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
        mean_lr = sum(self._lrs) / len(self._lrs)
        (epoch_dir / "state.json").write_text(json.dumps({
            "epoch": trainer.current_epoch + 1, "step": trainer.global_step, "mean_lr": mean_lr,
            "betas": list(group["betas"]), "eps": group["eps"]}, indent=2))
        self.saved.append(epoch_dir)
        self.epoch_lrs.append(mean_lr)
        self._lrs = []


@dataclass
class FinetuneResult:
    model: torch.nn.Module
    adapter_dir: Path
    epoch_checkpoints: list[Path] = field(default_factory=list)
    epoch_lrs: list[float] = field(default_factory=list)
    seconds: float = 0.0


def finetune(loaded, records: list[dict], *, lora: dict, optim: dict, trainer_options: dict | None = None,
             output_dir, seed: int = 0, save_epoch_checkpoints: bool = False, logger=False,
             use_chat_template: bool = True, resume: bool = False,
             checkpoint_every_n_steps: int | None = None) -> FinetuneResult:
    """Fine-tune `loaded.model` with LoRA on `records`; returns the PEFT model in eval mode.

    `lora`: r, alpha, dropout, target_modules. `optim`: lr, epochs, batch_size, max_length,
    weight_decay, grad_accum. `trainer_options`: extra Lightning Trainer arguments. With
    `resume=True` training continues from `output_dir/checkpoints/last.ckpt` if it exists; that
    checkpoint (adapter + optimizer) is written every epoch, or every `checkpoint_every_n_steps`.
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
    model = get_peft_model(loaded.model, config)
    examples = [encode_example(tokenizer, r, optim["max_length"], use_chat_template=use_chat_template)
                for r in records]
    loader = DataLoader(examples, batch_size=optim["batch_size"], sampler=EpochSeededShuffle(len(examples), seed),
                        collate_fn=lambda batch: collate(batch, tokenizer.pad_token_id))
    model.train()
    module = LoRAFineTuner(model, lr=optim["lr"], weight_decay=optim.get("weight_decay", 0.0))
    cadence = {"every_n_train_steps": checkpoint_every_n_steps} if checkpoint_every_n_steps else {"every_n_epochs": 1}
    callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=output_dir / "checkpoints", save_last=True,
                                                     save_top_k=0, **cadence)]
    epoch_checkpoints = EpochCheckpoints(output_dir / "epoch_checkpoints") if save_epoch_checkpoints else None
    if epoch_checkpoints:
        callbacks.append(epoch_checkpoints)
    options = {"accelerator": "auto", "devices": 1, "enable_model_summary": False,
               "log_every_n_steps": 1} | dict(trainer_options or {})
    callbacks += list(options.pop("callbacks", None) or [])
    trainer = L.Trainer(max_epochs=optim["epochs"], accumulate_grad_batches=optim.get("grad_accum", 1),
                        logger=logger, callbacks=callbacks, default_root_dir=output_dir, **options)
    last = output_dir / "checkpoints" / "last.ckpt"
    trainer.fit(module, loader, ckpt_path=str(last) if resume and last.exists() else None, weights_only=True)
    model.eval()
    adapter_dir = output_dir / "adapter"
    model.save_pretrained(adapter_dir)
    return FinetuneResult(model, adapter_dir,
                          epoch_checkpoints.saved if epoch_checkpoints else [],
                          epoch_checkpoints.epoch_lrs if epoch_checkpoints else [],
                          time.perf_counter() - started)
