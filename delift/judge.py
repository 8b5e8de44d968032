"""LLM-as-judge ("LAJ" in the paper): Prometheus-style absolute grading of a prediction, 1 to 5.

The judge reads the instruction (record instruction + input), the prediction, the reference
answer (the record's output, worth a 5) and a rubric, writes feedback, then `[RESULT] N`.
Two scores per example:
- `laj`: N parsed from the end of the feedback as prometheus-eval parses it; an output without one
  is written again (sampled, up to `parse_retries` times, as prometheus-eval retries), and one that
  still has none is counted, never replaced by a number;
- `laj_weighted`: sum_k k * p_k over the judge's next-token distribution right after
  `[RESULT] `, renormalised over the score tokens "1".."5" (defined for every example).

The prompt is the judge's interface, so it follows prometheus-eval's absolute-grading format
(`prometheus_eval/prompts.py`: ABS_SYSTEM_PROMPT, ABSOLUTE_PROMPT with a reference answer,
SCORE_RUBRIC_TEMPLATE; rule 3 as in the prometheus-7b-v2.0 model card, with `Feedback: `), sent as
one user message: system prompt + "\\n\\n" + filled template. The paper's judge is
prometheus-eval/prometheus-7b-v2.0; any other model is a stand-in and is marked as such.
The rubric is ours (DEFAULT_RUBRIC), the paper's (`rubric: reference`) or any custom text.
"""

from __future__ import annotations

import gc
import logging
import math
import re

import numpy as np
import torch

from delift.errors import DeliftInputError
from delift.generation import generate, next_token_log_probs, score_token_ids
from delift.models import LoadedModel
from delift.records import record_prompt

log = logging.getLogger(__name__)

ABS_SYSTEM_PROMPT = (
    "You are a fair judge assistant tasked with providing clear, objective feedback based on specific criteria, "
    "ensuring each assessment reflects the absolute standards set for performance."
)

ABSOLUTE_PROMPT = """###Task Description:
An instruction (might include an Input inside it), a response to evaluate, a reference answer that gets a score of 5, and a score rubric representing a evaluation criteria are given.
1. Write a detailed feedback that assess the quality of the response strictly based on the given score rubric, not evaluating in general.
2. After writing a feedback, write a score that is an integer between 1 and 5. You should refer to the score rubric.
3. The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"
4. Please do not generate any other opening, closing, and explanations.

###The instruction to evaluate:
{instruction}

###Response to evaluate:
{response}

###Reference Answer (Score 5):
{reference_answer}

###Score Rubrics:
{rubric}

###Feedback: """

RUBRIC_TEMPLATE = """[{criteria}]
Score 1: {score1}
Score 2: {score2}
Score 3: {score3}
Score 4: {score4}
Score 5: {score5}"""

SCORES = (1, 2, 3, 4, 5)


def format_rubric(criteria: str, descriptions) -> str:
    """A rubric in Prometheus' format: `[criteria]` then one `Score k: ...` line per score 1..5."""
    descriptions = list(descriptions)
    if len(descriptions) != len(SCORES):
        raise DeliftInputError(f"needs {len(SCORES)} score descriptions, got {len(descriptions)}",
                               field="judge.rubric")
    return RUBRIC_TEMPLATE.format(criteria=criteria, **{f"score{k}": d for k, d in zip(SCORES, descriptions)})


DEFAULT_RUBRIC = format_rubric(
    "Does the response answer the instruction correctly and helpfully, agreeing in substance with the reference answer?",
    [
        "The response is wrong, irrelevant or empty: it contradicts the reference answer or ignores the instruction.",
        "The response addresses the instruction but is mostly incorrect, or misses the main point of the reference "
        "answer.",
        "The response is partly correct: it has some of the reference answer's key content, with notable errors or "
        "omissions.",
        "The response is correct in substance and helpful, with only minor errors, omissions or superfluous content.",
        "The response is fully correct and helpful: it matches the reference answer in substance and answers the "
        "instruction completely and clearly.",
    ],
)


