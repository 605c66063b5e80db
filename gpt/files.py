"""Reading a user-named input file as untrusted input: a regular file only, at most a given size.

>>> import tempfile, os
>>> fd, name = tempfile.mkstemp(); os.write(fd, b"hello"); os.close(fd)
5
>>> read_regular_file(name, 16, "--prompt-file", "a text file")
b'hello'

Used by ``gpt.sample --prompt-file`` and ``gpt.train --sft-data``: one place decides what such a
file may be, so the two cannot drift apart.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["read_regular_file"]


def read_regular_file(path, max_bytes: int, option: str, expected: str) -> bytes:
    """The bytes of ``path``; ValueError naming ``option``, the path and what to pass instead
    (``expected``, e.g. "a text file") for a missing file, a directory, a FIFO or device, or
    a file over ``max_bytes`` (checked before reading and again after, as it may grow)."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO must not hang the open (regular files ignore the flag)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise ValueError(f"{option} {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{option} {path} is a directory; pass {expected}") from None
    except OSError as exc:
        raise ValueError(f"{option} {path} cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)  # (Linux opens a directory read-only without complaint)
        if stat.S_ISDIR(info.st_mode):
            raise ValueError(f"{option} {path} is a directory; pass {expected}")
        if not stat.S_ISREG(info.st_mode):  # /dev/zero would be read forever
            raise ValueError(f"{option} {path} is not a regular file; pass {expected}")
        if info.st_size > max_bytes:
            raise ValueError(f"{option} {path} is {info.st_size:,} bytes; at most {max_bytes:,} are accepted")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ValueError(f"{option} {path} grew past {max_bytes:,} bytes while being read")
    return data
