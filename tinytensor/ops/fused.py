"""Fused neural-network primitives.

Each could be written from the basic primitives (and ``tests/test_fused.py``
checks it against exactly that composition); fused, it is numerically stable,
keeps fewer temporaries and is one Python call instead of ten.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend, kernels
from ..backend import xp_of
from ..tensor import Function, register
from .parallel import for_row_chunks


def _f32(a):
    """float16/bfloat16 (mixed precision) as float32, other arrays as they are: the fused ops
    below reduce in float32, since a sum of many half-precision terms loses its low digits
    (float16 keeps 11 bits) or overflows (float16 stops at 65504), and return the input's dtype."""
    return a.astype(np.float32) if a.dtype.itemsize < 4 else a


@register
class Softmax(Function):
    def forward(self, a, axis=-1):
        xp = xp_of(a)
        self.kernel = (axis in (-1, a.ndim - 1) and a.size > 0
                       and kernels.for_arrays(a, contiguous=False) is not None)
        if self.kernel:  # one pass per row over the last axis, into a fresh array
            a = np.ascontiguousarray(a)
            e = np.empty(a.shape, np.float32)
            kernels.module().softmax_rows_to(a.reshape(-1, a.shape[-1]), e.reshape(-1, a.shape[-1]))
            self.out, self.axis = e, axis
            return e
        a32 = _f32(a)  # float32 inside for half-precision input: the row sum
        e = xp.exp(a32 - a32.max(axis=axis, keepdims=True))
        e /= e.sum(axis=axis, keepdims=True)
        e = e.astype(a.dtype, copy=False)
        self.out, self.axis = e, axis  # keep the output: the backward needs only it
        return e

    def backward(self, g):
        if self.kernel:
            g, gx = np.ascontiguousarray(g, np.float32), np.empty(self.out.shape, np.float32)
            rows = (-1, gx.shape[-1])
            kernels.module().softmax_backward_rows_to(self.out.reshape(rows), g.reshape(rows), gx.reshape(rows))
            return gx
        p, g32 = _f32(self.out), _f32(g)
        return (p * (g32 - (g32 * p).sum(axis=self.axis, keepdims=True))).astype(g.dtype, copy=False)


@register
class LogSoftmax(Function):
    def forward(self, a, axis=-1):
        xp = xp_of(a)
        a32 = _f32(a)  # float32 inside for half-precision input: the log of the row sum
        shifted = a32 - a32.max(axis=axis, keepdims=True)
        shifted -= xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        shifted = shifted.astype(a.dtype, copy=False)
        self.out, self.axis = shifted, axis
        return shifted

    def backward(self, g):
        g32 = _f32(g)
        gx = g32 - xp_of(g).exp(_f32(self.out)) * g32.sum(axis=self.axis, keepdims=True)
        return gx.astype(g.dtype, copy=False)


def _row_sums(a):
    """Sums over the last axis, (..., 1): a matrix-vector product, 5x faster here than
    ndarray.sum over a short last axis."""
    return a @ xp_of(a).ones((a.shape[-1], 1), a.dtype)


def _layer_norm_forward(x, xhat, rstd, eps):
    """xhat = (x - mean) / sqrt(var + eps) over the last axis; rstd = 1 / sqrt(var + eps)."""
    xp = xp_of(x)
    inv_c = x.dtype.type(1.0 / x.shape[-1])
    xp.subtract(x, _row_sums(x) * inv_c, out=xhat)
    var = xp.einsum("...i,...i->...", xhat, xhat)[..., None] * inv_c
    var += eps
    xp.sqrt(var, out=var)
    xp.reciprocal(var, out=rstd)
    xhat *= rstd


def _layer_norm_backward(xhat, rstd, gxhat, gx):
    """gx = d/dx of xhat given d/dxhat, in terms of xhat and rstd only."""
    xp = xp_of(xhat)
    inv_c = gxhat.dtype.type(1.0 / xhat.shape[-1])
    mean_g = _row_sums(gxhat) * inv_c
    mean_gx = xp.einsum("...i,...i->...", gxhat, xhat)[..., None] * inv_c
    xp.multiply(xhat, mean_gx, out=gx)
    gx += mean_g
    xp.subtract(gxhat, gx, out=gx)
    gx *= rstd


