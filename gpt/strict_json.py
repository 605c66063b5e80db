"""JSON from untrusted files: bounded nesting, finite numbers, no duplicate keys.

>>> loads('{"step": 3, "loss": 1.5}')
{'step': 3, 'loss': 1.5}
>>> loads('{"loss": NaN}')
Traceback (most recent call last):
...
ValueError: JSON holds the non-finite number NaN; only finite numbers are accepted

``json.loads`` alone accepts ``NaN``/``Infinity`` (and turns ``1e999`` into inf),
keeps the last of duplicate keys, and recurses once per nesting level, so a file of
100,000 ``[`` can exhaust the stack. Every error here is a ``ValueError``.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np

__all__ = ["loads", "check_depth", "MAX_DEPTH"]

MAX_DEPTH = 64  # the deepest structure this project writes is 5 levels
# A JSON string literal, escapes included; an unterminated one runs to the end of the
# text. Every '"' thus starts a match, which keeps the scan linear (a pattern that can
# fail after scanning to the end would be retried from each later quote: quadratic).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_CHUNK = 1 << 20


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise ValueError if ``text`` nests arrays/objects deeper than ``max_depth``.

    Counts brackets outside string literals in vectorised chunks: linear time,
    no recursion, so a 16 MB header takes a fraction of a second.
    """
    skeleton = _STRING.sub("", text).encode("utf-8", "surrogatepass")
    depth = 0
    for start in range(0, len(skeleton), _CHUNK):
        b = np.frombuffer(skeleton, np.uint8, count=min(_CHUNK, len(skeleton) - start), offset=start)
        step = (b == ord("[")).astype(np.int64) + (b == ord("{")) - (b == ord("]")) - (b == ord("}"))
        levels = depth + np.cumsum(step)
        if levels.size and levels.max() > max_depth:
            raise ValueError(f"JSON is nested more than {max_depth} levels deep; this is not a file "
                             "this program wrote")
        depth = int(levels[-1]) if levels.size else depth


class _Rejected(ValueError):
    """Raised by our parse hooks, so their messages pass through unchanged."""


def _reject_constant(name):
    raise _Rejected(f"JSON holds the non-finite number {name}; only finite numbers are accepted")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999 overflows to inf
        raise _Rejected(f"JSON number {text[:40]} is out of the float range")
    return value


def _unique_keys(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _Rejected(f"JSON object has the key {key[:80]!r} twice; the file is ambiguous")
        obj[key] = value
    return obj


def loads(text: str, max_depth: int = MAX_DEPTH):
    """``json.loads`` for untrusted text; ValueError (with the reason) on anything suspicious."""
    if not isinstance(text, str):
        raise ValueError(f"expected JSON text, got {type(text).__name__}")
    check_depth(text, max_depth)
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=_unique_keys)
    except RecursionError:  # defence in depth: check_depth should make this unreachable
        raise ValueError(f"JSON is nested too deeply (limit {max_depth} levels)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    except _Rejected as exc:
        raise ValueError(str(exc)) from None
    except ValueError:  # int() refuses integers of more than sys.get_int_max_str_digits() digits
        raise ValueError("JSON holds an integer too long to read (thousands of digits)") from None
