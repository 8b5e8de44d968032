"""SelectIT's rating prompts and answer layouts, by name: `original` (the published method) and `delift` (ours).

The `original` wordings are the first five lines of data/rating_prompt.txt in
github.com/Blue-Raincoat/SelectIT (commit 4813250), reproduced as data: its scripts read the first
`-k` lines and its README runs `-k 5` (the file has nine). Its layout is the string built in
self_reflection/sentence_level.py:25 (`readlines()` keeps each wording's newline, hence the blank
line), fed to the model as plain text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RatingLayout:
    """How one (rating prompt, record) pair becomes the text whose next token is the score."""

    record_block: str  # with {rating_prompt}, {prompt} and {response}
    question: str  # ends the user turn; over-long records are cut before it, never inside it
    plain_end: str  # follows the question without a chat template, so that the score starts a line


RATING_PROMPTS = {
    "original": (
        "Assign a score from 1 to 5 to each assistant based on how accurately they follow the instructions and "
        "response provided, ensuring the score is represented clearly on its own.",
        "Score each assistant on a scale from one to five, reflecting the accuracy of their adherence to the "
        "instructions and input, and present this score plainly without the need for extra details.",
        "Rate each assistant's response accuracy to the given task and input on a scale of 1 to 5, with 5 being "
        "the most precise; the score should be self-explanatory and presented as a single line.",
        "Evaluate the assistants by the correctness of their response to the provided directions and response, "
        "giving them a rating between 1 and 5\u2014where a 5 indicates top accuracy\u2014and output the score "
        "clearly as a standalone line.",
        "Rate each assistant on a scale of 1 to 5 based on their adherence to the instructions and the accuracy "
        "of their responses, with the score clearly displayed.",
    ),
    "delift": (
        "Rate how well the response below follows the instruction and answers it correctly, on a scale "
        "from 1 (poor) to 5 (excellent). Reply with the number only.",
        "On a scale of 1 to 5, how accurate and helpful is the following response to the given instruction? "
        "Answer with a single digit.",
        "Judge the quality of this instruction-response pair. Give a score between 1 and 5, where 5 means the "
        "response is fully correct and complete. Output only the score.",
        "Score the response from 1 to 5 for how faithfully it carries out the instruction and how correct its "
        "content is. Write just the score.",
        "How good is this answer to the instruction? Use a 1-5 scale (1 = wrong or unhelpful, 5 = correct and "
        "precise) and give only the number.",
    ),
}

LAYOUTS = {
    # The original: rating_prompt + "\n" + "Instruction:" + ins + "\n" + "Response:" + res + "\nThe answer is: \n"
    "original": RatingLayout(record_block="{rating_prompt}\n\nInstruction:{prompt}\nResponse:{response}",
                             question="\nThe answer is:", plain_end=" \n"),
    # Kept free of surrounding whitespace in the question so chat templates that trim content keep it.
    "delift": RatingLayout(record_block="{rating_prompt}\n\nInstruction: {prompt}\nResponse: {response}",
                           question="\n\nScore (1-5):", plain_end="\n"),
}