@register
class LayerNorm(Function):
    """Normalise over the last axis, then scale and shift: inputs (x[, weight][, bias])."""

    def forward(self, x, *params, eps=1e-5, has_weight=True, has_bias=True):
        xp = xp_of(x)
        C = x.shape[-1]
        for p in params:
            if p.shape != (C,):
                raise ValueError(f"weight/bias shape {tuple(p.shape)} does not match the last dim {C}")
        # half precision: mean and variance (row reductions) in float32, xhat kept in float32 for
        # backward's reductions too; the output and the gradients come back in the input's dtype
        self.dtype = x.dtype
        x, params = _f32(x), [_f32(p) for p in params]
        x2 = x.reshape(-1, C)  # rows: split over the cores
        self.shape, self.has_weight, self.has_bias = x.shape, has_weight, has_bias
        self.weight = params[0] if has_weight else None
        k = kernels.for_arrays(x2, *params, contiguous=False)
        if k is not None:  # one fused pass; keeps x, mean and rstd (xhat is recomputed in backward)
            return self._forward_kernel(k, x2, params, eps).reshape(x.shape).astype(self.dtype, copy=False)
        self.xhat, self.rstd = xp.empty_like(x2), xp.empty((x2.shape[0], 1), x.dtype)
        for_row_chunks(lambda *rows: _layer_norm_forward(*rows, eps), x2, self.xhat, self.rstd)
        y = self.xhat * self.weight if has_weight else self.xhat.copy()
        if has_bias:
            y += params[-1]
        return y.reshape(x.shape).astype(self.dtype, copy=False)

    def backward(self, g):
        if self.xhat is None:
            return self._backward_kernel(g)
        xp = xp_of(g)
        g2 = _f32(g).reshape(self.xhat.shape)
        gxhat = g2 * self.weight if self.has_weight else xp.asarray(g2)
        gx = xp.empty_like(gxhat)
        for_row_chunks(_layer_norm_backward, self.xhat, self.rstd, gxhat, gx)
        grads = [gx.reshape(self.shape)]
        if self.has_weight:
            grads.append(xp.einsum("ni,ni->i", g2, self.xhat))
        if self.has_bias:
            grads.append(xp.ones((1, g2.shape[0]), g2.dtype) @ g2)  # column sums by BLAS
            grads[-1] = grads[-1][0]
        return tuple(gr.astype(self.dtype, copy=False) for gr in grads)

    def _forward_kernel(self, k, x2, params, eps):
        C, x2 = x2.shape[1], np.ascontiguousarray(x2)
        weight = np.ascontiguousarray(params[0]) if self.has_weight else np.ones(C, np.float32)
        bias = np.ascontiguousarray(params[-1]) if self.has_bias else np.zeros(C, np.float32)
        y = np.empty_like(x2)
        self.mean, self.rstd = np.empty(x2.shape[0], np.float32), np.empty(x2.shape[0], np.float32)
        k.layer_norm_forward(x2, weight, bias, np.float32(eps), y, self.mean, self.rstd)
        self.x2, self.kernel_weight, self.xhat = x2, weight, None
        return y

    def _backward_kernel(self, g):
        k = kernels.module()
        x2 = self.x2
        g2 = np.ascontiguousarray(g.reshape(x2.shape), np.float32)
        gx = np.empty_like(x2)
        gw_parts = np.empty((k.N_PARTS, x2.shape[1]), np.float32)
        gb_parts = np.empty_like(gw_parts)
        k.layer_norm_backward(x2, self.mean, self.rstd, self.kernel_weight, g2, gx, gw_parts, gb_parts)
        grads = [gx.reshape(self.shape)]
        if self.has_weight:
            grads.append(gw_parts.sum(axis=0))
        if self.has_bias:
            grads.append(gb_parts.sum(axis=0))
        return tuple(gr.astype(self.dtype, copy=False) for gr in grads)


def check_targets(op, targets, n_classes, ignore_index=None):
    """Class indices must be integers in [0, n_classes) (or ignore_index).

    ``tinytensor.functional`` calls it once, where indices enter (``cross_entropy``,
    ``embedding``): on the host for host indices (a batch drawn by NumPy, a prompt), before
    they move to the GPU. On a device array it reads back one flag, and the indices only
    when it is set: each read stalls a GPU until all queued work has run, and CuPy checks no
    bounds itself (an out-of-range index silently wraps around). Cheap on the host too (a
    few elementwise passes, no boolean-mask copy): it runs on each decoded token's lookup."""
    xp = xp_of(targets)
    if targets.dtype.kind not in "iu":
        has_nan = targets.dtype.kind == "f" and bool(xp.isnan(targets).any())
        raise TypeError(f"{op}: targets must be integer class indices, got dtype {targets.dtype}"
                        + (" containing NaN" if has_nan else ""))
    if targets.size == 0:
        return
    bad = (targets < 0) | (targets >= n_classes)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if not bool(bad.any()):  # the one read back from a GPU
        return
    host = backend.to_numpy(targets)  # an error: find the index to name
    valid = host if ignore_index is None else host[host != ignore_index]
    low, high = int(valid.min()), int(valid.max())
    raise IndexError(f"{op}: index {low if low < 0 else high} is out of range for {n_classes} classes "
                     f"(valid: 0..{n_classes - 1}{'' if ignore_index is None else f', or {ignore_index} to ignore'})")


