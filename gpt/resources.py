"""How much memory is free, and a clear refusal before allocating more than that.

>>> check_fits(1024, "a tiny buffer", "free some memory")  # fits anywhere: returns quietly

Sizes come from untrusted input (a checkpoint's config, a command line), so they
are checked against what the machine has *before* the allocation: NumPy would
otherwise raise a bare MemoryError, or the kernel would kill the process.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["ResourceError", "available_memory_bytes", "check_fits", "gib"]

GIB = 1 << 30


class ResourceError(ValueError):
    """An operation needs more memory than the machine has; the message gives both sizes."""


def gib(nbytes: float) -> str:
    """``nbytes`` in GiB for messages: ``gib(3 << 30) == '3.00 GiB'``."""
    return f"{nbytes / GIB:.2f} GiB"


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) -> None


def _cgroup_headroom() -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (containers), if any.

    /proc/meminfo shows the whole host's memory, so inside a container limited to
    4 GiB it can promise far more than the kernel will let us use.
    """
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # v2
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",                  # v1
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < (1 << 60):  # v1 says "no limit" as ~2**63
            return max(0, limit - usage)
    return None


def available_memory_bytes() -> Optional[int]:
    """Bytes that can be allocated without swapping, or None when it cannot be told.

    >>> available_memory_bytes() > 0  # doctest: +SKIP
    True

    Linux: ``MemAvailable`` from /proc/meminfo (free memory plus reclaimable caches),
    capped by the cgroup limit; elsewhere ``os.sysconf`` free pages.
    """
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024  # the value is in kB
                    break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            pass
    headroom = _cgroup_headroom()
    if headroom is not None:
        available = headroom if available is None else min(available, headroom)
    return available


def check_fits(nbytes: int, what: str, hint: str = "") -> None:
    """Raise :class:`ResourceError` when ``nbytes`` exceeds the available memory.

    >>> check_fits(10**15, "a 10**15-parameter model", "use a smaller --n-embd")  # doctest: +SKIP
    Traceback (most recent call last):
    gpt.resources.ResourceError: a 10**15-parameter model needs 931322.57 GiB of memory but only 22.10 GiB is available; use a smaller --n-embd

    Quietly passes when the available memory cannot be determined.
    """
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise ResourceError(f"{what} needs {gib(nbytes)} of memory but only {gib(available)} is available"
                            + (f"; {hint}" if hint else ""))
