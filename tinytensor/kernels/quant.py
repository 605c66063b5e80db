"""Numba kernels for int8 weight-only products: y = x @ (q * scale).T without a float copy of q.

Decoding reads every weight once per token, so a product with a few rows of activations is
a stream over the weight matrix: int8 weights are a quarter of float32's bytes. The kernel
walks the matrix in its stored order (row-major (N, K): one output feature's K weights are
contiguous), split over the cores by output rows (``prange``), and for each row
- converts int8 to float32 inside the dot product (LLVM vectorises it: ``vpmovsxbd`` +
  ``vcvtdq2ps`` + ``vfmadd231ps`` on 8-lane registers, four accumulators, thanks to
  ``fastmath`` reassociation),
- multiplies by the row's (or block's) scale once per row (block), not per weight,
- prefetches the row ``PREFETCH_ROWS`` ahead (``llvm.prefetch``): the hardware prefetcher alone
  left one core reading ~7 GB/s from memory; with it ~11 GB/s (bench/RESULTS.md, issue 12b).

Scales are (N, n_blocks): one block per row (gpt.quantize's per-row int8) or blocks of
``K / n_blocks`` inputs (tinytensor.ops.quant's blockwise int8, QLoRA bases). Only for a few
activation rows (``MAX_ROWS``); a prompt's many rows go to BLAS on dequantized blocks (the
callers do that), where the matrix is read once for all rows anyway.
"""
from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .cpu import FASTMATH

_parallel = dict(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
_serial = dict(parallel=False, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)

MAX_ROWS = 8  # activation rows up to which the kernel beats dequantize-by-blocks + BLAS
PREFETCH_ROWS = 4  # rows prefetched ahead (2-32 measured the same on the 124M head; none: 1.6x slower)
# int8 weights below which one thread is faster: waking the second costs 10-80 us, a 1 MB
# matrix takes ~100 us on one core
PARALLEL_MIN = 1 << 20
_MAIN = threading.main_thread()
_CACHE_LINE = 64


@intrinsic
def _prefetch(typingctx, array, row, col):
    """Prefetch (read, keep in all cache levels) the cache line of ``array[row, col]``; no bounds
    check: the callers pass valid indices."""
    sig = types.void(array, row, col)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1], args[2]], wraparound=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        # (address, 0 = read, 3 = keep in every cache level, 1 = data cache)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


def _int8_matmul(x, q, scale, out):
    """out (M, N) = x (M, K) @ (q (N, K) int8 * scale (N, B) per block of K/B inputs).T."""
    M, K = x.shape
    N = q.shape[0]
    n_blocks = scale.shape[1]
    width = K // n_blocks
    for n in prange(N):
        ahead = n + PREFETCH_ROWS
        if ahead < N:
            for c in range(0, K, _CACHE_LINE):
                _prefetch(q, ahead, c)
        for m in range(M):
            total = np.float32(0.0)
            for b in range(n_blocks):
                k0 = b * width
                acc = np.float32(0.0)
                # int8 -> float32 and multiply-add, vectorised. (Written as k0 + j: with
                # range(k0, k0 + width) LLVM 14 gathers bytes one by one, 10x slower.)
                for j in range(width):
                    acc += np.float32(q[n, k0 + j]) * x[m, k0 + j]
                total += acc * scale[n, b]
            out[m, n] = total


def _serial_copy(fn):
    """The same function under its own name: Numba's on-disk cache tells functions apart by
    name and source, not by the parallel flag."""
    copy = type(fn)(fn.__code__, fn.__globals__, fn.__name__ + "_serial")
    copy.__qualname__ = fn.__qualname__ + "_serial"
    return copy


_int8_matmul_parallel = njit(**_parallel)(_int8_matmul)
_int8_matmul_serial = njit(**_serial)(_serial_copy(_int8_matmul))


def int8_matmul(x, q, scale, out):
    """out = x @ (q * scale, per block).T for float32 C-contiguous x (M <= MAX_ROWS, K) and out
    (M, N), int8 C-contiguous q (N, K), float32 C-contiguous scale (N, B) with B dividing K.
    Parallel over output rows for big matrices, on the main thread only (Numba's workqueue
    layer aborts when two threads launch parallel kernels at once)."""
    parallel = q.size >= PARALLEL_MIN and threading.current_thread() is _MAIN
    (_int8_matmul_parallel if parallel else _int8_matmul_serial)(x, q, scale, out)
    return out


def warm_up():
    """Load (or compile) both copies now."""
    x, q, s, out = np.ones((1, 64), np.float32), np.ones((2, 64), np.int8), np.ones((2, 1), np.float32), \
        np.empty((1, 2), np.float32)
    _int8_matmul_parallel(x, q, s, out)
    _int8_matmul_serial(x, q, s, out)
