"""Build a small instruction set from Tiny Shakespeare: "Who says: <a speech's first line>" ->
the speaker's name, for the most frequent speakers. One JSON object per line, for
``gpt.train --sft-data``.

    python examples/shakespeare_sft.py data/shakespeare_char/input.txt sft.jsonl --speakers 12 --examples 2000

The text is split into speeches (a line "NAME:" then the speech, then a blank line); only
speakers with many speeches are kept, so that the task can be learned from a few thousand examples.
The examples are shuffled with a fixed seed; gpt.train takes the last 10 % as its validation set.
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import re
import sys

SPEAKER = re.compile(r"^([A-Z][A-Za-z' ]{1,30}):$")


def speeches(text: str):
    """(speaker, first line of the speech) for every speech in the play text."""
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        match = SPEAKER.match(lines[0]) if len(lines) >= 2 else None
        if match and lines[1].strip():
            yield match.group(1), lines[1].strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("text", help="Tiny Shakespeare (input.txt)")
    ap.add_argument("out", help="the JSONL file to write")
    ap.add_argument("--speakers", type=int, default=12, help="keep the N speakers with the most speeches")
    ap.add_argument("--examples", type=int, default=2000, help="at most this many examples")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    with open(args.text, encoding="utf-8") as f:
        pairs = list(speeches(f.read()))
    top = {name for name, _ in collections.Counter(name for name, _ in pairs).most_common(args.speakers)}
    rows = [{"prompt": f"Who says: {line}", "response": name} for name, line in pairs if name in top]
    random.Random(args.seed).shuffle(rows)
    rows = rows[:args.examples]
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"{len(rows)} examples, {len(top)} speakers: {', '.join(sorted(top))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
