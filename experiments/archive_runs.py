"""Keep a grid's finished jobs and its kernels in the repository, so that the grid continues in a
fresh checkout (another machine, another working session) instead of starting again.

    python experiments/archive_runs.py save outputs/multiruns/evidence_instruction docs/results/runs/evidence_instruction
    python experiments/archive_runs.py restore docs/results/runs/evidence_instruction outputs/multiruns/evidence_instruction
    python experiments/archive_runs.py save-kernel <cache_dir>/utility_kernel/<key> docs/results/kernels/<name>
    python experiments/archive_runs.py restore-kernel docs/results/kernels/<name> <cache_dir>

`save` copies, from every job folder holding a results.json, what `skip_done` and make_tables read
(results.json, predictions.jsonl, selection.json, config_resolved.yaml) and the sweep's
multirun.yaml; adapters, checkpoints and W&B files stay behind. `restore` copies them back, so
`run.py -m ... hydra.sweep.dir=<sweep> skip_done=true` skips those jobs (same code, same config).
make_tables reads an archive folder directly. `save-kernel` keeps a finished exact kernel
(kernel.npy and key.json, its cache key's parts) and `restore-kernel` puts it back into the
content-hashed cache folder it came from, whose name it keeps.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from delift.cache import cache_folder
from delift.utility.tiles import CACHE_KIND as KERNEL_KIND

JOB_FILES = ("results.json", "predictions.jsonl", "selection.json", "config_resolved.yaml")
SWEEP_FILES = ("multirun.yaml",)
KERNEL_FILES = ("kernel.npy", "key.json")


def copy_files(source: Path, target: Path, names) -> int:
    copied = 0
    for name in names:
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
            copied += 1
    return copied


def save(sweep: Path, archive: Path) -> int:
    """Copy the finished jobs of `sweep` into `archive`; the number of jobs."""
    jobs = sorted(path.parent for path in sweep.glob("*/results.json"))
    for job in jobs:
        copy_files(job, archive / job.name, JOB_FILES)
    copy_files(sweep, archive, SWEEP_FILES)
    return len(jobs)


def restore(archive: Path, sweep: Path) -> int:
    """Copy the archived jobs back into `sweep` (a finished job there is left as it is)."""
    restored = 0
    for job in sorted(path.parent for path in archive.glob("*/results.json")):
        if not (sweep / job.name / "results.json").exists():
            restored += bool(copy_files(job, sweep / job.name, JOB_FILES))
    copy_files(archive, sweep, SWEEP_FILES)
    return restored


def save_kernel(folder: Path, archive: Path) -> None:
    if not (folder / "kernel.npy").is_file():
        raise SystemExit(f"{folder}: no finished kernel (kernel.npy) to save")
    copy_files(folder, archive, KERNEL_FILES)
    (archive / "cache_key").write_text(folder.name + "\n", encoding="utf-8")


def restore_kernel(archive: Path, cache_dir: Path) -> Path:
    key = (archive / "cache_key").read_text(encoding="utf-8").strip()
    folder = cache_folder(cache_dir, KERNEL_KIND, key)
    copy_files(archive, folder, KERNEL_FILES)
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["save", "restore", "save-kernel", "restore-kernel"])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    if args.command == "save":
        print(f"{save(args.source, args.target)} finished jobs saved in {args.target}")
    elif args.command == "restore":
        print(f"{restore(args.source, args.target)} jobs restored into {args.target}")
    elif args.command == "save-kernel":
        save_kernel(args.source, args.target)
        print(f"kernel saved in {args.target}")
    else:
        print(f"kernel restored into {restore_kernel(args.source, args.target)}")


if __name__ == "__main__":
    main()
