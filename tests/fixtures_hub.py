"""Hand-written rows in the exact shapes `datasets` returns for the paper's hub datasets
(as each dataset card on the hub publishes them): a Sequence of dicts is a dict of lists, list<struct> a list of dicts.
Tests write them to JSONL in tmp_path and load them with load_hub(path="json", data_files=...)."""

import json

MIXINSTRUCT = [
    {"id": "unified_chip2/69962", "instruction": "",
     "input": "I've always wondered what the difference is between a skeptic and a denier.",
     "output": "A skeptic is someone who questions the validity of something, while a denier rejects it.",
     "candidates": [{"decoding_method": "top_p_sampling", "model": "oasst-sft-4-pythia-12b-epoch-3.5",
                     "text": "A skeptic is someone who doubts ...",
                     "scores": {"logprobs": -0.024, "rougeL": 0.232, "rouge2": 0.127, "rougeLsum": 0.232,
                                "rouge1": 0.286, "bleu": 5.66, "bertscore": 0.755, "bleurt": -0.4,
                                "bartscore": -3.4}}],
     "cmp_results": "{\"alpaca-native,vicuna-13b-1.1\": \"A is better\"}"},
    {"id": "dolly_15k/open_qa/7", "instruction": "Answer briefly.", "input": "Why is the sky blue?",
     "output": "Rayleigh scattering.", "candidates": [], "cmp_results": "null"},
]

P3_CNN = [
    {"inputs": [12198, 8, 826, 1],
     "inputs_pretokenized": "Sum the following article in brief: LONDON, England (Reuters) -- Harry Potter star "
                            "Daniel Radcliffe gains access to a reported £20 million fortune.",
     "targets": [8929, 1],
     "targets_pretokenized": "Harry Potter star Daniel Radcliffe gets £20M fortune as he turns 18 Monday .\n"
                             "Young actor says he has no plans to fritter his cash away ."},
]

HOTPOTQA = [
    {"id": "5a8b57f25542995d1e6f1371", "question": "Were Scott Derrickson and Ed Wood of the same nationality?",
     "answer": "yes", "type": "comparison", "level": "hard",
     # The third fact points past the end of its paragraph, as a few hub rows do: it is skipped.
     "supporting_facts": {"title": ["Scott Derrickson", "Ed Wood", "Ed Wood"], "sent_id": [0, 0, 5]},
     "context": {"title": ["Ed Wood (film)", "Scott Derrickson", "Ed Wood"],
                 "sentences": [["Ed Wood is a 1994 American biographical film.", " The film concerns Ed Wood."],
                               ["Scott Derrickson (born July 16, 1966) is an American director.",
                                " He lives in Los Angeles."],
                               ["Edward Davis Wood Jr. was an American filmmaker.", " He made cult films."]]}},
]

MMLU_ALL = [
    {"question": "What is the embryological origin of the hyoid bone?", "subject": "anatomy",
     "choices": ["The first pharyngeal arch", "The first and second pharyngeal arches",
                 "The second pharyngeal arch", "The second and third pharyngeal arches"], "answer": 3},
    {"question": "Which planet is known as the Red Planet?", "subject": "astronomy",
     "choices": ["Venus", "Mars", "Jupiter", "Saturn"], "answer": 1},
]

# The `auxiliary_train` config: one column, `train`, a struct.
MMLU_AUXILIARY_TRAIN = [
    {"train": {"answer": 0, "choices": ["Oxygen", "Helium", "Neon", "Argon"],
               "question": "Which gas do humans need to breathe?", "subject": ""}},
]

SQUAD = [
    {"id": "5733be284776f41900661182", "title": "University_of_Notre_Dame",
     "context": "Architecturally, the school has a Catholic character. It is a replica of the grotto at Lourdes, "
                "France where the Virgin Mary reputedly appeared to Saint Bernadette Soubirous in 1858.",
     "question": "To whom did the Virgin Mary allegedly appear in 1858 in Lourdes France?",
     "answers": {"text": ["Saint Bernadette Soubirous", "Saint Bernadette Soubirous", "Bernadette"],
                 "answer_start": [106, 106, 112]}},
]

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "A shop sells 250 pens a day for 4 days. How many pens does it sell?",
     "answer": "It sells 250*4 = <<250*4=1000>>1,000 pens.\n#### 1,000"},
]


def _conversation(question, answer):
    return [{"content": question, "role": "user"}, {"content": answer, "role": "assistant"},
            {"content": "Rewrite your previous response.", "role": "user"}, {"content": "...", "role": "assistant"}]


# lmsys/mt_bench_human_judgments: one row per judgment; each conversation holds both turns.
MTBENCH = [
    {"question_id": 81, "model_a": "alpaca-13b", "model_b": "gpt-4", "winner": "model_b", "judge": "expert_0",
     "conversation_a": _conversation("Compose a travel blog post about Hawaii.", "Hawaii is nice."),
     "conversation_b": _conversation("Compose a travel blog post about Hawaii.", "Aloha! My trip to Hawaii..."),
     "turn": 1},
    {"question_id": 81, "model_a": "gpt-4", "model_b": "claude-v1", "winner": "tie", "judge": "expert_1",
     "conversation_a": _conversation("Compose a travel blog post about Hawaii.", "Aloha! My trip to Hawaii..."),
     "conversation_b": _conversation("Compose a travel blog post about Hawaii.", "Hawaii, the Aloha state."),
     "turn": 1},
    {"question_id": 81, "model_a": "gpt-4", "model_b": "llama-13b", "winner": "model_a", "judge": "expert_0",
     "conversation_a": _conversation("Compose a travel blog post about Hawaii.", "Aloha! My trip to Hawaii..."),
     "conversation_b": _conversation("Compose a travel blog post about Hawaii.", "ok"), "turn": 2},
    {"question_id": 82, "model_a": "vicuna-13b-v1.2", "model_b": "gpt-4", "winner": "model_b", "judge": "author_0",
     "conversation_a": _conversation("Draft an email asking for feedback.", "Dear boss..."),
     "conversation_b": _conversation("Draft an email asking for feedback.", "Subject: Feedback request"),
     "turn": 1},
    {"question_id": 83, "model_a": "alpaca-13b", "model_b": "llama-13b", "winner": "tie", "judge": "expert_2",
     "conversation_a": _conversation("Compare two phones.", "A is better."),
     "conversation_b": _conversation("Compare two phones.", "B is better."), "turn": 1},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)