@register
class CrossEntropy(Function):
    """Mean softmax cross-entropy of logits (N, C) against integer targets (N,), which
    ``F.cross_entropy`` has checked (``check_targets``)."""

    def forward(self, logits, targets, ignore_index=-1):
        xp = xp_of(logits)
        if logits.ndim != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(f"logits must be (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}")
        valid = targets != ignore_index
        safe_t = xp.where(valid, targets, 0)
        # half-precision logits: the softmax, its row sums and the mean in float32 (the probabilities
        # kept for backward too); the loss and the logits' gradient come back in the logits' dtype
        self.dtype, logits = logits.dtype, _f32(logits)
        k = kernels.for_arrays(logits)
        if k is not None:  # one fused pass per row: softmax kept for backward, the loss per row
            count = valid.sum(dtype=logits.dtype)
            self.probs, nll = np.empty_like(logits), np.empty(logits.shape[0], logits.dtype)
            self.targets, self.count, self.kernel = targets.astype(np.int64, copy=False), count, True
            k.cross_entropy_forward(logits, self.targets, np.int64(ignore_index), self.probs, nll)
            self.ignore_index = ignore_index
            return np.where(count > 0, nll.sum() / np.maximum(count, 1), np.nan).astype(self.dtype)
        self.kernel = False
        e = logits - logits.max(axis=1, keepdims=True)
        target_logit = xp.take_along_axis(e, safe_t[:, None], axis=1)[:, 0]
        xp.exp(e, out=e)
        s = e.sum(axis=1)
        e /= s[:, None]  # e is now the softmax: the backward needs only it
        # the number of valid targets stays on the device (reading it would stall a GPU), in the
        # logits' dtype: dividing by it is the float32 division it was as a Python int
        count = valid.sum(dtype=logits.dtype)
        self.probs, self.targets, self.valid, self.count = e, safe_t, valid, count
        nll = (xp.log(s) - target_logit) * valid
        # no valid target: NaN, as PyTorch's mean over nothing (maximum: no 0/0 warning)
        return xp.where(count > 0, nll.sum() / xp.maximum(count, 1), np.nan).astype(self.dtype)

    def backward(self, g):
        xp = xp_of(g)
        grad = self.probs  # reused in place: it is not needed again
        if self.kernel:
            scale = np.float32(_f32(g) / np.maximum(self.count, 1))
            kernels.module().cross_entropy_backward(grad, self.targets, np.int64(self.ignore_index), scale)
            self.probs = None
            return grad.astype(self.dtype, copy=False), None
        rows = xp.arange(grad.shape[0])
        grad[rows, self.targets] -= 1
        grad *= (self.valid * (_f32(g) / xp.maximum(self.count, 1)))[:, None].astype(grad.dtype)
        self.probs = None
        return grad.astype(self.dtype, copy=False), None


_GELU_C = math.sqrt(2.0 / math.pi)


def _gelu_forward(x, s, y):
    """s = 0.5 (1 + tanh(u)) = sigmoid(2u), y = x * s, u = c (x + 0.044715 x^3); into s and y."""
    xp = xp_of(x)
    xp.multiply(x, x, out=s)
    s *= _GELU_C * 0.044715
    s += _GELU_C
    s *= x  # u
    xp.tanh(s, out=s)  # float32 tanh is SIMD in NumPy 2 (2x faster than exp here)
    s += 1
    s *= 0.5
    xp.multiply(x, s, out=y)


def _gelu_backward(x, s, g, gx):
    """gx = g * d/dx [x sigmoid(2u)] = g * s (1 + 2 x u' (1 - s)), u' = c (1 + 3 * 0.044715 x^2)."""
    xp = xp_of(x)
    xp.multiply(x, x, out=gx)
    gx *= 2 * _GELU_C * 3 * 0.044715
    gx += 2 * _GELU_C
    gx *= x  # 2 x u'
    gx *= 1 - s
    gx += 1
    gx *= s
    gx *= g


@register
class Gelu(Function):
    """GELU, tanh approximation (GPT-2; torch's approximate="tanh")."""

    def forward(self, x):
        xp = xp_of(x)
        x = xp.asarray(x)
        k = kernels.for_arrays(x, contiguous=False)
        if k is not None:  # fused: keeps x only, backward recomputes sigmoid(2u)
            x = np.ascontiguousarray(x)
            self.x, self.s, y = x, None, np.empty_like(x)
            k.gelu_forward(x.reshape(-1), y.reshape(-1))
            return y
        self.x, self.s, y = x, xp.empty_like(x), xp.empty_like(x)
        for_row_chunks(_gelu_forward, x, self.s, y)  # rows on every core (NumPy)
        return y

    def backward(self, g):
        if self.s is None:
            g, gx = np.ascontiguousarray(g, np.float32), np.empty_like(self.x)
            kernels.module().gelu_backward(self.x.reshape(-1), g.reshape(-1), gx.reshape(-1))
            return gx
        gx = xp_of(g).empty_like(g)
        for_row_chunks(_gelu_backward, self.x, self.s, xp_of(g).asarray(g), gx)
        return gx


