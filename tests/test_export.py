"""Exports of the subset: the HF dataset folder, the chat JSONL, the hub push (stubbed), atomic writes."""

import json
from pathlib import Path

import datasets
import pytest
from omegaconf import OmegaConf

from delift.errors import DeliftInputError
from delift.export import CHAT_FILE, HF_FOLDER, export_subset
from delift.prompts import format_prompt
from delift.records import make_record
from tests.helpers import CONF_DIR

# Meta with different keys and value types per record: what an Arrow struct column cannot hold.
METAS = [{"answer": "B", "answer_type": "choice"}, {}, {"answer": 42, "answer_type": "number"},
         {"nested": {"a": [1, 2]}, "score": 0.5, "note": "café"}]


@pytest.fixture
def subset():
    records = [make_record(f"pool/{k}", f"Instruction {k}", "" if k == 1 else f"Input {k}", f"Output {k}",
                           source=f"src{k % 2}", meta=meta) for k, meta in enumerate(METAS)]
    return records, [7, 2, 11, 0]  # selection order is not pool order


def test_hf_dataset_round_trips_the_subset(tmp_path, subset):
    records, indices = subset
    written = export_subset(tmp_path, records, indices, formats=["hf"])

    assert written == {"hf": tmp_path / HF_FOLDER}
    dataset = datasets.load_from_disk(str(tmp_path / HF_FOLDER))
    assert dataset.column_names == ["id", "instruction", "input", "output", "source", "meta_json", "pool_index"]
    assert dataset["id"] == ["pool/0", "pool/1", "pool/2", "pool/3"]
    assert dataset["pool_index"] == [7, 2, 11, 0]
    for row, record in zip(dataset, records):
        assert {k: row[k] for k in ("id", "instruction", "input", "output", "source")} == \
               {k: record[k] for k in ("id", "instruction", "input", "output", "source")}
        assert json.loads(row["meta_json"]) == record["meta"]
    assert [json.loads(m) for m in dataset["meta_json"]] == METAS
    assert not (tmp_path / CHAT_FILE).exists()


def test_empty_subset_keeps_the_columns(tmp_path):
    export_subset(tmp_path, [], [], formats=["hf"])
    dataset = datasets.load_from_disk(str(tmp_path / HF_FOLDER))
    assert len(dataset) == 0
    assert dataset.features["pool_index"].dtype == "int64"
    assert dataset.features["meta_json"].dtype == "string"


def test_chat_jsonl_has_the_sft_messages_shape(tmp_path, subset):
    records, indices = subset
    written = export_subset(tmp_path, records, indices, formats=["chat"])

    assert written == {"chat": tmp_path / CHAT_FILE}
    rows = [json.loads(line) for line in (tmp_path / CHAT_FILE).read_text(encoding="utf-8").splitlines()]
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    assert [row["pool_index"] for row in rows] == indices
    assert [row["source"] for row in rows] == ["src0", "src1", "src0", "src1"]
    for row, record in zip(rows, records):
        assert set(row) == {"messages", "id", "source", "pool_index"}
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in row["messages"])
        assert row["messages"][1]["content"] == record["output"]
    # instruction + input, one line each; a record without input has the instruction alone
    assert rows[0]["messages"][0]["content"] == "Instruction 0\nInput 0"
    assert rows[1]["messages"][0]["content"] == "Instruction 1"
    assert not (tmp_path / HF_FOLDER).exists()

    loaded = datasets.load_dataset("json", data_files=str(tmp_path / CHAT_FILE), split="train",
                                   cache_dir=str(tmp_path / "hf_cache"))
    assert len(loaded) == 4
    assert loaded.features["messages"] == datasets.List({"role": datasets.Value("string"),
                                                         "content": datasets.Value("string")})
    assert loaded[2]["messages"] == [{"role": "user", "content": "Instruction 2\nInput 2"},
                                     {"role": "assistant", "content": "Output 2"}]
    assert loaded["pool_index"] == indices


class RecordingChatTokenizer:
    """Captures the messages format_prompt hands to the chat template."""

    chat_template = "recorded"

    def __init__(self):
        self.messages = None

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        self.messages = messages
        return ""


