"""The `delift` command (and `python run.py`): the Hydra app over the configs shipped in delift/conf.

`main(argv)` runs it from Python too (`delift.cli.main(["task=select", ...])`). Every way a command
line can be wrong ends the same way, before anything loads: one `delift: error:` line on stderr and
exit status 2; a misspelt key or group option names the closest valid one ("did you mean ...?").
Every job's console output ends with a line naming its run folder; a job that fails leaves its error
in that folder (cli.log, and a FAILED file with the exit status), and its W&B run ends with the
command's exit status.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

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
# Hydra's flags that take a value (the rest of argv are overrides).
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun")
CONF_DIR = Path(__file__).parent / "conf"


class DropAdvertisements(logging.Filter):
    """Lightning's own lines (devices, resuming, ranks) stay; its product tips go."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_logs() -> None:
    """Each message once, in Hydra's format and log file; no third-party chatter in a default run (nor
    from the Python API, which calls this too)."""
    import warnings

    import lightning  # noqa: F401 - its import adds a console handler of its own and resets levels: undone below

    # Hydra's root handlers already print and file every record the `lightning` loggers propagate. Without
    # them (the Python API) Lightning gives its own loggers a console handler that stops propagation: its
    # INFO lines (devices, `Trainer.fit` stopped) would print on every call. Its warnings still reach the root.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropAdvertisements) for f in logger.filters):
            logger.addFilter(DropAdvertisements())
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


# -- failed jobs ---------------------------------------------------------------------------------------


def _shown(folder: Path) -> str:
    """The run folder as the user best finds it: relative to the working directory when inside it."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def _run_folder(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    try:
        return Path(cfg.paths.output_dir)
    except Exception:  # noqa: BLE001 - an unresolvable paths node is itself the error being reported
        return Path(HydraConfig.get().runtime.output_dir)


def _to_log_file(line: str) -> None:
    """`line` into the job's log file (cli.log) only: the console gets it once, from stderr."""
    record = logging.LogRecord("delift", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _fail(err: BaseException, folder: Path) -> None:
    """Record a failed job in its run folder (cli.log, FAILED), end its console output with the run
    folder, and exit with the command's status: 2 and one `delift: error:` line for bad input, 1 and the
    traceback otherwise (inside a multirun that error goes on to Hydra, and the sweep goes on)."""
    from delift.devices import is_global_zero
    from delift.errors import exit_status, input_error
    from delift.pipeline import FAILED_FILE

    problem, code = input_error(err), exit_status(err)
    reason = str(problem) if problem is not None else f"{type(err).__name__}: {err}".strip()
    line = f"delift: error: {reason.splitlines()[0] if reason else type(err).__name__}"
    if not is_global_zero():
        raise err
    _to_log_file(line if problem is not None else line + "\n" + traceback.format_exc().rstrip())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED_FILE).write_text(f"exit status {code}\n{line}\n", encoding="utf-8")
    if problem is not None:
        print(line, file=sys.stderr)
    else:
        traceback.print_exc()
    sys.stderr.flush()
    print(f"run folder: {_shown(folder)} (failed, exit status {code}: the error is in its cli.log and FAILED)",
          flush=True)
    if problem is None and _multirun():
        raise err
    sys.exit(code)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _job(cfg: DictConfig) -> float | None:
    """One job of the command (a multirun runs this once per job)."""
    from delift.config import validate

    quiet_logs()
    folder = _run_folder(cfg)
    try:
        validate(cfg)  # before anything loads: a bad value costs seconds, not a kernel
        from delift.pipeline import results_table, run

        results = run(cfg)
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - recorded, then the command's exit status
        _fail(err, folder)
    if results.get("rank_zero") is False:  # a DDP rank other than 0: rank 0 reports
        return None
    print(results_table(results))
    print(f"run folder: {_shown(folder)}", flush=True)
    return results.get("metrics", {}).get(cfg.get("optimized_metric", "rouge1"))


# -- the command line ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    """`delift [group=option ...] [key=value ...]`; `argv` defaults to the process's arguments. A
    misspelt key or option exits 2 with one line, as a bad value does (config.validate)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    args = list(sys.argv[1:] if argv is None else argv)
    saved_argv, saved_full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [sys.argv[0] if sys.argv and sys.argv[0] else "delift", *args]
    # Hydra prints composition errors itself, with its advice to add typos with `+`; in full they reach us.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    GlobalHydra.instance().clear()
    try:
        _job()
    except (ConfigCompositionException, MissingConfigException, OverrideParseException) as err:
        print(f"delift: error: {explain_composition_error(err, overrides_of(args))}", file=sys.stderr)
        sys.exit(2)
    finally:
        sys.argv = saved_argv
        if saved_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_full_error
        GlobalHydra.instance().clear()


