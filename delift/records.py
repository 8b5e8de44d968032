"""The one record schema every loader produces: {id, instruction, input, output, source, meta}.

`meta` may carry `answer` and `answer_type` ("choice" for a multiple-choice letter, "number" for
a numeric final answer), which the metrics use for exact-match accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from delift.errors import DeliftInputError

TEXT_FIELDS = ("instruction", "input", "output")


def make_record(id, instruction="", input="", output="", source="", meta=None) -> dict:
    return {
        "id": str(id),
        "instruction": instruction,
        "input": input,
        "output": output,
        "source": source,
        "meta": dict(meta or {}),
    }


def validate_records(records: Iterable[Mapping], *, file=None, require_output=True) -> list[dict]:
    """Check field types and id uniqueness; return the records as plain dicts.

    Errors name the file, the record (its id, else its position) and the field.
    """
    out, seen = [], {}
    for position, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise DeliftInputError("is not an object", file=file, record=position)
        rid = rec.get("id", position)
        if rid is None or (isinstance(rid, str) and not rid.strip()):
            raise DeliftInputError("has an empty id", file=file, record=position, field="id")
        rid = str(rid)
        for field in TEXT_FIELDS:
            value = rec.get(field, "" if field != "output" else None)
            if value is None:
                if field == "output" and require_output:
                    raise DeliftInputError("is missing", file=file, record=rid, field=field)
                value = ""
            if not isinstance(value, str):
                raise DeliftInputError(
                    f"must be a string, got {type(value).__name__}", file=file, record=rid, field=field
                )
        if require_output and not rec["output"].strip():
            raise DeliftInputError("is empty", file=file, record=rid, field="output")
        if not (rec.get("instruction") or "").strip() and not (rec.get("input") or "").strip():
            raise DeliftInputError(
                "has neither an instruction nor an input", file=file, record=rid, field="instruction"
            )
        if rid in seen:
            raise DeliftInputError(
                f"duplicate id (first seen at position {seen[rid]})", file=file, record=rid, field="id"
            )
        seen[rid] = position
        out.append(
            make_record(
                rid,
                rec.get("instruction") or "",
                rec.get("input") or "",
                rec.get("output") or "",
                rec.get("source") or "",
                rec.get("meta"),
            )
        )
    return out


def record_text(rec: Mapping) -> str:
    """The whole record as one string (instruction + input + output), for sentence embeddings."""
    return "\n".join(part for part in (rec["instruction"], rec["input"], rec["output"]) if part)


def record_prompt(rec: Mapping) -> str:
    """The query half of a record, for embedding queries and generation prompts."""
    return "\n".join(part for part in (rec["instruction"], rec["input"]) if part)
