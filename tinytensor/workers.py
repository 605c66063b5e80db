"""A second pair of hands for small batched work that no library splits over the cores.

The attention of the small presets is 48 independent (64 x 64) problems: each product is too
small for OpenBLAS to thread (it keeps products under 262,144 multiply-adds on the calling
thread) and its softmax rows are below the kernels' parallel threshold (``kernels.cpu.PARALLEL_MIN``:
a Numba workqueue launch costs more than the work). So on two cores the whole op ran on one.
``split(fn, n)`` runs ``fn(lo, hi)`` over contiguous parts of ``range(n)`` on persistent Python
threads, the caller taking the first part: NumPy's matmul and the kernels (``nogil``; other
threads take their serial copies) release the GIL, so the parts run at the same time. A hand-off
costs tens of microseconds, against the ~1 ms the attention of one layer takes on one core.

OFF BY DEFAULT (``TINYTENSOR_SPLIT=1`` turns it on): on the shared, loaded 2-core VM where it was
written (load 2-5, another process on the second core) the split attention was slower than one
thread (fwd+bwd 12x4x64x32 causal: 1.57-2.35 vs 1.31-1.87 ms, min of 200), and that machine had
no idle core to say what it gives on an idle one; bench/RESULTS.md (issue 10e) names the A/B.

Threads: Numba's count (``NUMBA_NUM_THREADS``, ``numba.set_num_threads``), so one setting governs
every kernel; 1 (no split) unless switched on, without the kernels, or off the main thread.
Results do not depend on the split: each part computes whole problems (the tests check the
outputs and gradients are bit-identical).
"""
from __future__ import annotations

import os
import threading

ENV = "TINYTENSOR_SPLIT"
_MAIN = threading.main_thread()
_state = {"pool": None, "size": 0, "off": None}


def parts(n: int) -> int:
    """How many parts ``split`` would use for n independent problems (1: run on the caller)."""
    if _state["off"] is None:
        _state["off"] = os.environ.get(ENV, "0").strip().lower() not in ("1", "true", "yes", "on")
    if _state["off"] or n < 2 or threading.current_thread() is not _MAIN:
        return 1
    from . import kernels
    if kernels.module() is None:
        return 1
    import numba
    return max(1, min(n, numba.get_num_threads()))


def split(fn, n: int) -> None:
    """fn(lo, hi) for contiguous parts covering range(n): the first on this thread, the others on
    the pool, all finished on return (an exception in any part is raised here)."""
    k = parts(n)
    if k == 1:
        fn(0, n)
        return
    pool = _pool(k - 1)
    bounds = [n * i // k for i in range(k + 1)]
    futures = [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, k)]
    try:
        fn(bounds[0], bounds[1])
    finally:
        for f in futures:
            f.result()


def _pool(size):
    from concurrent.futures import ThreadPoolExecutor  # here: ``import tinytensor`` stays light
    if _state["size"] < size:
        if _state["pool"] is not None:
            _state["pool"].shutdown(wait=True)
        _state["pool"] = ThreadPoolExecutor(max_workers=size, thread_name_prefix="tinytensor-split")
        _state["size"] = size
    return _state["pool"]
