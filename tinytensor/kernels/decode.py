"""Numba kernels for decoding one token at batch 1 with a KV cache: one call per block.

A decoded token is a few dozen small operations per block (norms, four matrix-vector
products, attention over the cache, the MLP's activation, two residual adds). Through the
autograd ops each is a Python call, a Tensor and a NumPy temporary: at batch 1 that overhead
was about as large as the products themselves (bench/RESULTS.md). ``block_step`` runs a whole
pre-norm block on one token's residual vector in one call, on the calling thread, writing
only into buffers its caller keeps; ``head_step`` runs the final norm and the LM head.

Everything ``gpt.model.ModelOptions`` can build is covered, by flags rather than separate
kernels: LayerNorm or RMSNorm (gain and bias optional: empty arrays mean absent), biases in
the Linears or not, GELU (tanh) / ReLU^2 / SwiGLU, QK-norm, RoPE (the caller passes this
position's cos and sin). Same math as the model's ops up to float32 rounding (the products
are summed in another order than BLAS's); ``tests/test_decode.py`` holds the logits to the
model's forward. Only float32 C-contiguous NumPy arrays come here (``kernels.decode_module``).
"""
from __future__ import annotations

import math
import types

import numpy as np
from numba import njit, prange

from .cpu import _GELU_A, _GELU_C, FASTMATH, _softmax_row, _tanh

