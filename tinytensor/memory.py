"""The process's allocator: keep freed memory mapped, so temporaries do not page-fault back in.

Every op allocates its output with malloc. By default glibc serves blocks of 128 KB and up
(the threshold adapts up to 32 MB) with a fresh ``mmap`` and unmaps them on free, and it
returns the free top of its heap to the kernel: every training step then faults each large
temporary in again, page by page, and the kernel zeroes every page. On the full
``shakespeare_char`` step (6 GB of activations and temporaries) that was a third of the
step's time here (see bench/RESULTS.md, "allocator").

``keep_freed_memory()`` tells glibc (``mallopt``) to serve every block from its heap
(``M_MMAP_MAX`` 0) and never to shrink it (``M_TRIM_THRESHOLD`` -1): a freed block stays
mapped for the next op to reuse. Peak memory is unchanged; the process keeps its peak
reserved until it exits (RSS stays at the high-water mark), which is what a training or
sampling process wants and a long-lived server holding other work may not.

When it applies:
- ``gpt.train``, ``gpt.sample``, ``gpt.serve`` and the benchmarks call it at start-up;
- the engine calls it itself the first time a backward pass runs on NumPy arrays (a user's own
  training loop gets it without asking); importing tinytensor or running forward passes
  never does.
- ``TINYTENSOR_MALLOC_TUNING=0`` in the environment leaves the allocator alone everywhere.
- On anything but Linux with glibc (macOS, Windows, musl) it does nothing.

The setting is process-wide, so in one process PyTorch's CPU tensors (malloc as well) get
it too: ``bench.train_step`` compares the two libraries on the same allocator.

>>> from tinytensor import memory
>>> memory.keep_freed_memory() in (True, False)
True
"""
from __future__ import annotations

import ctypes
import os
import sys

ENV = "TINYTENSOR_MALLOC_TUNING"

# mallopt's parameters (glibc's malloc.h) and what they are set to
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
SETTINGS = (
    (M_MMAP_MAX, 0),           # no block from mmap: big temporaries come from the heap and stay mapped
    (M_TRIM_THRESHOLD, -1),    # -1: never give the heap's free top back (mallopt(3))
    (M_TOP_PAD, 64 << 20),     # grow the heap 64 MB at a time: fewer brk calls while a step ramps up
)

_state = {"applied": False, "reason": None}


def switched_off() -> bool:
    """True when the environment says to leave the allocator alone."""
    return os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")


def _glibc():
    """glibc, or None where there is none (not Linux, or a libc that is not glibc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # musl also answers to libc.so.6


def _mallopt():
    """glibc's mallopt, or None where there is none."""
    libc = _glibc()
    return None if libc is None else libc.mallopt


def release_freed_memory() -> None:
    """glibc's malloc_trim(0): the free pages inside the heap go back to the kernel (a process that
    dropped big arrays, e.g. float weights once quantized, stops counting them as resident), even
    when this module's tuning keeps the heap otherwise. No-op without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_memory() -> bool:
    """Tune glibc's allocator to keep freed memory (see the module docstring). Idempotent.

    Returns True when the allocator is tuned (by this call or an earlier one), False when it was
    left alone (switched off by ``TINYTENSOR_MALLOC_TUNING=0``, or no glibc here)::

        from tinytensor import memory
        memory.keep_freed_memory()
    """
    if _state["applied"]:
        return True
    if switched_off():
        _state["reason"] = f"off ({ENV}={os.environ[ENV]})"
        return False
    mallopt = _mallopt()
    if mallopt is None:
        _state["reason"] = "not glibc: left alone"
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all([mallopt(param, value) == 1 for param, value in SETTINGS])  # 1 = accepted; try every one
    _state["applied"], _state["reason"] = ok, None if ok else "glibc refused a mallopt setting"
    return ok


def on_first_backward() -> None:
    """The engine's own call (``Tensor.backward`` on NumPy arrays): one dictionary read after the first."""
    if not _state["applied"] and _state["reason"] is None:
        keep_freed_memory()


def describe() -> str:
    """One line for benchmarks and logs."""
    if _state["applied"]:
        return "allocator: glibc keeps freed memory (mmap off, no trim)"
    return f"allocator: as the process had it ({_state['reason'] or 'not tuned yet'})"
