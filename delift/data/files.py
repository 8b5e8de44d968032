"""User data files (JSONL, JSON, CSV, Parquet) and Hugging Face dataset folders -> records.

JSONL and JSON are parsed here rather than by `datasets`, so that every error names the file and
the line. A folder is a dataset saved with `save_to_disk` (read with `datasets.load_from_disk`; a
`meta_json` column, as delift's own `subset_hf/` export writes it, becomes `meta`). A file's rows may
use other column names than ours: `columns` maps our fields (instruction, input, output) to the
file's. A row's `id` is kept as it is; a row without one gets `<file stem>/<line or row>`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Mapping
from itertools import islice
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from delift.errors import DeliftInputError
from delift.records import TEXT_FIELDS, validate_records

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}
HF_FORMAT = "hf"  # a folder written by `Dataset.save_to_disk`


def load_file(path, format: str | None = None, columns: Mapping | None = None, id_field: str | None = None,
              limit: int | None = None) -> list[dict]:
    """Read a user data file into validated records.

    path: a file, or a folder holding a Hugging Face dataset saved with `save_to_disk`.
    format: jsonl, json, csv, parquet or hf (default: from the file extension; hf for a folder).
    columns: {our field: file column}, e.g. {"input": "prompt", "output": "answer"}; unmapped fields
      are read from the column of the same name (a missing instruction or input is "").
    id_field: the file's id column (default "id"; rows without one get `<stem>/<line>`).
    limit: read only the first `limit` rows.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DeliftInputError("does not exist", file=path)
    if path.is_dir():
        if format not in (None, HF_FORMAT):
            raise DeliftInputError(f"is a folder, which format {format!r} cannot read (a folder is read as a saved "
                                   "Hugging Face dataset: format hf)", file=path, field="format")
        fmt = HF_FORMAT
    elif not path.is_file():
        raise DeliftInputError("is not a file", file=path)
    else:
        fmt = _file_format(path, format)
    column_of = _column_map(columns)
    if limit is not None and limit < 1:
        raise DeliftInputError(f"must be a positive number of rows, got {limit}", file=path, field="limit")

    # JSONL rows are named by their line; the other formats by their 1-based row position.
    unit = "line" if fmt == "jsonl" else "row"
    rows = islice(READERS[fmt](path), limit)
    records = [_row_to_record(row, f"{unit} {number}", f"{path.stem}/{number}", column_of, id_field, path)
               for number, row in rows]
    if not records:
        raise DeliftInputError("has no records", file=path)
    return validate_records(records, file=path)


def _file_format(path: Path, format: str | None) -> str:
    if format is not None:
        if format == HF_FORMAT:
            raise DeliftInputError("is a file; format hf reads a folder saved with save_to_disk", file=path,
                                   field="format")
        if format not in set(FORMATS.values()):
            raise DeliftInputError(f"unknown format {format!r}; choose one of {sorted({*FORMATS.values(), HF_FORMAT})}",
                                   file=path, field="format")
        return format
    if path.suffix.lower() not in FORMATS:
        raise DeliftInputError(f"cannot tell the format from the extension {path.suffix!r}; set format= to one of "
                               f"{sorted(set(FORMATS.values()))}", file=path, field="format")
    return FORMATS[path.suffix.lower()]


def _column_map(columns: Mapping | None) -> dict[str, str]:
    column_of = {field: field for field in TEXT_FIELDS}
    for field, column in dict(columns or {}).items():
        if field not in TEXT_FIELDS:
            raise DeliftInputError(f"maps unknown field {field!r}; the fields are {list(TEXT_FIELDS)}", field="columns")
        if not isinstance(column, str) or not column:
            raise DeliftInputError(f"must name a column, got {column!r}", field=f"columns.{field}")
        column_of[field] = column
    return column_of


