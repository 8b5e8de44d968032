"""Data loading (user files, hub mappers, packaged benchmarks) and the stage builder."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_method

from delift.data import (
    build_stage,
    load_file,
    load_gpqa_offline,
    load_gsm8k_offline,
    load_hub,
    load_mmlu_offline,
    load_trivia_offline,
)
from delift.errors import DeliftInputError
from delift.records import record_prompt
import fixtures_hub as hub  # tests/ is on sys.path (rootdir conftest, no __init__)

CONF = Path(__file__).resolve().parents[1] / "delift" / "conf"


# ---------------------------------------------------------------- user files

def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_jsonl_columns_ids_meta_and_limit(tmp_path):
    path = write(tmp_path / "mine.jsonl", "\n".join([
        json.dumps({"prompt": "What is 2+2?", "answer": "4", "meta": {"answer": "4", "answer_type": "number"}}),
        "",  # blank lines are skipped but still counted
        json.dumps({"id": "q-7", "prompt": "Capital of Peru?", "answer": "Lima", "source": "geo"}),
        json.dumps({"prompt": "Third?", "answer": "3"}),
    ]) + "\n")
    records = load_file(path, columns={"input": "prompt", "output": "answer"})
    assert [r["id"] for r in records] == ["mine/1", "q-7", "mine/4"]
    assert records[0] == {"id": "mine/1", "instruction": "", "input": "What is 2+2?", "output": "4",
                          "source": "mine", "meta": {"answer": "4", "answer_type": "number"}}
    assert records[1]["source"] == "geo"
    assert [r["id"] for r in load_file(path, columns={"input": "prompt", "output": "answer"}, limit=2)] == \
        ["mine/1", "q-7"]


def test_id_field_names_the_id_column(tmp_path):
    path = write(tmp_path / "d.jsonl", json.dumps({"uid": 12, "input": "q", "output": "a"}) + "\n")
    assert load_file(path, id_field="uid")[0]["id"] == "12"
    with pytest.raises(DeliftInputError, match=r"line 1.*field 'key'.*missing"):
        load_file(path, id_field="key")


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv"])
def test_utf8_bom_is_accepted(tmp_path, suffix):
    body = {"jsonl": '{"input": "Café?", "output": "oui"}\n',
            "json": '[{"input": "Café?", "output": "oui"}]',
            "csv": "input,output\nCafé?,oui\n"}[suffix]
    records = load_file(write(tmp_path / f"bom.{suffix}", b"\xef\xbb\xbf" + body.encode("utf-8")))
    assert [(r["input"], r["output"]) for r in records] == [("Café?", "oui")]


def test_csv_and_parquet_with_columns(tmp_path):
    csv = write(tmp_path / "t.csv", 'key,question,reply\nk1,"Hello, there?",hi\nk2,Bye?,bye\n')
    records = load_file(csv, columns={"input": "question", "output": "reply"}, id_field="key")
    assert [(r["id"], r["input"], r["output"]) for r in records] == [("k1", "Hello, there?", "hi"),
                                                                     ("k2", "Bye?", "bye")]

    table = pa.table({"instruction": ["Translate.", "Translate."], "input": ["chat", "chien"],
                      "output": ["cat", "dog"]})
    pq.write_table(table, tmp_path / "t.parquet")
    records = load_file(tmp_path / "t.parquet")
    assert [(r["id"], r["output"]) for r in records] == [("t/1", "cat"), ("t/2", "dog")]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"input": "a", "output": "b"}\n{"input": "c", "output": }\n')
    with pytest.raises(DeliftInputError, match=r"bad\.jsonl.*line 2.*not valid JSON"):
        load_file(path)


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "enc.jsonl", b'{"input": "a", "output": "b"}\n{"input": "\xff", "output": "c"}\n')
    with pytest.raises(DeliftInputError, match=r"enc\.jsonl.*line 2.*not valid UTF-8"):
        load_file(path)
    csv = write(tmp_path / "enc.csv", b"input,output\na,b\nc,\xe9\n")
    with pytest.raises(DeliftInputError, match=r"enc\.csv.*line 3.*not valid UTF-8"):
        load_file(csv)


def test_missing_output_names_record_and_field(tmp_path):
    path = write(tmp_path / "m.jsonl", '{"input": "a", "output": "b"}\n{"input": "c"}\n')
    with pytest.raises(DeliftInputError, match=r"line 2 \(id m/2\).*field 'output'.*missing"):
        load_file(path)
    with pytest.raises(DeliftInputError, match=r"line 1 \(id m/1\).*field 'answer \(our output\)'.*missing"):
        load_file(path, columns={"output": "answer"})


def test_non_string_field_names_record_and_field(tmp_path):
    path = write(tmp_path / "n.jsonl",
                 '{"id": "x1", "input": "a", "output": "b"}\n{"id": "x2", "input": 7, "output": "c"}\n')
    with pytest.raises(DeliftInputError, match=r"line 2 \(id x2\).*field 'input'.*must be a string, got int"):
        load_file(path)


def test_duplicate_ids_rejected(tmp_path):
    path = write(tmp_path / "dup.jsonl",
                 '{"id": "a", "input": "q1", "output": "x"}\n{"id": "a", "input": "q2", "output": "y"}\n')
    with pytest.raises(DeliftInputError, match=r"record a.*duplicate id"):
        load_file(path)


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(DeliftInputError, match=r"nope\.jsonl.*does not exist"):
        load_file(tmp_path / "nope.jsonl")
    with pytest.raises(DeliftInputError, match=r"has no records"):
        load_file(write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(DeliftInputError, match=r"format"):
        load_file(write(tmp_path / "data.txt", "x"))
    with pytest.raises(DeliftInputError, match=r"JSON list of objects"):
        load_file(write(tmp_path / "obj.json", '{"input": "a", "output": "b"}'))


# ---------------------------------------------------------------- hub mappers (local fixtures only)

def hub_records(tmp_path, rows, mapper, file_name=None, **kwargs):
    data = hub.write_jsonl(tmp_path / f"{file_name or mapper}.jsonl", rows)
    return load_hub("json", data_files=data, mapper=mapper, cache_dir=str(tmp_path / "hf"), progress=False, **kwargs)


def test_hub_mixinstruct_and_p3(tmp_path):
    mix = hub_records(tmp_path, hub.MIXINSTRUCT, "mixinstruct")
    assert [r["id"] for r in mix] == ["unified_chip2/69962", "dolly_15k/open_qa/7"]
    assert (mix[0]["instruction"], mix[0]["input"], mix[0]["output"]) == \
        ("", hub.MIXINSTRUCT[0]["input"], hub.MIXINSTRUCT[0]["output"])
    assert mix[1]["instruction"] == "Answer briefly." and mix[0]["meta"] == {}

    (p3,) = hub_records(tmp_path, hub.P3_CNN, "p3")
    assert p3["id"] == "p3/0" and p3["instruction"] == ""
    assert p3["input"].startswith("Sum the following article in brief: LONDON")
    assert p3["output"] == hub.P3_CNN[0]["targets_pretokenized"]


def test_hub_hotpotqa_uses_supporting_sentences(tmp_path):
    (rec,) = hub_records(tmp_path, hub.HOTPOTQA, "hotpotqa")
    assert rec["id"] == "5a8b57f25542995d1e6f1371" and rec["output"] == "yes"
    assert rec["input"] == ("Facts:\nScott Derrickson: Scott Derrickson (born July 16, 1966) is an American director.\n"
                            "Ed Wood: Edward Davis Wood Jr. was an American filmmaker.\n\n"
                            "Question: Were Scott Derrickson and Ed Wood of the same nationality?")
    assert rec["meta"] == {"answers": ["yes"], "answer_type": "text", "type": "comparison", "level": "hard"}


def test_hub_mmlu_all_and_auxiliary_train(tmp_path):
    anatomy, astronomy = hub_records(tmp_path, hub.MMLU_ALL, "mmlu")
    assert anatomy["input"] == ("What is the embryological origin of the hyoid bone?\nA. The first pharyngeal arch\n"
                                "B. The first and second pharyngeal arches\nC. The second pharyngeal arch\n"
                                "D. The second and third pharyngeal arches")
    assert anatomy["output"] == "D. The second and third pharyngeal arches"
    assert anatomy["meta"] == {"answer": "D", "answer_type": "choice", "subject": "anatomy", "subtask": "anatomy"}
    assert (astronomy["id"], astronomy["output"], astronomy["meta"]["answer"]) == ("mmlu/1", "B. Mars", "B")

    (aux,) = hub_records(tmp_path, hub.MMLU_AUXILIARY_TRAIN, "mmlu", file_name="mmlu_aux")
    assert aux["output"] == "A. Oxygen" and aux["meta"] == {"answer": "A", "answer_type": "choice", "subject": ""}

    bad = [dict(hub.MMLU_ALL[0], answer=7)]
    with pytest.raises(DeliftInputError, match=r"file json.*record mmlu/0.*field 'answer'"):
        hub_records(tmp_path, bad, "mmlu", file_name="mmlu_bad")


def test_hub_mtbench_one_record_per_question_with_the_reference_answer(tmp_path):
    records = hub_records(tmp_path, hub.MTBENCH, "mtbench", unique_by_id=True)
    assert [r["id"] for r in records] == ["mtbench/81", "mtbench/82"]  # 83 has no GPT-4 answer
    assert records[0]["input"] == "Compose a travel blog post about Hawaii."
    assert records[0]["output"] == "Aloha! My trip to Hawaii..."
    assert records[1]["output"] == "Subject: Feedback request"
    with pytest.raises(DeliftInputError, match="duplicate id"):
        hub_records(tmp_path, hub.MTBENCH, "mtbench", file_name="dupes")


def test_hub_squad_and_gsm8k(tmp_path):
    (squad,) = hub_records(tmp_path, hub.SQUAD, "squad")
    assert squad["id"] == "5733be284776f41900661182" and squad["output"] == "Saint Bernadette Soubirous"
    assert squad["input"].startswith("Passage: Architecturally,") and squad["input"].endswith(
        "Question: To whom did the Virgin Mary allegedly appear in 1858 in Lourdes France?")
    assert squad["meta"]["answers"] == ["Saint Bernadette Soubirous", "Bernadette"]

    natalia, pens = hub_records(tmp_path, hub.GSM8K, "gsm8k")
    assert natalia["output"] == ("Natalia sold 48/2 = 24 clips in May.\n"
                                 "Natalia sold 48+24 = 72 clips altogether in April and May.\n#### 72")
    assert natalia["meta"] == {"answer": "72", "answer_type": "number"}
    assert pens["meta"]["answer"] == "1000" and pens["output"].endswith("#### 1000")
    assert [r["id"] for r in hub_records(tmp_path, hub.GSM8K, "gsm8k", limit=1)] == ["gsm8k/0"]


def test_hub_unknown_mapper_and_dataset(tmp_path):
    with pytest.raises(DeliftInputError, match=r"unknown mapper 'nope'"):
        hub_records(tmp_path, hub.GSM8K, "nope")
    with pytest.raises(DeliftInputError, match=r"cannot load the hub dataset"):
        load_hub("json", data_files=str(tmp_path / "absent.jsonl"), mapper="gsm8k", cache_dir=str(tmp_path / "hf"))


# ---------------------------------------------------------------- offline packaged data

def test_packaged_mmlu():
    records = load_mmlu_offline()
    assert len(records) == 14042  # 14,044 lines minus the 2 header-like rows
    assert all(r["meta"]["answer"] in "ABCD" and r["output"].startswith(r["meta"]["answer"] + ". ") for r in records)
    assert records[0]["meta"] == {"answer": "D", "answer_type": "choice", "subject": "moral scenarios",
                                  "subtask": "moral scenarios"}
    assert not any(r["input"].startswith("question\n") for r in records)
    assert len(load_mmlu_offline(limit=5)) == 5
    # offset: the next questions, disjoint from the first (a pool and its target benchmark)
    assert [r["id"] for r in load_mmlu_offline(limit=3, offset=2)] == [r["id"] for r in records[2:5]]
    assert len(load_mmlu_offline(offset=14040)) == 2


def test_packaged_gsm8k_and_gpqa():
    gsm = load_gsm8k_offline()
    assert len(gsm) == 1319 and not any("<<" in r["output"] for r in gsm)
    assert gsm[0]["meta"] == {"answer": "18", "answer_type": "number"}

    gpqa = load_gpqa_offline()
    assert len(gpqa) == 198 and len({r["id"] for r in gpqa}) == 198
    letters = [r["meta"]["answer"] for r in gpqa]
    assert set(letters) == set("ABCD") and max(letters.count(x) for x in "ABCD") < 80  # shuffled, not all A
    first = gpqa[0]
    assert first["id"] == "gpqa/rec06pnAkLOr2t2mp" and first["output"].endswith(". 10^-4 eV")
    assert f"\n{first['output']}\n" in f"{first['input']}\n"
    assert load_gpqa_offline() == gpqa  # choice order is fixed per question


def test_packaged_trivia():
    records = load_trivia_offline()
    assert 8000 < len(records) < 10000
    assert not any("http" in r["input"] or any("http" in a for a in r["meta"]["answers"]) for r in records)
    lists = [r["meta"]["list"] for r in records]
    assert lists == sorted(lists)  # deterministic order: sorted list names
    assert records[0]["id"] == "trivia/2015/0" and records[0]["output"] == records[0]["meta"]["answers"][0]

    boat = [r for r in load_trivia_offline(lists=["boombeach"]) if "Operation Reward boat" in r["input"]]
    assert [r["meta"]["answers"] for r in boat] == [["No smoking"]]  # the image-URL answer is dropped
    numbers = [r for r in records if "percentage of former American Football" in r["input"]]
    assert numbers[0]["meta"]["answers"] == ["ninety-six", "96", "96%"]  # YAML numbers read as text
    with pytest.raises(DeliftInputError, match=r"unknown trivia lists \['nolist'\]"):
        load_trivia_offline(lists=["nolist"])


# ---------------------------------------------------------------- configs and the stage builder

def compose_config(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("path", sorted((CONF / "dataset").glob("*.yaml")), ids=lambda p: p.stem)
def test_dataset_configs_match_their_loaders(path):
    cfg = yaml.safe_load(path.read_text())
    loader = get_method(cfg.pop("_target_"))
    inspect.signature(loader).bind(**cfg)  # every argument in the config is one the loader takes


EXPECTED = {  # role -> {source: count}, for the offline defaults (stratified holdouts)
    "instruction": {"pool": {"trivia": 17, "mmlu": 6, "gsm8k": 5}, "target": {"trivia": 5, "mmlu": 2, "gsm8k": 1},
                    "existing": {}, "eval": {"trivia": 14, "mmlu": 6, "gsm8k": 4}},
    "task": {"pool": {"trivia": 50, "gsm8k": 10}, "target": {"mmlu": 12}, "existing": {}, "eval": {"mmlu": 24}},
    "continual": {"pool": {"mmlu": 52}, "target": {"mmlu": 8}, "existing": {"trivia": 30}, "eval": {"mmlu": 24}},
}


def ids(stage, role):
    return [r["id"] for r in getattr(stage, role)]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stage_splits_sized_disjoint_and_seeded(name):
    cfg = compose_config(f"stage={name}")
    stage, again, other = build_stage(cfg.stage, 0), build_stage(cfg.stage, 0), build_stage(cfg.stage, 1)
    assert stage.name == name and stage.objective == {"instruction": "fl", "task": "flmi", "continual": "flcg"}[name]
    assert stage.summary() == EXPECTED[name] == other.summary()

    roles = ("pool", "target", "existing", "eval")
    assert all(ids(stage, role) == ids(again, role) for role in roles)
    assert ids(stage, "pool") != ids(other, "pool") and ids(stage, "eval") != ids(other, "eval")

    all_ids = [i for role in roles for i in ids(stage, role)]
    assert len(all_ids) == len(set(all_ids))
    eval_prompts = {record_prompt(r) for r in stage.eval}
    assert not any(record_prompt(r) in eval_prompts for role in roles[:3] for r in getattr(stage, role))


def test_stage_samples_are_seeded_not_first_rows():
    stage = build_stage(compose_config("stage=continual").stage, 0)
    # 30 of ~8.5k trivia questions: a first-N sample would all come from the first list (2015).
    assert len({r["meta"]["list"] for r in stage.existing}) > 5
    assert all(r["id"].startswith("trivia/") for r in stage.existing)


def test_a_data_seed_fixes_the_stage_across_run_seeds():
    def ids(stage):
        return {role: [r["id"] for r in getattr(stage, role)] for role in ("pool", "target", "eval")}

    varying = compose_config("stage=instruction").stage
    assert ids(build_stage(varying, 0))["eval"] != ids(build_stage(varying, 1))["eval"]
    fixed = compose_config("stage=instruction", "+stage.data_seed=7").stage
    assert ids(build_stage(fixed, 0)) == ids(build_stage(fixed, 1)) == ids(build_stage(varying, 7))


def test_stage_sizes_are_overridable():
    cfg = compose_config("stage=task", "stage.sizes.pool.trivia=20", "stage.sizes.target.mmlu=30",
                         "stage.holdout.eval.size=10")
    assert build_stage(cfg.stage, 0).summary() == {"pool": {"trivia": 20, "gsm8k": 10}, "target": {"mmlu": 20},
                                                   "existing": {}, "eval": {"mmlu": 10}}


def test_user_file_as_stage_source(tmp_path):
    path = write(tmp_path / "mine.jsonl", "".join(
        json.dumps({"id": f"row{i}", "input": f"My question {i}?", "output": f"answer {i}"}) + "\n" for i in range(12)))
    cfg = compose_config("stage=instruction", "+dataset@stage.roles.pool.mine=file",
                         f"stage.roles.pool.mine.path={path}", "+stage.sizes.pool.mine=10",
                         "~dataset@stage.roles.pool.gsm8k", "~stage.sizes.pool.gsm8k")
    stage = build_stage(cfg.stage, 0)
    counts = {role: sum(n for n in stage.summary()[role].values()) for role in ("pool", "eval", "target")}
    assert counts == {"pool": 28, "eval": 24, "target": 8}  # 36 trivia + 14 MMLU + 10 of mine loaded
    mine = [r for role in ("pool", "eval", "target") for r in getattr(stage, role) if r["source"] == "mine"]
    assert len(mine) == 10 and all(r["id"].startswith("row") for r in mine)  # the file's ids, kept as they are

    missing_path = compose_config("stage=instruction", "+dataset@stage.roles.pool.mine=file")
    with pytest.raises(DeliftInputError, match=r"stage\.roles\.pool\.mine\.path.*must be set"):
        build_stage(missing_path.stage, 0)
    stale_size = compose_config("stage=instruction", "~dataset@stage.roles.pool.gsm8k")
    with pytest.raises(DeliftInputError, match=r"~stage\.sizes\.pool\.gsm8k"):
        build_stage(stale_size.stage, 0)


def test_stage_errors_name_stage_and_role(tmp_path):
    cfg = compose_config("stage=instruction", "stage.holdout.eval.size=52")  # 60 - 52 - 8 leaves no pool
    with pytest.raises(DeliftInputError, match=r"stage instruction: role 'pool' is empty"):
        build_stage(cfg.stage, 0)
    cfg = compose_config("stage=task", "~stage.holdout.eval")
    with pytest.raises(DeliftInputError, match=r"stage task: role 'eval' is empty"):
        build_stage(cfg.stage, 0)
    cfg = compose_config("stage=continual", "stage.holdout.eval.size=100")
    with pytest.raises(DeliftInputError, match=r"cannot hold out 100 records for eval from role pool, which has 84"):
        build_stage(cfg.stage, 0)
    bad = write(tmp_path / "bad.jsonl", '{"input": "q"}\n')
    cfg = compose_config("stage=instruction", "+dataset@stage.roles.pool.mine=file",
                         f"stage.roles.pool.mine.path={bad}")
    with pytest.raises(DeliftInputError, match=r"bad\.jsonl.*line 1.*field 'output'"):
        build_stage(cfg.stage, 0)  # the loader's own error comes through Hydra's instantiate unchanged
    typo = {"name": "s", "objective": "fl", "roles": {"pool": {"x": {"_target_": "delift.data.load_file", "pth": "q"}}}}
    with pytest.raises(DeliftInputError, match=r"stage\.roles\.pool\.x.*unexpected keyword argument 'pth'"):
        build_stage(typo, 0)


def test_eval_prompts_never_reach_selection(tmp_path):
    # Five questions, each twice under different ids: the copy of a held-out question leaves the pool too.
    path = write(tmp_path / "twins.jsonl", "".join(
        json.dumps({"id": f"{k}-{copy}", "input": f"Question {k}?", "output": f"answer {k} {copy}"}) + "\n"
        for k in range(5) for copy in "ab"))
    cfg = {"name": "twins", "objective": "fl", "roles": {"pool": {"t": {"_target_": "delift.data.load_file",
                                                                        "path": str(path)}}},
           "holdout": {"eval": {"from": "pool", "size": 2}}}
    stage = build_stage(cfg, 3)
    eval_questions = {r["input"] for r in stage.eval}
    assert len(stage.eval) == 2 and not any(r["input"] in eval_questions for r in stage.pool)
    assert len(stage.pool) == 10 - 2 * len(eval_questions)
