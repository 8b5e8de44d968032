"""Prompt templates and tokenisation for the DELIFT utility kernel.

A record is rendered as a prompt (`Instruction: {instruction}\\nInput: {input}\\n`) and a response
(` {output}`). The scored sequence of a pair is

    tokens(prompt text) + [EOS] + tokens(response) + [EOS]

tokenised with `add_special_tokens=False`, where the prompt text is the zero-shot template (no
demonstration) or the one-shot template (demonstration j, then query i). Only the response
tokens and the closing EOS are scored.

The fast engine splits the one-shot prompt at `{prompt_i}`: the *demonstration block* (everything
before it, ending in `Query:\\n` by default) is tokenised once per column, the *query* (the rest)
once per row. `UtilityInputs.boundary_safe` checks, pair by pair, that the two token lists
concatenate to the tokens of the whole string; pairs where the tokenizer merges across that
boundary are scored from the whole string instead.
"""

from __future__ import annotations

import string
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from delift.cache import content_hash
from delift.errors import DeliftInputError

ZERO_SHOT_INSTRUCTION = "Please generate a response to the following query."
ONE_SHOT_INSTRUCTION = ("Use the following example as a guide to answer the query in the same format and style, "
                        "providing a clear and concise response.")

# Characters on each side of the demonstration/query boundary that the merge check tokenises.
# Assumes a tokenizer's pre-tokens never let a merge reach further than this across the boundary.
BOUNDARY_WINDOW_CHARS = 32

_PLACEHOLDERS = {
    "prompt": ({"instruction", "input"}, set()),
    "response": ({"output"}, {"output"}),
    "zero_shot": ({"instruction", "prompt"}, {"prompt"}),
    "one_shot": ({"instruction", "prompt_j", "response_j", "prompt_i"}, {"prompt_j", "response_j", "prompt_i"}),
}


def _parse(template: str, name: str) -> list[tuple[str, str | None]]:
    """(literal text, placeholder or None) pieces of a str.format template, checked for `name`."""
    allowed, required = _PLACEHOLDERS[name]
    where = f"kernel.template.{name}"
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as err:
        raise DeliftInputError(f"is not a valid format string ({err})", field=where) from err
    seen = []
    for _, placeholder, spec, conversion in pieces:
        if placeholder is None:
            continue
        if placeholder not in allowed:
            raise DeliftInputError(f"unknown placeholder {{{placeholder}}}; allowed: {sorted(allowed)}", field=where)
        if spec or conversion:
            raise DeliftInputError(f"placeholder {{{placeholder}}} takes no format spec or conversion", field=where)
        seen.append(placeholder)
    missing = required - set(seen)
    if missing:
        raise DeliftInputError(f"must contain {sorted(missing)}", field=where)
    return [(literal, placeholder) for literal, placeholder, _, _ in pieces]


def _render(pieces, values: Mapping[str, str]) -> str:
    return "".join(literal + (values[placeholder] if placeholder is not None else "")
                   for literal, placeholder in pieces)


