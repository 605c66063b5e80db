"""The one place that picks the array library.

Every op calls ``xp.*`` where ``xp`` is the array module of its inputs (NumPy or
CuPy), obtained from here. Nothing else in the package imports CuPy.

>>> from tinytensor import backend
>>> xp = backend.get_xp("numpy")
>>> backend.name_of(xp.zeros(3))
'numpy'
"""
from __future__ import annotations

import numpy as np

from .memory import keep_freed_memory  # noqa: F401 (programs call backend.keep_freed_memory())

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
    _check_kernels(cupy)
    _cupy = cupy
    return cupy


def _check_kernels(cupy) -> None:
    """Compile and run a tiny kernel now, so a broken CUDA toolkit (NVRTC missing, a driver too old
    for the wheel) is one BackendError at start-up, not a traceback at the first op mid-run.
    CuPy compiles each elementwise kernel with NVRTC on first use; .get() waits for it to run."""
    try:
        x = cupy.arange(4, dtype=cupy.float32)
        (x * 2 + 1).sum().get()
    except Exception as exc:  # CompileException, NVRTCError, CUDARuntimeError, "failed to load libnvrtc"...
        detail = " ".join(str(exc).split())[:300]  # one line: NVRTC's messages can span many
        raise BackendError(
            f"backend 'cupy': CuPy sees a GPU but cannot compile or run a kernel ({type(exc).__name__}: {detail}). "
            "The CUDA libraries CuPy needs (NVRTC) may be missing or not match the driver: install the CuPy wheel "
            "for the CUDA major version `nvidia-smi` shows (pip install -e \".[cuda12]\" or \".[cuda13]\") "
            "and its CUDA libraries (e.g. pip install \"cupy-cuda12x[ctk]\"), or use --backend numpy."
        ) from None


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


def matmul(a, b):
    """``a @ b`` in ``a``'s dtype. NumPy has no BLAS for float16 or bfloat16 (its float16 matmul
    is a plain loop, 40x slower here than float32's; ml_dtypes' bfloat16 one returns float32),
    so on NumPy half-precision operands are multiplied in float32 and the product rounded
    back: what a GPU's tensor cores do (half inputs, float32 accumulation). CuPy multiplies
    them natively (cuBLAS). Other dtypes: plain ``a @ b``.

    >>> matmul(np.ones((2, 3), np.float16), np.ones((3, 1), np.float16)).dtype
    dtype('float16')
    """
    if a.dtype.itemsize >= 4 or not isinstance(a, np.ndarray):
        return a @ b
    return (a.astype(np.float32) @ b.astype(np.float32)).astype(a.dtype)


# -- random numbers ---------------------------------------------------------
# One NumPy generator decides every random draw, so a run is reproducible from one
# seed on any backend and its state is all a checkpoint needs for an exact resume.
# On CuPy, dropout masks are drawn on the GPU (not copied over every step) by
# cuRAND's Philox generator, re-seeded from the NumPy generator at each draw:
# cuRAND's state cannot be read back (CuPy has no API for it; the default XORWOW
# keeps megabytes of it per GPU), so instead nothing on the GPU carries over from
# one draw to the next. Philox keeps no per-thread state, so re-seeding it is two
# host calls, not a kernel.
_rng = np.random.default_rng(0)
_cupy_philox = None  # the one cuRAND generator, created at the first draw on CuPy


def manual_seed(seed: int) -> None:
    """Seed every random draw of tinytensor (initialisation, dropout, sampling)."""
    global _rng
    _rng = np.random.default_rng(seed)


def rng() -> np.random.Generator:
    """tinytensor's NumPy generator (initialisation draws on the host)."""
    return _rng


# Dropout's floats are SplitMix64's stream keyed by one draw of the generator (a counter-based
# generator: element i's float is a hash of (key, i)), so a fused kernel computes each mask
# element where it uses it, on every core at once, with no array of draws in between, and the
# NumPy reference below computes the very same floats. Drawing a (B, H, T, T) block of floats
# from PCG64 was the slowest part of the full preset's forward pass (0.66 of 3.7 s).
SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)
SPLITMIX_M1 = np.uint64(0xBF58476D1CE4E5B9)
SPLITMIX_M2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 1 << 20  # elements per pass of the NumPy reference (bounded uint64 temporaries)


def dropout_key() -> int:
    """One draw of tinytensor's generator that keys a dropout mask (see ``keyed_uniform``)."""
    return int(_rng.integers(2**63))


def keyed_uniform(xp, key: int, shape):
    """float32 in [0, 1) of ``shape`` decided by ``key`` alone: on NumPy element i (C order) is
    SplitMix64's (i+1)-th output from state ``key``, its top 24 bits / 2**24 (the CPU kernels
    compute the same numbers in place); on CuPy, cuRAND's Philox seeded with ``key``.

    >>> [round(float(v), 6) for v in keyed_uniform(np, 1, (3,))]
    [0.566562, 0.745782, 0.971003]
    """
    global _cupy_philox
    if xp is not np:
        if _cupy_philox is None:
            _cupy_philox = xp.random.RandomState(0, method=xp.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)
        _cupy_philox.seed(key)
        return _cupy_philox.random_sample(shape, dtype=np.float32)
    out = np.empty(shape, np.float32)
    flat, k = out.reshape(-1), np.uint64(key)
    for lo in range(0, flat.size, _CHUNK):
        z = np.arange(lo + 1, min(flat.size, lo + _CHUNK) + 1, dtype=np.uint64)
        z *= SPLITMIX_GAMMA  # uint64 arithmetic wraps modulo 2**64, as SplitMix64's does
        z += k
        z ^= z >> np.uint64(30)
        z *= SPLITMIX_M1
        z ^= z >> np.uint64(27)
        z *= SPLITMIX_M2
        z ^= z >> np.uint64(31)
        z >>= np.uint64(40)
        flat[lo:lo + z.size] = z  # < 2**24: exact in float32
    out *= np.float32(2.0 ** -24)
    return out


def uniform(xp, shape):
    """``keyed_uniform`` with a fresh key: the floats of one dropout mask.

    >>> manual_seed(0); a = uniform(np, (2,)); manual_seed(0)
    >>> bool((uniform(np, (2,)) == a).all())
    True
    """
    return keyed_uniform(xp, dropout_key(), shape)


def get_rng_state() -> dict:
    """Everything that decides tinytensor's later random draws, on either backend: the NumPy
    generator's state (a PCG64 ``bit_generator.state`` dict, JSON-serialisable). A run resumed
    from it draws the same numbers, dropout masks on a GPU included, as the run that saved it.

    >>> state = get_rng_state(); a = rng().random(); set_rng_state(state)
    >>> rng().random() == a
    True
    """
    return _rng.bit_generator.state


def set_rng_state(state: dict) -> None:
    """Restore a state from ``get_rng_state``."""
    _rng.bit_generator.state = state
