"""The selected subset in the formats other trainers read, written beside subset.jsonl.

- `hf`: `subset_hf/`, a Hugging Face dataset (`datasets.load_from_disk`) with one row per record:
  id, instruction, input, output, source, `meta_json` and `pool_index` (the record's position in
  the pool). `meta` is a free dict whose keys and value types differ across records (and even
  within a dataset), which an Arrow struct column cannot hold without adding null keys or
  failing on mixed types; it is stored as its JSON text, `json.loads(row["meta_json"])` gives it back.
- `chat`: `subset_chat.jsonl`, one `{"messages": [user, assistant], "id", "source", "pool_index"}`
  per line: the conversational shape TRL's SFTTrainer takes. The user turn is the record's prompt
  exactly as delift's own fine-tuning puts it in the chat template (instruction + input, no
  system turn); the assistant turn is the record's output.
- `push_to_hub`: the `hf` dataset pushed to that hub repo.

Every file and folder appears under its final name only once complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Literal, get_args
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from delift.cache import save_jsonl, temp_path
from delift.errors import DeliftInputError
from delift.records import record_prompt

ExportFormat = Literal["hf", "chat"]
EXPORT_FORMATS = get_args(ExportFormat)
HF_FOLDER = "subset_hf"
CHAT_FILE = "subset_chat.jsonl"
TEXT_COLUMNS = ("id", "instruction", "input", "output", "source")


def chat_messages(record: Mapping) -> list[dict]:
    """The user/assistant turns delift fine-tunes on for `record` (see delift.prompts.format_prompt)."""
    return [{"role": "user", "content": record_prompt(record)},
            {"role": "assistant", "content": record["output"]}]


def subset_dataset(records: Sequence[Mapping], pool_indices: Sequence[int]):
    """The subset as a `datasets.Dataset` (columns: TEXT_COLUMNS, meta_json, pool_index)."""
    import datasets  # slow to import; only exports need it

    features = datasets.Features({**{name: datasets.Value("string") for name in TEXT_COLUMNS},
                                  "meta_json": datasets.Value("string"), "pool_index": datasets.Value("int64")})
    rows = list(zip(records, pool_indices, strict=True))
    columns = {name: [record[name] for record, _ in rows] for name in TEXT_COLUMNS}
    # default=str as in subset.jsonl, so both files hold the same meta.
    columns["meta_json"] = [json.dumps(record["meta"], ensure_ascii=False, default=str) for record, _ in rows]
    columns["pool_index"] = [int(index) for _, index in rows]
    # Explicit features: an empty subset still gets every column, with its type.
    return datasets.Dataset.from_dict(columns, features=features)


def _replace_folder(staging: Path, folder: Path) -> None:
    """Move the complete `staging` folder to `folder`, replacing an earlier export there."""
    if not folder.exists():
        os.replace(staging, folder)
        return
    # rename() cannot replace a non-empty folder: set the old one aside, rename, then delete it.
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    os.replace(folder, old)
    try:
        os.replace(staging, folder)
    except OSError:
        os.replace(old, folder)
        raise
    shutil.rmtree(old)


def save_dataset(dataset, folder) -> None:
    """`dataset.save_to_disk(folder)`, atomically: a crash mid-write leaves no folder named `folder`
    (and an earlier export there stays whole)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # The usual permissions (the umask's), not mkdtemp's 0700: the folder is an output others read.
    staging = temp_path(folder.parent, f".{folder.name}.", ".tmp", directory=True)
    from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    bars = is_progress_bar_enabled()
    disable_progress_bars()  # a subset saves in a blink: its bar would only add lines to the run's console
    try:
        # datasets writes an empty dataset as zero shards, which load_from_disk cannot read back.
        dataset.save_to_disk(str(staging), num_shards=1 if len(dataset) == 0 else None)
        _replace_folder(staging, folder)
    finally:
        if bars:
            enable_progress_bars()
        shutil.rmtree(staging, ignore_errors=True)


def export_subset(output_dir, records: Sequence[Mapping], pool_indices: Sequence[int], *,
                  formats: Iterable[str] = EXPORT_FORMATS, push_to_hub: str | None = None,
                  private: bool = True) -> dict:
    """Write the selected `records` (in selection order; `pool_indices[k]` is record k's position in
    the pool) to `output_dir` in `formats`, and push them to the hub repo `push_to_hub` when set.

    Returns what was written: {"hf": folder, "chat": file, "hub": repo id}, for the formats done.
    """
    formats = list(formats)
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise DeliftInputError(f"unknown formats {unknown}; known: {list(EXPORT_FORMATS)}", field="export.formats")
    if push_to_hub is not None and (not isinstance(push_to_hub, str) or not push_to_hub.strip()):
        raise DeliftInputError(f"must be a hub repo id like 'user/name' or null, got {push_to_hub!r}",
                               field="export.push_to_hub")
    output_dir = Path(output_dir)
    written = {}
    if "chat" in formats:
        rows = [{"messages": chat_messages(record), "id": record["id"], "source": record["source"],
                 "pool_index": int(index)} for record, index in zip(records, pool_indices, strict=True)]
        written["chat"] = output_dir / CHAT_FILE
        save_jsonl(written["chat"], rows)
    if "hf" in formats or push_to_hub is not None:
        dataset = subset_dataset(records, pool_indices)
        if "hf" in formats:
            written["hf"] = output_dir / HF_FOLDER
            save_dataset(dataset, written["hf"])
        if push_to_hub is not None:
            try:
                dataset.push_to_hub(push_to_hub, private=private)
            # The hub client fails in many types (HTTP status, missing token, offline mode, and
            # network errors that are not OSError); each means the same thing to the user here.
            except Exception as err:
                raise DeliftInputError(
                    f"cannot push the subset to the hub repo {push_to_hub!r} ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else 'no message'}); log in with `hf auth login` "
                    "or set HF_TOKEN, check the network, or set it to null (the local exports are written)",
                    field="export.push_to_hub") from err
            written["hub"] = push_to_hub
    return written
