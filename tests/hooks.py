"""Test-only Lightning callbacks: stop a worker at a chosen point (after N kernel tiles or at optimizer step
N), no polling and no wall-clock, and record where a (resumed) fine-tuning started.

In-process they are passed as callbacks; through `python run.py` as a configured callback,
`'trainer.callbacks=[{_target_:tests.hooks.SigkillAt}]'` (run.py's folder is on sys.path, so `tests` imports),
armed by environment variables so that the killed run and its rerun have the same config:

    DELIFT_TEST_SIGKILL_STEP=N  SIGKILL this process as optimizer step N + 1 starts (the checkpoint of step N,
                                 saved every step, is on disk)
    DELIFT_TEST_SIGKILL_JOB=J   only in the multirun job number J (Hydra's job.num)
"""

from __future__ import annotations

import os
import signal

import lightning as L

STEP_VARIABLE, JOB_VARIABLE = "DELIFT_TEST_SIGKILL_STEP", "DELIFT_TEST_SIGKILL_JOB"


def _sigkill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hydra_job_num() -> int | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().job.num if HydraConfig.initialized() else None


class SigkillAt(L.Callback):
    """SIGKILLs its own process: after `tiles` finished kernel tiles (each tile is written in its predict
    step, so exactly that many are on disk), or as optimizer step `step` + 1 starts (`step` from the
    argument or $DELIFT_TEST_SIGKILL_STEP; $DELIFT_TEST_SIGKILL_JOB limits it to one multirun job)."""

    def __init__(self, tiles: int | None = None, step: int | None = None):
        self.tiles = tiles
        self.step = step if step is not None or tiles is not None else _int_env(STEP_VARIABLE)
        self.job = _int_env(JOB_VARIABLE)
        self.seen = 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.seen += 1
        if self.tiles is not None and self.seen >= self.tiles:
            _sigkill_self()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.step is None or trainer.global_step < self.step:
            return
        if self.job is None or self.job == _hydra_job_num():
            _sigkill_self()


class TrainStart(L.Callback):
    """Records the optimizer step each fit starts from (a resumed run: the checkpoint's step)."""

    starts: list[int] = []

    def on_train_start(self, trainer, pl_module):
        TrainStart.starts.append(trainer.global_step)


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None