def scatter_add_rows(idx, g, n_rows):
    """out[n] = sum of the rows g[i] with idx[i] == n, without a per-row Python loop."""
    xp = xp_of(g)
    flat_idx = idx.reshape(-1)
    flat_g = g.reshape(flat_idx.size, g.shape[-1])  # not -1: that fails when idx is empty
    if xp is not np:
        out = xp.zeros((n_rows, flat_g.shape[1]), g.dtype)
        backend.add_at(out, flat_idx, flat_g)  # on a GPU an atomic scatter-add is the fast way
        return out
    k = kernels.for_arrays(flat_g)
    if k is not None:  # columns split over the cores, rows added in token order
        out = np.zeros((n_rows, flat_g.shape[1]), np.float32)
        k.embedding_backward(flat_g, flat_idx.astype(np.int64, copy=False), out)
        return out
    if flat_idx.size * n_rows <= (1 << 24):
        # small vocabularies: a one-hot matrix product is much faster than scatter-add
        one_hot = xp.zeros((n_rows, flat_idx.size), g.dtype)
        one_hot[flat_idx, xp.arange(flat_idx.size)] = 1
        return backend.matmul(one_hot, flat_g)
    # large vocabularies: sort the rows and add each run of equal indices
    order = xp.argsort(flat_idx, kind="stable")
    sorted_idx = flat_idx[order]
    starts = xp.concatenate([xp.zeros(1, bool), sorted_idx[1:] != sorted_idx[:-1]]).nonzero()[0]
    starts = xp.concatenate([xp.zeros(1, starts.dtype), starts])
    out = xp.zeros((n_rows, flat_g.shape[1]), g.dtype)
    out[sorted_idx[starts]] = xp.add.reduceat(flat_g[order], starts, axis=0)
    return out


@register
class Embedding(Function):
    """weight[idx]: rows of a (V, C) table for integer indices of any shape, which
    ``F.embedding`` has checked (``check_targets``)."""

    def forward(self, idx, weight):
        self.idx, self.n_rows = idx, weight.shape[0]
        return weight[idx]

    def backward(self, g):
        return None, scatter_add_rows(self.idx, g, self.n_rows)


@register
class Dropout(Function):
    """Zero each element with probability p and scale the rest by 1/(1-p)."""

    def forward(self, x, p=0.5):
        xp = xp_of(x)
        key = backend.dropout_key()
        k = kernels.for_arrays(x, contiguous=False)
        if k is not None:  # one pass drawing as it goes; keeps a bool mask (the same bits as below)
            self.mask, self.scale = None, np.float32(1.0 / (1.0 - p))
            y, self.keep = k.dropout(np.ascontiguousarray(x), key, p, self.scale)
            return y
        self.mask = (backend.keyed_uniform(xp, key, x.shape) >= p).astype(x.dtype)
        self.mask *= 1.0 / (1.0 - p)
        return x * self.mask

    def backward(self, g):
        if self.mask is None:
            g, gx = np.ascontiguousarray(g, np.float32), np.empty(self.keep.shape, np.float32)
            kernels.module().dropout_backward(g.reshape(-1), self.keep.reshape(-1), self.scale, gx.reshape(-1))
            return gx
        return g * self.mask


@register
class Linear(Function):
    """x @ weight.T + bias, weight (out, in) as in PyTorch; x (..., in)."""

    def forward(self, x, weight, *bias):
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(f"input features {x.shape[-1]} != weight in_features {weight.shape[1]} "
                             f"(x {tuple(x.shape)}, weight {tuple(weight.shape)})")
        self.x2 = x.reshape(-1, x.shape[-1])  # rows = tokens: the fast layout for BLAS
        self.x_shape, self.weight, self.has_bias = x.shape, weight, bool(bias)
        y = backend.matmul(self.x2, weight.T)  # (half precision on NumPy: float32 inside, see there)
        if bias:
            y += bias[0]
        return y.reshape(*x.shape[:-1], weight.shape[0])

    def backward(self, g):
        g2 = g.reshape(-1, g.shape[-1])
        gx = backend.matmul(g2, self.weight).reshape(self.x_shape) if self.needs_grad[0] else None
        gw = backend.matmul(g2.T, self.x2) if self.needs_grad[1] else None
        # mixed precision: g may come in another dtype than x (see gpt.model's attention)
        gx = gx if gx is None else gx.astype(self.x2.dtype, copy=False)
        gw = gw if gw is None else gw.astype(self.weight.dtype, copy=False)
        if self.has_bias:
            return gx, gw, g2.sum(axis=0)
        return gx, gw
