"""Data: user files, the paper's hub datasets, offline packaged benchmarks, and the stage builder.

Every loader returns validated records {id, instruction, input, output, source, meta}.

`meta.subtask` is the one field that names a record's subtask within a dataset made of subtasks
(LESS averages over each subtask's target examples, then takes the best subtask): MMLU's subject,
GPQA's subdomain, MT-Bench's category, the trivia list. It is absent where a dataset has no
subtasks (GSM8K, SQuAD, HotpotQA, MixInstruct, P3) or a row names none (MMLU `auxiliary_train`).
A user file sets it in its own `meta`.
"""

from delift.data.files import load_file
from delift.data.hub import (
    HUB_MAPPERS,
    gsm8k_record,
    hotpotqa_record,
    load_hub,
    mixinstruct_record,
    mmlu_record,
    p3_record,
    squad_record,
)
from delift.data.packaged import load_gpqa_offline, load_gsm8k_offline, load_mmlu_offline, load_trivia_offline
from delift.data.stages import StageData, build_stage

__all__ = [
    "HUB_MAPPERS",
    "StageData",
    "build_stage",
    "gsm8k_record",
    "hotpotqa_record",
    "load_file",
    "load_gpqa_offline",
    "load_gsm8k_offline",
    "load_hub",
    "load_mmlu_offline",
    "load_trivia_offline",
    "mixinstruct_record",
    "mmlu_record",
    "p3_record",
    "squad_record",
]
