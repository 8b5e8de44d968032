"""The `delift` command (and `python run.py`): the Hydra app over the configs shipped in delift/conf."""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
# Spin-waiting OpenMP threads slow PyTorch many times over when another job shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
log = logging.getLogger("delift")

# Third-party lines a delift run has no use for: advertisements, import chatter, deprecations users cannot act on.
QUIET_LOGGERS = ("faiss.loader", "absl")
LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
QUIET_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's own use of torch's pytree
                  r"`is_gradient_checkpointing` is deprecated")  # peft reading the transformers attribute


class DropAdvertisements(logging.Filter):
    """Lightning's own lines (devices, resuming, ranks) stay; its product tips go."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_logs() -> None:
    """Each message once, in Hydra's format and log file; no third-party chatter in a default run."""
    import warnings

    import lightning  # noqa: F401 - its import adds a console handler of its own and resets levels: undone below

    # Hydra's root handlers already print and file every record the `lightning` loggers propagate.
    for handler in list(logging.getLogger("lightning").handlers):
        logging.getLogger("lightning").removeHandler(handler)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).addFilter(DropAdvertisements())
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def _input_error(err: BaseException):
    """The DeliftInputError behind `err`, if any (Hydra wraps errors raised while instantiating)."""
    from delift.errors import DeliftInputError

    while err is not None:
        if isinstance(err, DeliftInputError):
            return err
        err = err.__cause__ or err.__context__
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from delift.config import validate

    quiet_logs()
    try:
        validate(cfg)  # before anything loads: a bad value costs seconds, not a kernel
        from delift.pipeline import results_table, run

        results = run(cfg)
    except Exception as err:  # noqa: BLE001 - bad input becomes one line and exit 2; the rest re-raises
        problem = _input_error(err)
        if problem is None:
            raise
        print(f"delift: error: {problem}", file=sys.stderr)
        sys.exit(2)
    if results.get("rank_zero") is False:  # a DDP rank other than 0: rank 0 reports
        return None
    print(results_table(results))
    return results.get("metrics", {}).get(cfg.get("optimized_metric", "rouge1"))


if __name__ == "__main__":
    main()
