"""Supervised fine-tuning data: prompt/response pairs (or chat turns) from a JSONL file, rendered
with one template, tokenized, and batched with the loss on the response tokens only.

Each line of the file is one example, either ``{"prompt": "...", "response": "..."}`` or
``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}``
(roles system, user, assistant). The template renders a turn of the user as
``USER + text + "\\n" + ASSISTANT`` and the assistant's answer as ``" " + text + END``; the model
learns to predict the answer and END (the targets of every other token are ``IGNORE``, which
``F.cross_entropy`` skips), so generation can stop at END. ``gpt.sample --template`` wraps a
prompt the same way.

>>> render_prompt("What light?")
'Q: What light?\\nA:'

The file is untrusted input: its size, each line's length, the number of examples and turns are
bounded before anything is built; every line must be a JSON object of exactly the known keys
with string values (``gpt.strict_json``: no NaN, no duplicate keys, bounded nesting); errors
name the file and line number. Text the tokenizer cannot encode is an error on its line.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import strict_json
from .files import read_regular_file
from .tokenizer import TokenizerError

# the template: plain characters that a character-level Tiny Shakespeare vocabulary has
USER, ASSISTANT, END = "Q: ", "A:", "\n\n"
TEMPLATES = ("qa",)  # the one template so far (a config choice, so a second one is a name here)
IGNORE = -1  # the target of a token whose prediction is not trained (F.cross_entropy's ignore_index)

MAX_FILE_BYTES = 256 << 20
MAX_LINE_BYTES = 1 << 20
MAX_EXAMPLES = 1_000_000
MAX_TURNS = 256
ROLES = ("system", "user", "assistant")


class SFTError(ValueError):
    """The fine-tuning data cannot be used; the message names the file, the line and the fix."""


def render_prompt(prompt: str) -> str:
    """A user's text as the model saw it in training, ready for the answer."""
    return f"{USER}{prompt}\n{ASSISTANT}"


def render_response(response: str) -> str:
    return f" {response}{END}"


def segments(example: dict) -> list[tuple[str, bool]]:
    """(text, trained) pieces of one validated example, in order: prompts are not trained,
    answers (with their END) are."""
    if "prompt" in example:
        return [(render_prompt(example["prompt"]), False), (render_response(example["response"]), True)]
    out = []
    for turn in example["messages"]:
        if turn["role"] == "assistant":
            out.append((render_response(turn["content"]), True))
        elif turn["role"] == "user":
            out.append((render_prompt(turn["content"]), False))
        else:  # system: context, not trained, before the first question
            out.append((turn["content"] + "\n", False))
    return out


def _check_example(obj, where: str) -> dict:
    def bad(what):
        return SFTError(f"{where}: {what}")
    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    if set(obj) == {"prompt", "response"}:
        for key in ("prompt", "response"):
            if not isinstance(obj[key], str):
                raise bad(f"{key!r} must be a string, got {type(obj[key]).__name__}")
        if not obj["response"]:
            raise bad("'response' is empty: there would be nothing to learn from this example")
        return obj
    if set(obj) == {"messages"}:
        turns = obj["messages"]
        if not isinstance(turns, list) or not 1 <= len(turns) <= MAX_TURNS:
            raise bad(f"'messages' must be a list of 1..{MAX_TURNS} turns")
        for i, turn in enumerate(turns):
            if not (isinstance(turn, dict) and set(turn) == {"role", "content"} and isinstance(turn["content"], str)):
                raise bad(f"turn {i} must be an object with exactly 'role' and 'content' (a string)")
            if turn["role"] not in ROLES:
                raise bad(f"turn {i} has role {str(turn['role'])[:40]!r}; expected one of {', '.join(ROLES)}")
        if not any(t["role"] == "assistant" and t["content"] for t in turns):
            raise bad("no non-empty assistant turn: there would be nothing to learn from this example")
        return obj
    keys = ", ".join(sorted(map(str, obj)))[:120]
    raise bad(f"expected the keys prompt and response, or messages; got {keys or 'none'}")