_opts = dict(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
_f = np.float32

MLP_KINDS = {"gelu": 0, "relu2": 1, "swiglu": 2}  # gpt.model.ModelOptions.mlp -> the kernel's flag


@njit(**_opts)
def _norm(x, weight, bias, eps, rms, out):
    """LayerNorm (rms false) or RMSNorm of the vector x into out; weight/bias of size 0: none."""
    c = x.size
    mu = _f(0.0)
    if not rms:
        for j in range(c):
            mu += x[j]
        mu /= _f(c)
    ss = _f(0.0)
    for j in range(c):
        d = x[j] - mu
        ss += d * d
    r = _f(1.0) / np.sqrt(ss / _f(c) + eps)
    for j in range(c):
        out[j] = (x[j] - mu) * r
    if weight.size:
        for j in range(c):
            out[j] *= weight[j]
    if bias.size:
        for j in range(c):
            out[j] += bias[j]


def _renamed(fn, suffix, names=None):
    """A copy of fn's code under fn's name + suffix (Numba's disk cache tells functions apart by
    name, not by the compile flags), optionally with other globals."""
    copy = types.FunctionType(fn.__code__, names or fn.__globals__, fn.__name__ + suffix, fn.__defaults__,
                              fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    return copy


def _matvec(w, x, bias, out, accumulate):
    """out (+)= w @ x (+ bias); w (N, K) row-major: each output is one contiguous dot product.
    Compiled twice: on the calling thread, and _matvec_parallel with its rows split over the cores."""
    n, k = w.shape
    for i in prange(n):
        acc = _f(0.0)
        for j in range(k):
            acc += w[i, j] * x[j]
        if bias.size:
            acc += bias[i]
        if accumulate:
            out[i] += acc
        else:
            out[i] = acc


_matvec_parallel = njit(parallel=True, **_opts)(_renamed(_matvec, "_parallel"))
_matvec = njit(**_opts)(_matvec)


@njit(**_opts)
def _rms_inplace(v, lo, hi, eps):
    ss = _f(0.0)
    for j in range(lo, hi):
        ss += v[j] * v[j]
    r = _f(1.0) / np.sqrt(ss / _f(hi - lo) + eps)
    for j in range(lo, hi):
        v[j] *= r


@njit(**_opts)
def _rotate(v, lo, half, cos, sin):
    """RoPE, half-split convention (gpt.model.rotate): v[lo + i] pairs with v[lo + half + i]."""
    for i in range(half):
        a, b = v[lo + i], v[lo + half + i]
        v[lo + i] = a * cos[i] - b * sin[i]
        v[lo + half + i] = b * cos[i] + a * sin[i]


def block_step(x, ln1_w, ln1_b, w_qkv, b_qkv, w_o, b_o, ln2_w, ln2_b, w_fc, b_fc, w_proj, b_proj,
               keys, values, length, n_head, eps, rms, mlp_kind, qk_norm, cos, sin,
               h, qkv, att, scores, hidden):
    """One pre-norm block on one token, in place on its residual x (C,):
    x += c_proj(attention(norm_1(x))); x += mlp(norm_2(x)).

    keys/values (n_head, capacity, hs) hold ``length`` cached tokens; this token's key and
    value are stored at ``length`` (the caller advances the cache). cos/sin (hs/2,): RoPE at
    this position, or size 0 for none. h (C,), qkv (3C,), att (C,), scores (capacity,) and
    hidden (c_fc's outputs) are scratch buffers.
    """
    c = x.size
    hs = c // n_head
    _norm(x, ln1_w, ln1_b, eps, rms, h)
    _matvec(w_qkv, h, b_qkv, qkv, False)
    for hd in range(n_head):  # QK-norm, then RoPE, on each head's query and key (gpt.model.transform_qk)
        for lo in (hd * hs, c + hd * hs):
            if qk_norm:
                _rms_inplace(qkv, lo, lo + hs, _f(1e-5))
            if cos.size:
                _rotate(qkv, lo, hs // 2, cos, sin)
    scale = _f(1.0) / np.sqrt(_f(hs))
    end = length + 1
    for hd in range(n_head):
        q0, k0, v0 = hd * hs, c + hd * hs, 2 * c + hd * hs
        for d in range(hs):
            keys[hd, length, d] = qkv[k0 + d]
            values[hd, length, d] = qkv[v0 + d]
        for j in range(end):
            s = _f(0.0)
            for d in range(hs):
                s += qkv[q0 + d] * keys[hd, j, d]
            scores[j] = s * scale
        _softmax_row(scores, scores, end)
        for d in range(hs):
            att[q0 + d] = _f(0.0)
        for j in range(end):
            p = scores[j]
            for d in range(hs):
                att[q0 + d] += p * values[hd, j, d]
    _matvec(w_o, att, b_o, x, True)
    _norm(x, ln2_w, ln2_b, eps, rms, h)
    _matvec(w_fc, h, b_fc, hidden, False)
    n_hidden = w_proj.shape[1]
    if mlp_kind == 0:  # GELU, tanh approximation (as cpu.gelu_forward)
        for i in range(n_hidden):
            v = hidden[i]
            hidden[i] = v * (_f(0.5) + _f(0.5) * _tanh(_GELU_C * (v + _GELU_A * v * v * v)))
    elif mlp_kind == 1:  # ReLU^2
        for i in range(n_hidden):
            v = max(hidden[i], _f(0.0))
            hidden[i] = v * v
    else:  # SwiGLU: silu(gate) * up, gate and up packed in c_fc's outputs
        for i in range(n_hidden):
            g = hidden[i]
            hidden[i] = g / (_f(1.0) + _f(math.exp(-g))) * hidden[n_hidden + i]
    _matvec(w_proj, hidden[:n_hidden], b_proj, x, True)


def _with_parallel_products(fn):
    """fn's loop with its matrix-vector products split over the cores: a copy of its code whose
    _matvec is _matvec_parallel, under its own name (Numba's disk cache tells functions apart by
    name). One parallel region per product: 4 per block."""
    return njit(**_opts)(_renamed(fn, "_parallel", {**fn.__globals__, "_matvec": _matvec_parallel}))


block_step_parallel = _with_parallel_products(block_step)
block_step = njit(**_opts)(block_step)


@njit(**_opts)
def head_step(x, w, b, eps, rms, w_head, h, logits):
    """logits (V,) = w_head @ norm_f(x): the final norm and the LM head (no bias)."""
    _norm(x, w, b, eps, rms, h)
    _matvec(w_head, h, b[:0], logits, False)


def warm_up():
    """Run both kernels once on tiny arrays of the types decoding passes: they load from Numba's
    cache (or compile, the first time) here, not in the first decoded token."""
    f = np.float32
    c, n_head, cap, hidden = 8, 2, 4, 32
    none = np.empty(0, f)
    x, g, b = np.ones(c, f), np.ones(c, f), np.zeros(c, f)
    kv = [np.zeros((n_head, cap, c // n_head), f) for _ in range(2)]
    cos, sin = np.ones(c // n_head // 2, f), np.zeros(c // n_head // 2, f)
    for mlp_kind, (w, wb), step in ((0, (g, b), block_step), (2, (none, none), block_step),
                                    (0, (g, b), block_step_parallel), (2, (none, none), block_step_parallel)):
        n_fc = 2 * hidden if mlp_kind == 2 else hidden
        step(x, w, wb, np.ones((3 * c, c), f), np.zeros(3 * c, f), np.ones((c, c), f), wb, w, wb,
                   np.ones((n_fc, c), f), np.zeros(n_fc, f), np.ones((c, hidden), f), wb,
                   kv[0], kv[1], 0, n_head, f(1e-5), False, mlp_kind, False, none if mlp_kind == 0 else cos,
                   none if mlp_kind == 0 else sin, np.empty(c, f), np.empty(3 * c, f), np.empty(c, f),
                   np.empty(cap, f), np.empty(n_fc, f))
        head_step(x, w, wb, f(1e-5), False, np.ones((5, c), f), np.empty(c, f), np.empty(5, f))