@dataclass(frozen=True)
class UtilityTemplate:
    """How records become prompts; the defaults are the reference code's templates.

    `prompt`/`response` format a record; `zero_shot` holds `{prompt}` (no demonstration) and
    `one_shot` holds `{prompt_j}`/`{response_j}` (the demonstration) before `{prompt_i}` (the
    query). `{instruction}` in those two is the matching `*_instruction` string, not the record's.
    """

    prompt: str = "Instruction: {instruction}\nInput: {input}\n"
    response: str = " {output}"
    zero_shot: str = "Instruction: {instruction}\n\n\nQuery: {prompt}\n"
    zero_shot_instruction: str = ZERO_SHOT_INSTRUCTION
    one_shot: str = "Instruction:\n{instruction}\n\n\nExample:\n{prompt_j}\n{response_j}\n\n\nQuery:\n{prompt_i}\n"
    one_shot_instruction: str = ONE_SHOT_INSTRUCTION

    def __post_init__(self):
        for name in _PLACEHOLDERS:
            _parse(getattr(self, name), name)
        one_shot = _parse(self.one_shot, "one_shot")
        order = [placeholder for _, placeholder in one_shot if placeholder is not None]
        demonstration_first = all(order.index(p) < order.index("prompt_i") for p in ("prompt_j", "response_j"))
        if order.count("prompt_i") != 1 or not demonstration_first:
            # The demonstration must be a prefix of every pair's prompt for its KV cache to be shared.
            raise DeliftInputError("needs {prompt_i} exactly once, after {prompt_j} and {response_j}",
                                   field="kernel.template.one_shot")

    @classmethod
    def from_config(cls, template) -> "UtilityTemplate":
        """None (defaults), a UtilityTemplate, or a mapping of fields to override (Hydra config)."""
        if template is None:
            return cls()
        if isinstance(template, cls):
            return template
        if not isinstance(template, Mapping):
            raise DeliftInputError(f"must be a mapping, got {type(template).__name__}", field="kernel.template")
        known = {f.name for f in fields(cls)}
        unknown = set(template) - known
        if unknown:
            raise DeliftInputError(f"unknown keys {sorted(unknown)}; known: {sorted(known)}", field="kernel.template")
        for key, value in template.items():
            if not isinstance(value, str):
                raise DeliftInputError(f"must be a string, got {type(value).__name__}", field=f"kernel.template.{key}")
        return cls(**dict(template))

    def identity(self) -> dict:
        return asdict(self)

    def record_prompt(self, record) -> str:
        return _render(_parse(self.prompt, "prompt"), record)

    def record_response(self, record) -> str:
        return _render(_parse(self.response, "response"), record)

    def zero_shot_prompt(self, record) -> str:
        return _render(_parse(self.zero_shot, "zero_shot"),
                       {"instruction": self.zero_shot_instruction, "prompt": self.record_prompt(record)})

    def _one_shot_split(self):
        pieces = _parse(self.one_shot, "one_shot")
        cut = next(k for k, (_, placeholder) in enumerate(pieces) if placeholder == "prompt_i")
        # The literal just before {prompt_i} closes the demonstration block.
        return pieces[:cut] + [(pieces[cut][0], None)], [("", "prompt_i")] + pieces[cut + 1:]

    def demonstration_block(self, record) -> str:
        """The one-shot prompt up to `{prompt_i}`, with `record` as the demonstration."""
        head, _ = self._one_shot_split()
        return _render(head, {"instruction": self.one_shot_instruction, "prompt_j": self.record_prompt(record),
                              "response_j": self.record_response(record)})

    def query(self, record) -> str:
        """The one-shot prompt from `{prompt_i}` on, with `record` as the query."""
        _, tail = self._one_shot_split()
        return _render(tail, {"prompt_i": self.record_prompt(record)})

    def one_shot_prompt(self, row, column) -> str:
        return self.demonstration_block(column) + self.query(row)

    @property
    def boundary_context(self) -> str:
        """The template text right before `{prompt_i}`: the context queries are tokenised in."""
        head, _ = self._one_shot_split()
        return head[-1][0]


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_after(tokenizer, texts: Sequence[str], context: str) -> list[list[int]]:
    """Tokens of each text as they come out when it follows `context` in one string.

    Tokenisers that mark the start of a string (SentencePiece's leading '▁') tokenise a text
    differently alone and mid-string; cutting `context`'s tokens off `context + text` gives the
    mid-string version. Where the two merge, the text's own tokens are returned (and the
    boundary check sends those pairs down the whole-string path).
    """
    if not context:
        return encode(tokenizer, texts)
    head = encode(tokenizer, [context])[0]
    joined = encode(tokenizer, [context + text for text in texts])
    alone = encode(tokenizer, texts)
    return [ids[len(head):] if ids[:len(head)] == head else own for ids, own in zip(joined, alone)]


