"""Fused CPU kernels under the primitives, and the one switch that picks them.

The primitives in ``tinytensor.ops`` and ``tinytensor.optim`` ask ``for_arrays(*arrays)``:
it returns the kernel module (``tinytensor.kernels.cpu``, Numba) when every array is a
float32 C-contiguous NumPy array and the kernels are on, else None and the primitive runs
its NumPy code, which stays the reference (float64, other dtypes, CuPy arrays, numba
missing or switched off all take it, with the same results up to float32 rounding).

Switch: ``TINYTENSOR_KERNELS=0`` in the environment turns the kernels off (read once, on
first use). Numba is imported on first use, not with ``tinytensor``: ``import tinytensor``
stays light, and a process that never computes on float32 NumPy arrays never loads it.
Compiled kernels are cached by Numba in ``__pycache__`` beside ``cpu.py`` (or in
``NUMBA_CACHE_DIR``): the first process after an install or a change compiles them
(a few seconds, see bench/RESULTS.md), later ones load them.

>>> import numpy as np
>>> k = for_arrays(np.zeros((2, 3), np.float32))  # the kernel module, or None without numba
>>> for_arrays(np.zeros((2, 3), np.float64)) is None
True
"""
from __future__ import annotations

import contextlib
import os

import numpy as np

ENV = "TINYTENSOR_KERNELS"

_state = {"module": None, "reason": None, "off": 0}  # the loaded module, or why there is none


def _load():
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        _state["reason"] = f"off ({ENV}={os.environ[ENV]})"
        return
    try:
        from . import cpu
    except ImportError as exc:  # numba missing, or a numba that does not fit this NumPy
        _state["reason"] = f"unavailable ({exc}); pip install numba for the fused kernels"
        return
    _state["module"] = cpu
    _configure_threads()


def _configure_threads():
    """Numba's threading layer, where the user has not chosen one (NUMBA_THREADING_LAYER):
    workqueue. GNU OpenMP's threads spin at each barrier, and on a shared 2-core machine a
    parallel region then waits for a descheduled thread: 4-5x slower in bench/RESULTS.md's
    measurement. workqueue does not allow two threads in parallel kernels at once, so
    ``cpu._Kernel`` runs the parallel copies from the main thread only."""
    import numba
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"


def module():
    """The kernel module, or None (``reason()`` says why)."""
    if _state["module"] is None and _state["reason"] is None:
        _load()
    return _state["module"]


def quant_module():
    """The int8 weight-kernel module (``tinytensor.kernels.quant``) when the kernels are on, else
    None: the callers (gpt.quantize, ops.quant) then dequantize by blocks and use BLAS."""
    if _state["off"] or module() is None:
        return None
    from . import quant
    return quant
def decode_module():
    """The batch-1 decoding kernels (``tinytensor.kernels.decode``) when the kernels are on, else
    None. The caller checks its arrays with ``for_arrays`` first."""
    if _state["off"] or module() is None:
        return None
    from . import decode
    return decode


def reason() -> str | None:
    module()
    return _state["reason"]


def for_arrays(*arrays, contiguous: bool = True):
    """The kernel module when every array is a float32 (C-contiguous, unless ``contiguous`` is
    false: the caller makes its own contiguous arrays) NumPy array and the kernels are on; None
    otherwise (the caller then takes its NumPy path)."""
    if _state["off"]:
        return None
    for a in arrays:
        if type(a) is not np.ndarray or a.dtype != np.float32 or (contiguous and not a.flags.c_contiguous):
            return None
    return module()


def modern_for_arrays(*arrays, contiguous: bool = True):
    """The kernels of the modern model options (``kernels.modern``: RMSNorm, ReLU^2, SwiGLU,
    QK-norm + RoPE) under the same conditions as ``for_arrays``; None otherwise."""
    return None if for_arrays(*arrays, contiguous=contiguous) is None else modern_module()


def modern_module():
    """``kernels.modern`` (loaded on first use; call only where the kernels are on)."""
    from . import modern
    return modern


@contextlib.contextmanager
def numpy_only():
    """Within it the primitives take their NumPy path (the reference): for tests and benchmarks
    that compare the two in one process. A backward follows the path its forward took."""
    _state["off"] += 1
    try:
        yield
    finally:
        _state["off"] -= 1


def describe() -> str:
    """One line for benchmarks and logs: the kernel library in use and its threads."""
    k = module()
    if k is None:
        return f"kernels: NumPy only, {_state['reason']}"
    import numba
    layer = numba.config.THREADING_LAYER
    try:
        layer = numba.threading_layer()  # known only once a parallel kernel has run
    except ValueError:
        pass
    return f"kernels: numba {numba.__version__} ({numba.get_num_threads()} threads, threading layer {layer})"


def warm_up() -> float:
    """Load (or compile, the first time after an install) every kernel now, so that the first
    training step or decoded token is not the one that pays; returns the seconds it took
    (0.0 without kernels). Programs call it at start-up."""
    import time
    k = module()
    if k is None:
        return 0.0
    start = time.perf_counter()
    k.warm_up()
    modern_module().warm_up()
    from . import decode  # the batch-1 decoding kernels (gpt.generate's first token would load them)
    decode.warm_up()
    return time.perf_counter() - start