def test_chat_user_turn_is_what_finetuning_trains_on(tmp_path, subset):
    records, indices = subset
    export_subset(tmp_path, records, indices, formats=["chat"])
    rows = [json.loads(line) for line in (tmp_path / CHAT_FILE).read_text(encoding="utf-8").splitlines()]
    for row, record in zip(rows, records):
        tokenizer = RecordingChatTokenizer()
        format_prompt(tokenizer, record)
        assert tokenizer.messages == row["messages"][:1]  # no system turn; the assistant turn is the target


def test_push_to_hub_pushes_the_dataset_with_the_private_flag(tmp_path, subset, monkeypatch):
    records, indices = subset
    calls = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub",
                        lambda self, repo_id, **kw: calls.append((repo_id, kw, self["id"], self["pool_index"])))

    written = export_subset(tmp_path, records, indices, formats=[], push_to_hub="me/subset", private=False)

    assert calls == [("me/subset", {"private": False}, [r["id"] for r in records], indices)]
    assert written == {"hub": "me/subset"}
    assert not (tmp_path / HF_FOLDER).exists()


def test_push_to_hub_unset_never_calls_the_hub(tmp_path, subset, monkeypatch):
    records, indices = subset

    def no_push(*args, **kwargs):
        raise AssertionError("push_to_hub called")

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", no_push)
    written = export_subset(tmp_path, records, indices)
    assert set(written) == {"hf", "chat"}


def test_hub_failure_names_the_option_and_keeps_local_exports(tmp_path, subset, monkeypatch):
    records, indices = subset

    def offline(self, repo_id, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", offline)
    with pytest.raises(DeliftInputError, match=r"field 'export.push_to_hub'.*'me/subset'.*ConnectionError"):
        export_subset(tmp_path, records, indices, push_to_hub="me/subset")
    assert len(datasets.load_from_disk(str(tmp_path / HF_FOLDER))) == 4
    assert (tmp_path / CHAT_FILE).exists()


def test_interrupted_save_leaves_no_folder(tmp_path, subset, monkeypatch):
    records, indices = subset

    def crash_midway(self, path, **kwargs):
        (Path(path) / "data-00000-of-00001.arrow").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        export_subset(tmp_path, records, indices, formats=["hf"])
    assert list(tmp_path.iterdir()) == []  # neither the final folder nor a staging leftover


def test_interrupted_re_export_keeps_the_earlier_one_whole(tmp_path, subset, monkeypatch):
    records, indices = subset
    export_subset(tmp_path, records, indices, formats=["hf"])

    def crash(self, path, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", crash)
    with pytest.raises(OSError, match="disk full"):
        export_subset(tmp_path, records[:1], indices[:1], formats=["hf"])
    monkeypatch.undo()
    assert datasets.load_from_disk(str(tmp_path / HF_FOLDER))["id"] == [r["id"] for r in records]
    assert [p.name for p in tmp_path.iterdir()] == [HF_FOLDER]


def test_re_export_replaces_the_earlier_one(tmp_path, subset):
    records, indices = subset
    export_subset(tmp_path, records, indices, formats=["hf"])
    export_subset(tmp_path, records[2:], indices[2:], formats=["hf"])
    assert datasets.load_from_disk(str(tmp_path / HF_FOLDER))["pool_index"] == [11, 0]
    assert [p.name for p in tmp_path.iterdir()] == [HF_FOLDER]


def test_bad_options_name_the_field(tmp_path, subset):
    records, indices = subset
    with pytest.raises(DeliftInputError, match=r"field 'export.formats'.*'parquet'"):
        export_subset(tmp_path, records, indices, formats=["hf", "parquet"])
    with pytest.raises(DeliftInputError, match=r"field 'export.push_to_hub'"):
        export_subset(tmp_path, records, indices, push_to_hub="  ")
    assert list(tmp_path.iterdir()) == []


def test_config_group_keys_are_the_keyword_arguments(tmp_path, subset):
    records, indices = subset
    options = OmegaConf.to_container(OmegaConf.load(Path(CONF_DIR) / "export" / "default.yaml"))
    assert options == {"formats": ["hf", "chat"], "push_to_hub": None, "private": True}
    assert set(export_subset(tmp_path / "run", records, indices, **options)) == {"hf", "chat"}