# The paper's rubric, word for word: the DELIFT reference code, visualization/similarity.py,
# calculate_prometheus (rubric_data, github.com/agarwalishika/DELIFT at b282b9f).
REFERENCE_RUBRIC = format_rubric(
    "Evaluate the model's ability to follow instructions and deliver a high-quality response across the "
    "following dimensions:\n"
    "1. **Instruction Following**: How accurately and fully does the model adhere to the given instruction?\n"
    "2. **Accuracy**: Is the information correct, reliable, and factually sound?\n"
    "3. **Relevance**: Does the response directly address the question or task without unnecessary information?\n"
    "4. **Completeness**: Does the response cover all essential aspects of the instruction or question?\n"
    "5. **Depth**: How thoroughly does the response explore the topic? Does it demonstrate insightful analysis "
    "where appropriate?\n"
    "6. **Clarity**: Is the response well-organized, easy to follow, and free from ambiguity or confusion?\n"
    "7. **Creativity**: Does the response offer original or innovative approaches where applicable?\n"
    "8. **Helpfulness**: Does the response effectively meet the user's needs and provide value in solving the "
    "problem or addressing the query?",
    [
        "The response fails to meet expectations across most or all criteria. It does not follow the instruction, "
        "contains significant errors or misinformation, lacks relevance, is incomplete or shallow, unclear, "
        "unoriginal, and unhelpful.",
        "The response shows major deficiencies across several criteria. It partially follows the instruction but "
        "includes significant inaccuracies, is often irrelevant, incomplete, or lacks depth, clarity, creativity, "
        "and helpfulness.",
        "The response is average, meeting some but not all criteria. It follows the instruction but may fall short "
        "in terms of accuracy, depth, relevance, or helpfulness. Improvements in clarity and insightfulness may be "
        "needed.",
        "The response is strong, performing well across most criteria. It follows the instruction closely, is mostly "
        "accurate and relevant, provides good depth, and is well-structured. Minor improvements could enhance "
        "clarity, creativity, or helpfulness.",
        "The response excels in all or nearly all criteria. It fully follows the instruction, is highly accurate, "
        "directly relevant, complete, and demonstrates depth and insight. The response is well-organized, creative "
        "where appropriate, and very helpful in addressing the user's needs.",
    ],
)

# `judge.rubric` names: any other string is a rubric text of its own.
RUBRICS = {"default": DEFAULT_RUBRIC, "reference": REFERENCE_RUBRIC}


def resolve_rubric(rubric: str | None) -> str:
    """The rubric text for `judge.rubric`: null is DEFAULT_RUBRIC, a name in RUBRICS its text, else the text itself."""
    if rubric is None:
        return DEFAULT_RUBRIC
    rubric = str(rubric).strip()
    return RUBRICS.get(rubric, rubric)


def absolute_prompt(instruction: str, response: str, reference_answer: str, rubric: str = DEFAULT_RUBRIC) -> str:
    """The judge's user message: the system prompt, a blank line, the filled absolute-grading template."""
    return ABS_SYSTEM_PROMPT + "\n\n" + ABSOLUTE_PROMPT.format(
        instruction=instruction, response=response, reference_answer=reference_answer, rubric=rubric)


# prometheus-eval's absolute parser re-implemented (libs/prometheus-eval/prometheus_eval/parser.py,
# _parse_output_absolute): a marker, opening brackets or spaces, an integer, then at most one closing
# bracket or space, "/5" or "out of 5", and only whitespace to the end of the output.
_FINAL_SCORE = re.compile(r"(?:\[RESULT\]:?|\[SCORE\]|Result:?|Score:?|score\s+of)"
                          r"[\s(\[]*(\d+)(?:[)\]\s]|/\s*5|\s*out\s*of\s*5)?\s*$", re.IGNORECASE)
_RESULT_MARKER = re.compile(r"\[RESULT\]", re.IGNORECASE)


