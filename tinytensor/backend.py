"""The one place that picks the array library.

Every op calls ``xp.*`` where ``xp`` is the array module of its inputs (NumPy or
CuPy), obtained from here. Nothing else in the package imports CuPy.

>>> from tinytensor import backend
>>> xp = backend.get_xp("numpy")
>>> backend.name_of(xp.zeros(3))
'numpy'
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

BACKENDS = ("numpy", "cupy")

_cupy = None  # imported lazily: most users never touch a GPU


class BackendError(RuntimeError):
    """A backend was asked for that cannot be used here, or two were mixed."""


def _import_cupy():
    global _cupy
    if _cupy is not None:
        return _cupy
    try:
        import cupy  # noqa: WPS433 (the only CuPy import in the package)
    except Exception as exc:  # ImportError, or CUDA libraries missing
        raise BackendError(
            "backend 'cupy' needs CuPy and an NVIDIA GPU, but CuPy could not be imported "
            f"({type(exc).__name__}: {exc}). Install it with `pip install -e \".[cuda]\"` "
            "(or the cupy-cudaXXx wheel matching your CUDA), or use --backend numpy."
        ) from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise BackendError(
            f"backend 'cupy': CuPy is installed but no usable GPU was found ({exc}). "
            "Use --backend numpy."
        ) from None
    if n < 1:
        raise BackendError("backend 'cupy': CuPy is installed but no GPU is visible. Use --backend numpy.")
    _cupy = cupy
    return cupy


_freed_memory_kept = False


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in this process instead of returning it to the kernel.

    A program that trains or samples calls this once at its start (``gpt.train``,
    ``gpt.sample`` and the benchmarks do); importing tinytensor never does, so a
    process that merely uses it (a web server, a notebook) keeps its allocator as it was.

    Why: every op allocates its output with malloc, and by default glibc hands large
    freed blocks back to the kernel, so without this NumPy's temporaries page-fault
    back in every training step: measured here, 44 -> 35 ms a step on the small GPT.
    Peak memory is unchanged; freed memory just stays reserved for reuse. The setting
    is process-wide and lasts until the process exits.

    Idempotent. Returns True when the allocator is tuned (by this call or an earlier
    one), False when it was left alone: not Linux with glibc (e.g. macOS, musl), or
    the environment variable TINYTENSOR_MALLOC_TUNING=0. In a program's ``main``::

        from tinytensor import backend
        backend.keep_freed_memory()
    """
    global _freed_memory_kept
    if _freed_memory_kept:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("TINYTENSOR_MALLOC_TUNING", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    ok = mallopt(M_MMAP_THRESHOLD, 32 << 20)  # blocks up to 32 MB (glibc's maximum) from the heap, not mmap
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30)  # do not shrink the heap after every free
    ok &= mallopt(M_TOP_PAD, 64 << 20)
    _freed_memory_kept = ok == 1  # mallopt returns 1 on success
    return _freed_memory_kept


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU (used by tests to skip)."""
    try:
        _import_cupy()
        return True
    except BackendError:
        return False


def get_xp(name: str):
    """The array module for a backend name: ``numpy`` or ``cupy``."""
    if name == "numpy":
        return np
    if name == "cupy":
        return _import_cupy()
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


def xp_of(array):
    """The array module that owns ``array`` (NumPy for anything that is not a CuPy array)."""
    if isinstance(array, np.ndarray) or _cupy is None:
        return np
    return _cupy if isinstance(array, _cupy.ndarray) else np


def name_of(array) -> str:
    return "numpy" if xp_of(array) is np else "cupy"


def add_at(out, index, values):
    """out[index] += values, with repeated indices adding up (NumPy's ufunc.at; on
    CuPy, cupyx.scatter_add: an atomic scatter-add, which is fast on a GPU)."""
    if xp_of(out) is np:
        np.add.at(out, index, values)
    else:
        import cupyx  # ships with CuPy
        cupyx.scatter_add(out, index, values)


def to_backend(array, name: str):
    """Move an array to a backend (a copy only when it changes device)."""
    xp = get_xp(name)
    if xp is np:
        return array.get() if hasattr(array, "get") and not isinstance(array, np.ndarray) else np.asarray(array)
    return xp.asarray(array)


def to_numpy(array) -> np.ndarray:
    return to_backend(array, "numpy")


# -- random numbers ---------------------------------------------------------
# One NumPy generator seeds everything, so a run is reproducible from one seed on
# any backend. CuPy gets its own generator (seeded from ours) so dropout masks are
# drawn on the GPU instead of being copied over every step.
_rng = np.random.default_rng(0)
_cupy_rng = None


def manual_seed(seed: int) -> None:
    """Seed every random draw of tinytensor (initialisation, dropout, sampling)."""
    global _rng, _cupy_rng
    _rng = np.random.default_rng(seed)
    _cupy_rng = None


def rng(xp=np):
    """The generator for a backend's array module."""
    global _cupy_rng
    if xp is np:
        return _rng
    if _cupy_rng is None:
        _cupy_rng = xp.random.default_rng(int(_rng.integers(2**63)))
    return _cupy_rng


def get_rng_state() -> dict:
    """The NumPy generator's state, JSON-serialisable (for exact resume)."""
    return _rng.bit_generator.state


def set_rng_state(state: dict) -> None:
    global _cupy_rng
    _rng.bit_generator.state = state
    _cupy_rng = None
