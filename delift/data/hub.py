"""The paper's Hugging Face hub datasets -> records: one mapper per dataset, one generic loader.

A mapper takes one hub row (as `datasets` returns it: a Sequence of dicts comes back as a dict of
lists, a list of structs as a list of dicts) and its index, and returns a record. Rows without a
hub id get `<dataset>/<index>`. Mappers raise DeliftInputError naming the record and the field;
`load_hub` adds the dataset's name.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Callable, Mapping

from tqdm.auto import tqdm

from delift.errors import DeliftInputError
from delift.records import make_record, validate_records

log = logging.getLogger(__name__)

CHOICE_INSTRUCTION = "Answer the multiple-choice question with the letter and the text of the correct choice."
GSM8K_INSTRUCTION = "Solve the math word problem step by step, then give the final number after '####'."
HOTPOTQA_INSTRUCTION = "Answer the question using the facts given."
SQUAD_INSTRUCTION = "Answer the question with a short span copied from the passage."

CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

# MT-Bench's categories, ten questions each, in question-id order from 81 (FastChat's question.jsonl);
# the judgments dataset carries only the question id.
MTBENCH_FIRST_ID = 81
MTBENCH_CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


def with_subtask(meta: dict, subtask) -> dict:
    """`meta` with the grouping field `subtask` (see delift.data) when the row names one."""
    return {**meta, "subtask": str(subtask)} if subtask else meta


def mtbench_category(question_id) -> str:
    """The category of an MT-Bench question id, "" outside 81..160."""
    if not isinstance(question_id, int) or isinstance(question_id, bool):
        return ""
    block = (question_id - MTBENCH_FIRST_ID) // 10
    return MTBENCH_CATEGORIES[block] if 0 <= block < len(MTBENCH_CATEGORIES) else ""


def _text(row: Mapping, key: str, record, *, allow_empty: bool = True) -> str:
    value = row.get(key)
    if value is None:
        raise DeliftInputError("is missing", record=record, field=key)
    if not isinstance(value, str):
        raise DeliftInputError(f"must be a string, got {type(value).__name__}", record=record, field=key)
    if not allow_empty and not value.strip():
        raise DeliftInputError("is empty", record=record, field=key)
    return value


def mixinstruct_record(row: Mapping, index: int) -> dict:
    """llm-blender/mix-instruct: instruction (often ""), input, reference output; the hub id is kept."""
    rid = row.get("id") or f"mixinstruct/{index}"
    return make_record(rid, _text(row, "instruction", rid), _text(row, "input", rid), _text(row, "output", rid),
                       source="mixinstruct")


def p3_record(row: Mapping, index: int) -> dict:
    """bigscience/P3 (e.g. cnn_dailymail_3.0.0_sum_in_brief): the prompted input already holds the instruction."""
    rid = f"p3/{index}"
    return make_record(rid, "", _text(row, "inputs_pretokenized", rid), _text(row, "targets_pretokenized", rid),
                       source="p3")


def hotpotqa_record(row: Mapping, index: int) -> dict:
    """hotpot_qa: the question with its supporting-fact sentences, looked up in `context`, as the input."""
    rid = row.get("id") or f"hotpotqa/{index}"
    question = _text(row, "question", rid)
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        # fullwiki `test` rows have no answer: they cannot be trained on or scored.
        raise DeliftInputError("is missing or empty (fullwiki test rows have no answers)", record=rid, field="answer")
    try:
        paragraphs = dict(zip(row["context"]["title"], row["context"]["sentences"], strict=True))
        facts = list(zip(row["supporting_facts"]["title"], row["supporting_facts"]["sent_id"], strict=True))
    except (KeyError, TypeError, ValueError) as err:
        raise DeliftInputError(f"must be a dict of equal-length lists ({err})", record=rid,
                               field="context/supporting_facts") from err

    # Group the supporting sentences by paragraph, in the order the facts name them. A few hub rows
    # point at a sentence their paragraph lacks; those facts are skipped.
    by_title: dict[str, list[str]] = {}
    for title, sent_id in facts:
        sentences = paragraphs.get(title, [])
        if 0 <= sent_id < len(sentences):
            by_title.setdefault(title, []).append(sentences[sent_id].strip())
    context = "\n".join(f"{title}: {' '.join(sentences)}" for title, sentences in by_title.items())
    query = f"Facts:\n{context}\n\nQuestion: {question}" if context else question
    meta = {"answers": [answer], "answer_type": "text", "type": row.get("type"), "level": row.get("level")}
    return make_record(rid, HOTPOTQA_INSTRUCTION, query, answer, source="hotpotqa", meta=meta)


def mmlu_record(row: Mapping, index: int) -> dict:
    """cais/mmlu: question + lettered choices; output "B. <choice>"; meta answer = the letter,
    subject and subtask = the row's subject.

    `auxiliary_train` rows of the config of that name are wrapped in a `train` struct: unwrapped here.
    """
    if isinstance(row.get("train"), Mapping):
        row = row["train"]
    rid = f"mmlu/{index}"
    question = _text(row, "question", rid, allow_empty=False)
    choices = row.get("choices")
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or not all(isinstance(c, str) for c in choices):
        raise DeliftInputError(f"must be a list of 2 to 26 strings, got {choices!r}", record=rid, field="choices")
    answer = row.get("answer")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DeliftInputError(f"must be a choice index 0..{len(choices) - 1}, got {answer!r}", record=rid,
                               field="answer")
    subject = row.get("subject") or ""
    return choice_record(rid, question, choices, answer, source="mmlu",
                         meta=with_subtask({"subject": subject}, subject))


def choice_record(rid: str, question: str, choices: list[str], answer: int, *, source: str, meta: dict) -> dict:
    """A multiple-choice record in the one shape MMLU and GPQA share."""
    letters = string.ascii_uppercase
    lettered = "\n".join(f"{letters[k]}. {choice.strip()}" for k, choice in enumerate(choices))
    output = f"{letters[answer]}. {choices[answer].strip()}"
    return make_record(rid, CHOICE_INSTRUCTION, f"{question.strip()}\n{lettered}", output, source=source,
                       meta={"answer": letters[answer], "answer_type": "choice", **meta})


def squad_record(row: Mapping, index: int) -> dict:
    """rajpurkar/squad: passage + question; output = the first answer; meta answers = all of them."""
    rid = row.get("id") or f"squad/{index}"
    context, question = _text(row, "context", rid), _text(row, "question", rid)
    answers = (row.get("answers") or {}).get("text") or []
    answers = list(dict.fromkeys(a for a in answers if isinstance(a, str) and a.strip()))
    if not answers:
        raise DeliftInputError("has no answer text", record=rid, field="answers")
    return make_record(rid, SQUAD_INSTRUCTION, f"Passage: {context}\n\nQuestion: {question}", answers[0],
                       source="squad", meta={"answers": answers, "answer_type": "text", "title": row.get("title", "")})


def gsm8k_record(row: Mapping, index: int) -> dict:
    """openai/gsm8k: output = the worked answer without its <<...>> calculator annotations, ending in
    `#### N`; meta answer = N (commas removed)."""
    rid = f"gsm8k/{index}"
    question, answer = _text(row, "question", rid), _text(row, "answer", rid)
    reasoning, sep, final = answer.rpartition("####")
    number = final.strip().replace(",", "")
    if not sep or not NUMBER.fullmatch(number):
        raise DeliftInputError("must end with '#### <number>'", record=rid, field="answer")
    output = CALCULATOR_ANNOTATION.sub("", reasoning).rstrip() + f"\n#### {number}"
    return make_record(rid, GSM8K_INSTRUCTION, question, output.lstrip(),
                       source="gsm8k", meta={"answer": number, "answer_type": "number"})


def mtbench_record(row: Mapping, index: int, reference_model: str = "gpt-4") -> dict | None:
    """lmsys/mt_bench_human_judgments: the first user turn, with `reference_model`'s answer as the output.

    Rows are pairwise judgments, so a question appears many times; rows of later turns or without
    the reference model hold no record (None), and `load_hub(..., unique_by_id=True)` keeps one per id.
    meta subtask = the question's category.
    """
    if row.get("turn") != 1:
        return None
    for side in ("a", "b"):
        if row.get(f"model_{side}") == reference_model:
            conversation = row.get(f"conversation_{side}") or []
            rid = f"mtbench/{row.get('question_id')}"
            if len(conversation) < 2:
                raise DeliftInputError("has fewer than two messages", record=rid, field=f"conversation_{side}")
            meta = {"question_id": row.get("question_id"), "reference_model": reference_model}
            return make_record(rid, "", _text(conversation[0], "content", rid), _text(conversation[1], "content", rid),
                               source="mt_bench", meta=with_subtask(meta, mtbench_category(row.get("question_id"))))
    return None


HUB_MAPPERS: dict[str, Callable[[Mapping, int], dict | None]] = {
    "mtbench": mtbench_record,
    "mixinstruct": mixinstruct_record,
    "p3": p3_record,
    "hotpotqa": hotpotqa_record,
    "mmlu": mmlu_record,
    "squad": squad_record,
    "gsm8k": gsm8k_record,
}


def load_hub(path: str, name: str | None = None, split: str = "train", revision: str | None = None,
             data_files=None, limit: int | None = None, *, mapper: str | Callable[[Mapping, int], dict],
             cache_dir: str | None = None, progress: bool = True, unique_by_id: bool = False) -> list[dict]:
    """`datasets.load_dataset(path, name, split=...)`, first `limit` rows, each mapped to a record.

    mapper: a name in HUB_MAPPERS (mixinstruct, p3, hotpotqa, mmlu, squad, gsm8k, mtbench) or a
    function (row, index) -> record, or None for a row that holds no record. `unique_by_id` keeps
    the first record of each id (datasets with one row per judgment, like MT-Bench's).
    """
    import datasets  # slow to import; only hub runs need it

    map_row = _resolve_mapper(mapper)
    where = ":".join(part for part in (path, name, split) if part)
    try:
        rows = datasets.load_dataset(path, name, split=split, revision=revision, data_files=data_files,
                                     cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise DeliftInputError(f"cannot load the hub dataset ({type(err).__name__}: {str(err).splitlines()[0]}); "
                               "offline, use a packaged dataset (delift/conf/dataset/*_offline.yaml) or a file",
                               file=where) from err
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    records = []
    for index, row in enumerate(tqdm(rows, desc=f"mapping {where}", disable=not progress)):
        try:
            record = map_row(row, index)
        except DeliftInputError as err:
            raise DeliftInputError(str(err), file=where) from err
        if record is not None:
            records.append(record)
    if unique_by_id:
        records = list({r["id"]: r for r in reversed(records)}.values())[::-1]
    if not records:
        raise DeliftInputError("has no rows", file=where)
    return validate_records(records, file=where)


def _resolve_mapper(mapper) -> Callable[[Mapping, int], dict]:
    if callable(mapper):
        return mapper
    if mapper not in HUB_MAPPERS:
        raise DeliftInputError(f"unknown mapper {mapper!r}; choose one of {sorted(HUB_MAPPERS)}", field="mapper")
    return HUB_MAPPERS[mapper]