def parse_absolute(text: str) -> int | None:
    """The 1-5 score that ends the judge's output, or None when it does not end with one.

    As prometheus-eval parses: `[RESULT] 4`, `[RESULT]: 4`, `[SCORE] 4`, `Score: 4`, `Result: 4`,
    `score of 4` (case-insensitive), with optional brackets and an optional `/5` or `out of 5`,
    followed by nothing but whitespace. So a score the feedback mentions before its verdict never
    counts, and an output that goes on after its score ("[RESULT] 4. Thanks", "[RESULT] 3 4") has
    none. Integers outside 1..5 give None, as does a number written in words.
    """
    match = _FINAL_SCORE.search(text)
    if match is None:
        return None
    score = int(match.group(1))
    return score if score in SCORES else None


def result_prefix(feedback: str) -> str:
    """The judge's text up to where the score token comes: through the last `[RESULT]`, plus a space.

    Feedback without the marker (cut by max_new_tokens, or off-format) gets ` [RESULT] ` appended,
    so every example has a probability-weighted score; its discrete score still counts as a failure.
    """
    # The last marker: the discrete score is read at the end of the output too.
    markers = list(_RESULT_MARKER.finditer(feedback))
    if markers:
        return feedback[:markers[-1].end()] + " "
    return f"{feedback} [RESULT] " if feedback else "[RESULT] "


def expected_scores(score_probs) -> np.ndarray:
    """sum_k k * p_k with p renormalised over the five score tokens (last axis, scores 1..5)."""
    probs = np.asarray(score_probs, dtype=np.float64)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs @ np.asarray(SCORES, dtype=np.float64)


def check_score_position(tokenizer, score_ids: list[int]) -> None:
    """The score digit must be a token of its own right after `[RESULT] ` (the trailing space apart).

    A tokenizer that merged " 4" into one token would make the next-token distribution after the
    space meaningless, so such a judge is refused rather than silently mis-scored.
    """
    probe = "Feedback: fine. [RESULT] "
    head = tokenizer.encode(probe, add_special_tokens=False)
    for score, score_id in zip(SCORES, score_ids):
        if tokenizer.encode(probe + str(score), add_special_tokens=False) != head + [score_id]:
            raise DeliftInputError(f"this tokenizer does not put the score {score} in a token of its own after "
                                   f"'[RESULT] ', so the weighted score cannot be read there", field="judge.model")


@torch.inference_mode()
def score_distributions(model, tokenizer, sequences: list[list[int]], *, batch_size: int = 8,
                        progress: bool = True) -> np.ndarray:
    """(n, 5) probabilities of the next token being "1".."5" after each sequence, renormalised over the five."""
    log_probs = next_token_log_probs(model, tokenizer, sequences, score_token_ids(tokenizer), batch_size=batch_size,
                                     progress=progress, desc="judge score tokens")
    # Renormalising the full-vocabulary probabilities over the five = a softmax of their log-probs.
    return torch.softmax(torch.from_numpy(log_probs), dim=-1).numpy()


