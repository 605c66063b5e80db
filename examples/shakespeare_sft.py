"""Build a small instruction set from Tiny Shakespeare, one JSON object per line, for
``gpt.train --sft-data``. Two tasks:

- ``last-word`` (the default): "Last word: <a line of verse>" -> that line's last word
  (letters and apostrophes, no punctuation). A rule the model can learn in minutes on a CPU:
  find the end of the line and copy the word, which a character model's attention can do.
- ``who-says``: "Who says: <a speech's first line>" -> the speaker's name, for the most
  frequent speakers. Much harder: nothing in the line names the speaker, so it is recall of
  the play, not a rule (a short LoRA run on the small model got 0 % of these right).

    python examples/shakespeare_sft.py data/shakespeare_char/input.txt sft.jsonl
    python examples/shakespeare_sft.py input.txt who.jsonl --task who-says --speakers 12

The text is split into speeches (a line "NAME:" then the speech, then a blank line). The
examples are shuffled with a fixed seed; gpt.train takes the last 10 % as its validation set.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys

SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{1,30}):$")
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # "o'er" is one word; quotes around a word are not part of it
MAX_LINE_CHARS = 40  # with "Q: Last word: " and the answer, an example fits the CPU preset's 64-token window


def speeches(text: str):
    """(speaker, the speech's lines) for every speech in the play text."""
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        match = SPEAKER.match(lines[0]) if len(lines) >= 2 else None
        if match and lines[1].strip():
            yield match.group(1), [line.strip() for line in lines[1:] if line.strip()]


def last_word_rows(pairs):
    for _, lines in pairs:
        for line in lines:
            words = WORD.findall(line)
            if words and len(line) <= MAX_LINE_CHARS:
                yield {"prompt": f"Last word: {line}", "response": words[-1]}


def who_says_rows(pairs, speakers: int):
    top = {name for name, _ in collections.Counter(name for name, _ in pairs).most_common(speakers)}
    print(f"{len(top)} speakers: {', '.join(sorted(top))}", file=sys.stderr)
    return [{"prompt": f"Who says: {lines[0]}", "response": name} for name, lines in pairs if name in top]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", help="Tiny Shakespeare (input.txt)")
    ap.add_argument("out", help="the JSONL file to write")
    ap.add_argument("--task", choices=("last-word", "who-says"), default="last-word")
    ap.add_argument("--speakers", type=int, default=12, help="who-says: keep the N speakers with the most speeches")
    ap.add_argument("--examples", type=int, default=4000, help="at most this many examples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        with open(args.text, encoding="utf-8") as f:
            pairs = list(speeches(f.read()))
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: cannot read {args.text}: {exc}; pass Tiny Shakespeare's input.txt", file=sys.stderr)
        return 1
    rows = list(last_word_rows(pairs)) if args.task == "last-word" else who_says_rows(pairs, args.speakers)
    random.Random(args.seed).shuffle(rows)
    rows = rows[:args.examples]
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} {args.task} examples written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
