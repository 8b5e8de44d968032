"""How a record becomes a prompt for fine-tuning and generation (the kernel has its own templates).

Instruction-tuned models get their chat template (user turn = instruction + input); models without
one get a plain `Instruction/Input/Response` layout. Fine-tuning and generation use the same
function, so the model is evaluated in the format it was trained on.
"""

from __future__ import annotations

from delift.records import record_prompt

PLAIN_TEMPLATE = "{prompt}\nResponse: "


def format_prompt(tokenizer, record: dict, *, use_chat_template: bool = True, demonstrations=()) -> str:
    """The text the model continues with the record's response.

    `demonstrations` (in-context examples) become earlier user/assistant turns.
    """
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = []
        for demo in demonstrations:
            messages.append({"role": "user", "content": record_prompt(demo)})
            messages.append({"role": "assistant", "content": demo["output"]})
        messages.append({"role": "user", "content": record_prompt(record)})
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    shots = "".join(PLAIN_TEMPLATE.format(prompt=record_prompt(d)) + d["output"] + "\n\n" for d in demonstrations)
    return shots + PLAIN_TEMPLATE.format(prompt=record_prompt(record))


def response_token_ids(tokenizer, record: dict) -> list[int]:
    """The tokens a record's response is scored on: its output, tokenised alone, then the EOS that ends it
    (fine-tuning's labels and evaluation's reference loss alike)."""
    return tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