def overrides_of(args: Sequence[str]) -> list[str]:
    """The overrides among command-line arguments (without Hydra's flags and their values)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in HYDRA_VALUE_FLAGS
        else:
            out.append(arg)
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _parsed(overrides: Sequence[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - unparsable overrides: no suggestion, the error says why
        return []


def _group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _groups() -> list[str]:
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", "hydra")))


def explain_composition_error(err: BaseException, overrides: Sequence[str]) -> str:
    """Hydra's composition error as one line: the key or option, and the nearest valid name."""
    from hydra.errors import MissingConfigException, OverrideParseException

    from delift.schema import closest

    message = str(err)
    if isinstance(err, MissingConfigException) and "/" in (err.missing_cfg_file or ""):
        group, option = err.missing_cfg_file.rsplit("/", 1)
        options = sorted(err.options or _group_options(group))
        key, sign = _override_choosing(group, option, overrides)
        match = closest(option, options)
        hint = f"did you mean `{sign}{key}={match}`? " if match else ""
        return f"field '{key}': {option!r} is not an option of {group}; {hint}(its options: {', '.join(options)})"
    overridden = re.search(r"Could not (?:override|delete)(?: from config\.)? '([^']+)'", message)
    if overridden is not None:
        key = overridden.group(1)
        if key.split("@", 1)[0] == "dataset" and "@" not in key:
            return ("field 'dataset': there is no top-level dataset: a dataset is a source of a stage's role. Your "
                    "own file: stage=file stage.pool=PATH (see delift --help); a shipped one: "
                    "+dataset@stage.roles.pool.NAME=OPTION")
        fixed, keys = _closest_key(key, [o for o in overrides if not _same_key(o, key)])
        if fixed:
            return f"field '{key}': unknown key; did you mean `{fixed}`?"
        return f"field '{key}': unknown key" + (f"; the keys there are {', '.join(keys)}" if keys else "")
    if isinstance(err, OverrideParseException):
        return ": ".join(message.splitlines()[:2])
    appended = re.search(r"An item is already at '([^']+)'", message)
    if appended is not None:
        key = appended.group(1)
        return f"field '{key}': already in the config: set it without the leading + ({key}=...)"
    return _first_line(err)


def _override_choosing(group: str, option: str, overrides: Sequence[str]) -> tuple[str, str]:
    """(the key as written, e.g. `dataset@stage.roles.pool.trivia`, and its leading + or ~) of the override
    that chose `option` in `group`; (group, "") when none did (a preset's own defaults list)."""
    for raw in overrides:
        for override in _parsed([raw]):
            if override.key_or_group == group and option in [str(v) for v in _values(override)]:
                key = override.key_or_group + (f"@{override.package}" if override.package else "")
                return key, raw[: len(raw) - len(raw.lstrip("+~"))]
    return group, ""


def _values(override) -> list:
    try:
        if override.is_sweep_override():
            return list(override.sweep_string_iterator())
        return [override.value()]
    except Exception:  # noqa: BLE001
        return []


def _same_key(override: str, key: str) -> bool:
    return override.lstrip("+~").split("=", 1)[0] == key


def _closest_key(key: str, overrides: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the valid key nearest to `key` in the config the other overrides compose, or None; the keys of
    the deepest node `key` reaches)."""
    from delift.config import compose_packaged
    from delift.schema import closest

    single = [o for o in overrides if not any(o2.is_sweep_override() for o2 in _parsed([o]))]
    node = None
    for attempt in (single, []):
        try:
            node = OmegaConf.to_container(compose_packaged(attempt), resolve=False)
            break
        except Exception:  # noqa: BLE001 - another broken override: fall back to the shipped config
            continue
    if node is None:
        return None, []
    group_key, _, package = key.partition("@")
    segments, fixed, changed = (package or group_key).split("."), [], False
    for segment in segments:
        options = list(node) if isinstance(node, dict) else []
        if not fixed:
            options += _groups()
        if segment in options:
            fixed.append(segment)
        else:
            match = closest(segment, options)
            if match is None:
                return None, sorted(str(o) for o in options)
            fixed.append(match)
            changed = True
        node = node.get(fixed[-1]) if isinstance(node, dict) else None
    if not changed:
        return None, []
    return (f"{group_key}@" if package else "") + ".".join(fixed), []


if __name__ == "__main__":
    main()