def _row_to_record(row: Mapping, where: str, default_id: str, column_of: dict, id_field: str | None, path: Path):
    rid = row.get(id_field or "id")
    if rid is None:
        if id_field is not None:
            raise DeliftInputError("is missing (named by id_field)", file=path, record=where, field=id_field)
        rid = default_id
    elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise DeliftInputError(f"must be a string or an integer, got {type(rid).__name__}", file=path, record=where,
                               field=id_field or "id")
    record_name = f"{where} (id {rid})"

    texts = {}
    for field, column in column_of.items():
        value = row.get(column)
        named = column if column == field else f"{column} (our {field})"
        if value is None:
            if field == "output":
                raise DeliftInputError("is missing", file=path, record=record_name, field=named)
            value = ""
        if not isinstance(value, str):
            raise DeliftInputError(f"must be a string, got {type(value).__name__}", file=path, record=record_name,
                                   field=named)
        texts[field] = value

    meta = row.get("meta")
    if meta is None and isinstance(row.get("meta_json"), str):  # delift's own subset_hf/ export
        try:
            meta = json.loads(row["meta_json"])
        except json.JSONDecodeError as err:
            raise DeliftInputError(f"is not valid JSON ({err.msg})", file=path, record=record_name,
                                   field="meta_json") from err
    meta = meta or {}
    if not isinstance(meta, Mapping):
        raise DeliftInputError(f"must be an object, got {type(meta).__name__}", file=path, record=record_name,
                               field="meta")
    source = row.get("source")
    return {"id": rid, **texts, "source": source if isinstance(source, str) and source else path.stem,
            "meta": dict(meta)}


def _decode(data: bytes, path: Path) -> str:
    """UTF-8 text (a leading BOM is dropped); invalid bytes are reported with their line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DeliftInputError(f"is not valid UTF-8 (byte {err.start})", file=path, record=f"line {line}") from err


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise DeliftInputError(f"is not valid UTF-8 (byte {err.start} of the line)", file=path,
                                       record=f"line {number}") from err
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise DeliftInputError(f"is not valid JSON ({err.msg} at column {err.colno})", file=path,
                                       record=f"line {number}") from err
            if not isinstance(row, dict):
                raise DeliftInputError(f"must be a JSON object, got {type(row).__name__}", file=path,
                                       record=f"line {number}")
            yield number, row


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    text = _decode(path.read_bytes(), path)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DeliftInputError(f"is not valid JSON ({err.msg} at column {err.colno})", file=path,
                               record=f"line {err.lineno}") from err
    if not isinstance(rows, list):
        raise DeliftInputError(f"must hold a JSON list of objects, got {type(rows).__name__} (for one object per "
                               "line, name the file .jsonl)", file=path)
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DeliftInputError(f"must be a JSON object, got {type(row).__name__}", file=path,
                                   record=f"row {number}")
        yield number, row


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    text = _decode(path.read_bytes(), path)
    try:
        # Every cell a string, and empty cells "" rather than NaN.
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DeliftInputError(f"is not a readable CSV file ({str(err).strip()})", file=path) from err
    for number, row in enumerate(frame.to_dict(orient="records"), start=1):
        yield number, row


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DeliftInputError(f"is not a readable Parquet file ({err})", file=path) from err
    for number, row in enumerate(table.to_pylist(), start=1):
        yield number, row


def _read_hf_folder(path: Path) -> Iterator[tuple[int, dict]]:
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DeliftInputError(f"holds a dataset with splits {splits}: give the folder of one split, e.g. "
                               f"{path / (splits[0] if splits else 'train')}", file=path)
    if not (path / "dataset_info.json").is_file() and not (path / "state.json").is_file():
        raise DeliftInputError("is a folder but not a Hugging Face dataset saved with save_to_disk (no state.json); "
                               "give a JSONL, JSON, CSV or Parquet file, or such a folder", file=path)
    import datasets  # slow to import: only for folders

    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DeliftInputError(f"cannot be read with datasets.load_from_disk ({err})", file=path) from err
    for number, row in enumerate(dataset, start=1):
        yield number, row


READERS = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet,
           HF_FORMAT: _read_hf_folder}
