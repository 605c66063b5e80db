"""Generated text for the tests: small, deterministic, offline, one generator for every file.

>>> from textgen import VARIED_WORDS, make_text
>>> make_text(n_lines=3, seed=0).count("\\n")
4
>>> text = make_text(n_lines=700, words=VARIED_WORDS)  # ~20 KB with non-ASCII, digits, contractions

The conftest fixture ``corpus_file`` writes ``make_text()`` to a temporary file.
"""
from __future__ import annotations

import numpy as np

NAMES = ("ROMEO:", "JULIET:", "KING HENRY:", "NURSE:")

# ASCII letters only: a char tokenizer's vocabulary stays small and has no Z or X
WORDS = tuple("the king queen lord lady sweet good night day love hath thou thee shall come go speak "
              "what where when fair noble heart crown sword gentle brave".split())

# WORDS and what a byte-level BPE must also split right: multi-byte UTF-8 (2, 3 bytes),
# digits, English contractions, a hyphenated word and a run of punctuation
VARIED_WORDS = WORDS + tuple("café naïve déjà über-cool 東京 don't it's we'll we've 42 1999 --".split())


def make_text(n_lines: int = 500, seed: int = 0, words: tuple[str, ...] = WORDS) -> str:
    """Play-like lines: a speaker's name before every 7th line, then 3 to 8 of ``words``,
    capitalised, with an end mark. The default is about 16 KB (~32 bytes a line)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n_lines):
        if i % 7 == 0:
            lines.append(NAMES[int(rng.integers(len(NAMES)))])
        line = [words[j] for j in rng.integers(0, len(words), int(rng.integers(3, 9)))]
        lines.append(" ".join(line).capitalize() + [".", ",", "!", "?", ";"][int(rng.integers(5))])
    return "\n".join(lines) + "\n"