def tokenizer_identity(tokenizer) -> dict:
    """What makes two tokenizers interchangeable for the kernel: vocabulary, specials, behaviour. Not
    where it was loaded from: the same tokenizer read from another cache folder gives the same kernel."""
    probes = ["Instruction: Hello, world!\nInput: 12 x 7 = 84\n", " café naïve — 東京 🙂",
              "\n\n\nQuery:\n  def f(x):"]
    return {
        "vocab": content_hash(sorted(tokenizer.get_vocab().items())),
        "vocab_size": len(tokenizer),
        "special_tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "eos_token_id": tokenizer.eos_token_id,
        "probe_encodings": content_hash(encode(tokenizer, probes)),
    }


@dataclass
class ScoredSequence:
    """One teacher-forced sequence: `context` (prompt tokens + EOS) then `targets` (response + EOS)."""

    context: list[int]
    targets: list[int]


class UtilityInputs:
    """Every record part tokenised once, and the rules that turn parts into scored sequences."""

    def __init__(self, tokenizer, rows: Sequence[Mapping], cols: Sequence[Mapping], template: UtilityTemplate,
                 max_length: int):
        if tokenizer.eos_token_id is None:
            raise DeliftInputError("the tokenizer has no EOS token, and the utility scores one",
                                   field="model.tokenizer")
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = int(max_length)
        self.eos_id = int(tokenizer.eos_token_id)
        # Padding is always masked out, so any id works; EOS stands in where there is no pad token.
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.row_ids = [r["id"] for r in rows]
        self.col_ids = [c["id"] for c in cols]

        self.targets = [ids + [self.eos_id] for ids in encode(tokenizer, [template.record_response(r) for r in rows])]
        for rid, ids in zip(self.row_ids, self.targets):
            if len(ids) + 1 > self.max_length:
                raise DeliftInputError(
                    f"the response is {len(ids) - 1} tokens; with the two EOS tokens it exceeds kernel.max_length="
                    f"{self.max_length} (the scored response is never truncated: raise kernel.max_length or drop "
                    "the record)", record=rid, field="output")
        self.zero_shot = encode(tokenizer, [template.zero_shot_prompt(r) for r in rows])
        self.query_text = [template.query(r) for r in rows]
        self.query = encode_after(tokenizer, self.query_text, template.boundary_context)
        self.demo_text = [template.demonstration_block(c) for c in cols]
        self.demo = encode(tokenizer, self.demo_text)

    @property
    def n_rows(self) -> int:
        return len(self.row_ids)

    @property
    def n_cols(self) -> int:
        return len(self.col_ids)

    def prompt_budget(self, row: int) -> int:
        """Prompt tokens that fit beside row `row`'s response and the two EOS tokens."""
        return self.max_length - 1 - len(self.targets[row])

    def _sequence(self, prompt: list[int], row: int) -> ScoredSequence:
        budget = self.prompt_budget(row)
        if len(prompt) > budget:  # keep the end of the prompt: the query sits there, next to the response
            prompt = prompt[len(prompt) - budget:]
        return ScoredSequence(prompt + [self.eos_id], self.targets[row])

    def zero_shot_sequence(self, row: int) -> ScoredSequence:
        return self._sequence(self.zero_shot[row], row)

    def one_shot_sequences(self, pairs: Sequence[tuple[int, int]]) -> list[ScoredSequence]:
        """Pairs (row, column) tokenised from their whole prompt string: the reference path."""
        prompts = encode(self.tokenizer, [self.demo_text[j] + self.query_text[i] for i, j in pairs])
        return [self._sequence(prompt, i) for prompt, (i, _) in zip(prompts, pairs)]

    def query_sequence(self, row: int, skip: int = 0) -> ScoredSequence:
        """Row `row`'s part of a one-shot sequence, to run after a cached demonstration block
        (extended by the first `skip` query tokens, when those are cached too)."""
        return ScoredSequence(self.query[row][skip:] + [self.eos_id], self.targets[row])

    def fits(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
        """(len(rows), len(cols)) bool: the pair's block + query needs no truncation."""
        query = np.array([len(self.query[i]) - self.prompt_budget(i) for i in rows])
        demo = np.array([len(self.demo[j]) for j in cols])
        return query[:, None] + demo[None, :] <= 0

    def pair_lengths(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
        """(len(rows), len(cols)) tokens of each one-shot sequence (block, query, EOS, response, EOS),
        from the part tokens (a pair merged across the boundary may differ by a token)."""
        query = np.array([len(self.query[i]) + 1 + len(self.targets[i]) for i in rows])
        demo = np.array([len(self.demo[j]) for j in cols])
        return query[:, None] + demo[None, :]

    def boundary_safe(self, rows: Sequence[int], cols: Sequence[int]) -> np.ndarray:
        """(len(rows), len(cols)) bool: block tokens + query tokens == tokens of the whole prompt.

        Tokenises a window of BOUNDARY_WINDOW_CHARS on each side of the boundary, once per
        distinct (block end, query start); what a merge changes lies inside that window.
        """
        width = BOUNDARY_WINDOW_CHARS
        tails = [self.demo_text[j][-width:] for j in cols]
        heads = [self.query_text[i][:width] for i in rows]
        keys = sorted({(t, h) for t in set(tails) for h in set(heads)})
        joined = encode(self.tokenizer, [t + h for t, h in keys])
        tail_ids = dict(zip(sorted(set(tails)), encode(self.tokenizer, sorted(set(tails)))))
        head_ids = dict(zip(sorted(set(heads)), encode_after(self.tokenizer, sorted(set(heads)),
                                                             self.template.boundary_context)))
        safe = {key: ids == tail_ids[key[0]] + head_ids[key[1]] for key, ids in zip(keys, joined)}
        return np.array([[safe[(t, h)] for t in tails] for h in heads], dtype=bool).reshape(len(rows), len(cols))

    def truncation_count(self, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> int:
        """Sequences whose prompt gets truncated: zero-shot rows, then every one-shot pair (or only the
        listed (rows, cols) pairs). Pair lengths come from the part tokens; a pair merged across the
        boundary may differ by a token."""
        budgets = np.array([self.prompt_budget(i) for i in range(self.n_rows)])
        zero_shot = int(sum(len(p) > b for p, b in zip(self.zero_shot, budgets)))
        if pairs is not None:
            query = np.array([len(q) for q in self.query]) - budgets
            demo = np.array([len(d) for d in self.demo])
            return zero_shot + int((query[pairs[0]] + demo[pairs[1]] > 0).sum())
        return zero_shot + int((~self.fits(range(self.n_rows), range(self.n_cols))).sum())

    def over_long_records(self) -> list[str]:
        """Ids of the records too long to fit whole even beside the shortest other part: as a row, its
        zero-shot prompt exceeds its budget; as a column, its demonstration block and the shortest
        query with its response exceed max_length."""
        ids = [self.row_ids[i] for i in range(self.n_rows) if len(self.zero_shot[i]) > self.prompt_budget(i)]
        shortest = min(len(q) - self.prompt_budget(i) for i, q in enumerate(self.query))  # query beyond its room
        ids += [self.col_ids[j] for j in range(self.n_cols) if len(self.demo[j]) + shortest > 0]
        return list(dict.fromkeys(ids))

    def warn_truncation(self, pairs: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        count = self.truncation_count(pairs)
        if count:
            long = self.over_long_records()
            records = len(dict.fromkeys(self.row_ids + self.col_ids))
            whose = (f", {len(long)} of the {records} records too long on their own ({', '.join(long[:5])}"
                     f"{', ...' if len(long) > 5 else ''})" if long else ", pairs of long records")
            warnings.warn(f"{count} utility sequence(s) exceed kernel.max_length={self.max_length} tokens{whose}: "
                          "their prompts are truncated from the left (the scored response is kept whole); raise "
                          "kernel.max_length to keep them whole", UserWarning, stacklevel=3)