def read_jsonl(path) -> tuple[list[dict], str]:
    """(validated examples, the file's sha256). SFTError on anything else."""
    path = Path(path)
    try:
        raw = read_regular_file(path, MAX_FILE_BYTES, "--sft-data", "a .jsonl file")
    except ValueError as exc:
        raise SFTError(str(exc)) from None
    examples = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path} line {number}"
        if len(line) > MAX_LINE_BYTES:
            raise SFTError(f"{where}: {len(line):,} bytes; a line may hold at most {MAX_LINE_BYTES:,}")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SFTError(f"{where}: not UTF-8 text (byte {exc.start})") from None
        try:
            obj = strict_json.loads(text, max_depth=4)
        except ValueError as exc:
            raise SFTError(f"{where}: {exc}") from None
        examples.append(_check_example(obj, where))
        if len(examples) > MAX_EXAMPLES:
            raise SFTError(f"{path}: more than {MAX_EXAMPLES:,} examples")
    if not examples:
        raise SFTError(f"--sft-data {path} holds no examples; expected one JSON object per line")
    return examples, hashlib.sha256(raw).hexdigest()


def encode_example(example: dict, tokenizer, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, trained) of one example, at most block_size + 1 tokens: a long prompt loses its
    start, a long answer its end, and at least half the window (or all of a short answer)
    stays answer, so every example trains something."""
    ids, trained = [], []
    for text, is_trained in segments(example):
        piece = tokenizer.encode(text)
        ids += piece
        trained += [is_trained] * len(piece)
    ids, trained = np.asarray(ids, np.int64), np.asarray(trained, bool)
    limit = block_size + 1
    if ids.size > limit:
        first = int(np.argmax(trained))  # where the (first) answer starts
        keep_answer = min(int(trained[first:].size), max(2, limit // 2))
        start = max(0, min(first - (limit - keep_answer), ids.size - limit))
        ids, trained = ids[start:start + limit], trained[start:start + limit]
    return ids, trained


@dataclass
class SFTData:
    """Tokenized examples, split into train and val, padded into batches.

    >>> data = SFTData.load("instructions.jsonl", tokenizer, block_size=256)   # doctest: +SKIP
    >>> x, y = data.batch("train", 8, np.random.default_rng(0))                # doctest: +SKIP
    """

    train: list
    val: list
    block_size: int
    sha256: str
    sample_prompt: str  # the first val example's prompt, rendered (shown at evaluations)

    @classmethod
    def load(cls, path, tokenizer, block_size: int, val_fraction: float = 0.1) -> "SFTData":
        examples, sha = read_jsonl(path)
        encoded = []
        for i, ex in enumerate(examples):
            try:
                encoded.append(encode_example(ex, tokenizer, block_size))
            except TokenizerError as exc:
                raise SFTError(f"{path}: example {i + 1}: the model's tokenizer cannot encode it ({exc})") from None
        n_val = max(1, int(len(encoded) * val_fraction)) if len(encoded) > 1 else 0
        train, val = encoded[:len(encoded) - n_val], encoded[len(encoded) - n_val:] or encoded
        first_val = examples[len(examples) - n_val] if n_val else examples[0]
        prompt = "".join(t for t, trained in segments(first_val)[:1] if not trained)
        return cls(train, val, block_size, sha, prompt)

    def batch(self, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int64 (n, T), T the longest drawn example's length - 1 (at most block_size):
        y is x shifted by one, IGNORE where the next token is not trained or is padding."""
        pool = self.train if split == "train" else self.val
        chosen = [pool[i] for i in rng.integers(0, len(pool), size=n)]
        T = max(ids.size for ids, _ in chosen) - 1
        x = np.zeros((n, T), np.int64)  # padding: any valid id, its target is ignored
        y = np.full((n, T), IGNORE, np.int64)
        for row, (ids, trained) in enumerate(chosen):
            m = ids.size - 1
            x[row, :m] = ids[:-1]
            y[row, :m] = np.where(trained[1:], ids[1:], IGNORE)
        return x, y