class Judge:
    """A Prometheus-style absolute grader, instantiated from `delift/conf/judge/*.yaml`.

    `model` is a model spec (loaded on first use) or an already `LoadedModel`. `stand_in` is
    True for any judge that is not prometheus-7b-v2.0: every table must say so.
    `feedback=False` grades directly: no feedback is generated, the judge's next token after
    `[RESULT] ` gives the distribution, `laj` is its most probable score (nothing to parse) and
    `laj_weighted` its expectation. It is one forward pass per example, for CPU-sized stand-ins.
    `rubric`: null (ours), a name in RUBRICS ("reference": the paper's) or a rubric text.
    `parse_retries`: how often feedback without a final score is written again (prometheus-eval's
    default: 10); with sampling only, since greedy decoding would write the same text again.
    `repetition_penalty`: on the tokens of the prompt and of the feedback so far (prometheus-eval's: 1.03; 1.0 is off).
    """

    def __init__(self, model, name: str, stand_in: bool = True, rubric: str | None = None,
                 feedback: bool = True, max_new_tokens: int = 256, batch_size: int = 8, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 parse_retries: int = 10, max_field_tokens: int = 1024,
                 use_chat_template: bool = True, device: str = "auto", seed: int = 0, progress: bool = True):
        self.model = model
        self.name = str(name)
        self.stand_in = bool(stand_in)
        self.rubric = resolve_rubric(rubric)
        missing = [k for k in SCORES if f"Score {k}:" not in self.rubric]
        if missing:
            raise DeliftInputError(f"the rubric lacks the lines 'Score {missing[0]}: ...' (format: '[criteria]' "
                                   f"then 'Score 1: ...' to 'Score 5: ...'; or one of the names "
                                   f"{sorted(RUBRICS)})", field="judge.rubric")
        if int(parse_retries) < 0:
            raise DeliftInputError(f"must be at least 0, got {parse_retries}", field="judge.parse_retries")
        self.parse_retries = int(parse_retries)
        if not float(repetition_penalty) > 0:
            raise DeliftInputError(f"must be above 0 (1.0 is no penalty), got {repetition_penalty}",
                                   field="judge.repetition_penalty")
        self.repetition_penalty = float(repetition_penalty)
        for option, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size),
                              ("max_field_tokens", max_field_tokens)):
            if int(value) < 1:
                raise DeliftInputError(f"must be at least 1, got {value}", field=f"judge.{option}")
        self.feedback = bool(feedback)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.do_sample = bool(do_sample)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.max_field_tokens = int(max_field_tokens)
        self.use_chat_template = bool(use_chat_template)
        self.device = device
        self.seed = int(seed)
        self.progress = bool(progress)
        self._loaded: LoadedModel | None = model if isinstance(model, LoadedModel) else None

    @property
    def loaded(self) -> LoadedModel:
        """The judge model, loaded onto `device` (delift.devices: auto is CUDA when present) on first use."""
        if self._loaded is None:
            self._loaded = self.model.load(self.device)
        return self._loaded

    def unload(self) -> None:
        """Free a judge this object loaded itself (a 7B judge should not sit beside the next run's model)."""
        if not isinstance(self.model, LoadedModel) and self._loaded is not None:
            self._loaded = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _clip(self, tokenizer, text: str) -> tuple[str, bool]:
        """Keep a field within max_field_tokens, so a long one never pushes the template out of the context."""
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= self.max_field_tokens:
            return text, False
        return tokenizer.decode(ids[:self.max_field_tokens]) + " [...]", True

    def prompts(self, records: list[dict], predictions: list[str]) -> list[str]:
        """The judge's input text for each (record, prediction), chat-formatted where the tokenizer has a template."""
        tokenizer = self.loaded.tokenizer
        chat = self.use_chat_template and getattr(tokenizer, "chat_template", None)
        # generate() tokenizes without special tokens: a plain prompt gets the BOS its tokenizer would add.
        bos = tokenizer.bos_token or ""
        adds_bos = bool(bos) and tokenizer.encode("x")[:1] == [tokenizer.bos_token_id]
        texts, clipped = [], 0
        for rec, prediction in zip(records, predictions):
            fields = [self._clip(tokenizer, text) for text in (record_prompt(rec), prediction, rec["output"])]
            clipped += sum(was_clipped for _, was_clipped in fields)
            user = absolute_prompt(*(text for text, _ in fields), rubric=self.rubric)
            if chat:
                texts.append(tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                           add_generation_prompt=True, tokenize=False))
            else:
                texts.append(bos + user if adds_bos else user)
        if clipped:
            log.warning("judge: %d instruction/response/reference fields cut to judge.max_field_tokens=%d tokens; "
                        "raise it to grade them whole", clipped, self.max_field_tokens)
        return texts

    def write_feedback(self, model, tokenizer, texts: list[str], max_prompt_tokens: int
                       ) -> tuple[list[str], list[int | None], list[int]]:
        """(feedback, its final score or None, generations spent) per prompt.

        As prometheus-eval's batch_completions_with_retries (prometheus_eval/utils.py): the prompts
        whose output has no final score are generated again with the same settings, up to
        `parse_retries` rounds; a retry with a score replaces the output, and after the last round a
        failure keeps its first output. Greedy decoding would repeat itself, so it gets no retries.
        """
        def write(prompts):
            return generate(model, tokenizer, prompts, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                            do_sample=self.do_sample, temperature=self.temperature, top_p=self.top_p,
                            repetition_penalty=self.repetition_penalty, max_prompt_tokens=max_prompt_tokens,
                            progress=self.progress)

        with torch.random.fork_rng():  # seeded sampling (if enabled) without touching the caller's RNG
            torch.manual_seed(self.seed)
            feedback = write(texts)
            scores = [parse_absolute(text) for text in feedback]
            attempts = [1] * len(texts)
            for _ in range(self.parse_retries if self.do_sample else 0):
                failed = [i for i, score in enumerate(scores) if score is None]
                if not failed:
                    break
                for i, text in zip(failed, write([texts[i] for i in failed])):
                    attempts[i] += 1
                    score = parse_absolute(text)
                    if score is not None:
                        feedback[i], scores[i] = text, score
        return feedback, scores, attempts

    def judge(self, records: list[dict], predictions: list[str]) -> tuple[dict, list[dict]]:
        """Grade each prediction against its record; returns (metrics, per-example rows).

        metrics: laj (mean parsed score over the parsed examples; NaN when none parsed), laj_weighted
        (mean probability-weighted score over all), laj_parse_failures (no score even after the
        retries), laj_retried (examples whose feedback was written more than once), laj_n.
        Rows: {"laj": int | None, "laj_weighted": float, "judge_feedback": str, "judge_attempts": int}
        (attempts 0 when grading directly).
        """
        if len(records) != len(predictions):
            raise DeliftInputError(f"{len(predictions)} predictions for {len(records)} records",
                                   field="predictions")
        for rec, prediction in zip(records, predictions):
            if not isinstance(prediction, str):
                raise DeliftInputError(f"must be a string, got {type(prediction).__name__}", record=rec["id"],
                                       field="prediction")
            if not rec["output"].strip():
                raise DeliftInputError("is empty: the judge needs a reference answer", record=rec["id"],
                                       field="output")
        if not records:
            return {"laj": math.nan, "laj_weighted": math.nan, "laj_parse_failures": 0, "laj_retried": 0,
                    "laj_n": 0}, []
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        check_score_position(tokenizer, score_token_ids(tokenizer))
        texts = self.prompts(records, predictions)
        prompt_ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
        if self.feedback:
            feedback, scores, attempts = self.write_feedback(model, tokenizer, texts, max(map(len, prompt_ids)))
        else:
            feedback, attempts = [""] * len(texts), [0] * len(texts)
        # The weighted score reads the judge's next token after its own feedback, prompt ids unchanged.
        sequences = [ids + tokenizer.encode(result_prefix(text), add_special_tokens=False)
                     for ids, text in zip(prompt_ids, feedback)]
        distributions = score_distributions(model, tokenizer, sequences, batch_size=self.batch_size,
                                            progress=self.progress)
        weighted = expected_scores(distributions)
        if not self.feedback:
            scores = [SCORES[int(np.argmax(p))] for p in distributions]
        parsed = [score for score in scores if score is not None]
        metrics = {
            "laj": float(np.mean(parsed)) if parsed else math.nan,
            "laj_weighted": float(weighted.mean()),
            "laj_parse_failures": len(scores) - len(parsed),
            "laj_retried": sum(n > 1 for n in attempts),
            "laj_n": len(scores),
        }
        if metrics["laj_parse_failures"]:
            log.warning("judge %s: %d of %d outputs had no final 1-5 score (after up to %d retries); raise "
                        "judge.max_new_tokens (feedback cut short) or judge.parse_retries", self.name,
                        metrics["laj_parse_failures"], len(scores), self.parse_retries if self.do_sample else 0)
        rows = [{"laj": score, "laj_weighted": float(w), "judge_feedback": text, "judge_attempts": n}
                for score, w, text, n in zip(scores, weighted, feedback, attempts)]
        return metrics, rows
