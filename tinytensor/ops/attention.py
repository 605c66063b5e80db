"""Attention primitives: scaled dot-product attention, and multi-head self-attention
on packed q/k/v projections (what the GPT uses), sharing one implementation.

Fused for the same reasons as ``ops.fused`` (and checked against the composed form
in ``tests/test_fused.py``): the attention matrix is the only large thing kept
for backward, and it is kept transposed, (..., keys, queries), because NumPy
reduces over a non-last axis twice as fast as over a short last one.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend, kernels
from ..backend import xp_of
from ..tensor import Function, register
from .basic import unbroadcast

_mask_cache: dict = {}


def causal_bias_t(xp, t_q, t_k, dtype):
    """(t_k, t_q) additive mask: 0 where key j is visible to query i, -inf after it.

    Transposed (keys first), like the attention weights below. Queries are the last
    t_q positions of the t_k keys (as in KV-cache decoding). Cached: every layer and
    step asks for the same one.
    """
    key = (xp.__name__, t_q, t_k, np.dtype(dtype).str)
    bias = _mask_cache.get(key)
    if bias is None:
        q_pos = xp.arange(t_k - t_q, t_k)[None, :]
        bias = xp.where(xp.arange(t_k)[:, None] > q_pos, -np.inf, 0).astype(dtype)
        _mask_cache[key] = bias
    return bias


def attention_weights_t(qs, k, causal):
    """softmax(qs k^T [+ causal mask]) over the keys, for scaled queries, TRANSPOSED:
    (..., Tk, Tq). NumPy reduces over a non-last axis 2x faster than over a short
    last one (the softmax's max), and BLAS reads the transpose for free."""
    xp = xp_of(qs)
    kern = kernels.for_arrays(qs, k, contiguous=False)  # heads are strided views; att below is not
    if kern is not None:
        # the kernel's rows are queries, (..., Tq, Tk), masked and normalised in one pass per row;
        # returned as the same transposed view, which the backward turns back (BLAS reads either)
        att = qs @ k.swapaxes(-1, -2)
        kern.softmax_rows(att.reshape(-1, att.shape[-1]), qs.shape[-2], causal)
        return att.swapaxes(-1, -2)
    att_t = k @ qs.swapaxes(-1, -2)  # (..., Tk, Tq)
    if causal:
        att_t += causal_bias_t(xp, qs.shape[-2], k.shape[-2], att_t.dtype)
    att_t -= att_t.max(axis=-2, keepdims=True)
    xp.exp(att_t, out=att_t)
    att_t /= xp.ones((1, att_t.shape[-2]), att_t.dtype) @ att_t  # column sums by BLAS: fastest here
    return att_t


def split_heads(qkv, n_head):
    """Packed projections (B, T, 3C) -> q, k, v, each a (B, H, T, hs) strided view."""
    B, T, C3 = qkv.shape
    return qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head).transpose(2, 0, 3, 1, 4)


def merge_heads(y):
    """(B, H, T, hs) -> (B, T, H * hs)."""
    B, H, T, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def cached_attention(qkv, keys, values, start, n_head):
    """Inference only (arrays, no graph): causal attention of new tokens' packed q, k, v
    (B, T, 3C) over the ``start`` tokens already in ``keys``/``values`` (B, H, capacity, hs)
    and themselves; stores their keys and values there. Returns (B, T, C). The same math
    as MultiHeadAttention (the tests check the two agree)."""
    q, k, v = split_heads(qkv, n_head)
    end = start + q.shape[2]
    keys[:, :, start:end] = k
    values[:, :, start:end] = v
    att_t = attention_weights_t(q * q.dtype.type(1 / math.sqrt(q.shape[-1])), keys[:, :, :end], causal=True)
    return merge_heads(att_t.swapaxes(-1, -2) @ values[:, :, :end])


@register
class ScaledDotProductAttention(Function):
    """softmax(q k^T * scale [+ causal mask]) v, with optional dropout on the weights.

    q (..., Tq, hs), k (..., Tk, hs), v (..., Tk, hv). The attention matrix is the
    one thing kept for backward, besides the inputs (kept transposed, see
    ``attention_weights_t``).
    """

    def forward(self, q, k, v, causal=True, scale=None, dropout_p=0.0):
        if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
            raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together")
        self.q_shape = q.shape
        return self._attend(q, k, v, causal, scale, dropout_p)

    def backward(self, g):
        gq, gk, gv = self._attend_backward(g)
        return unbroadcast(gq, self.q_shape), unbroadcast(gk, self.k.shape), unbroadcast(gv, self.v.shape)

    def _attend(self, q, k, v, causal, scale, dropout_p):
        xp = xp_of(q)
        if causal and q.shape[-2] > k.shape[-2]:
            raise ValueError(f"causal attention needs at most as many queries as keys, got {q.shape[-2]} > {k.shape[-2]}")
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        qs = q * q.dtype.type(self.scale)  # scaling q is cheaper than scaling q k^T
        att_t = attention_weights_t(qs, k, causal)
        self.att_t, self.qs, self.k, self.v = att_t, qs, k, v
        self.mask_t = self.keep = None
        if dropout_p > 0:  # drawn in (..., Tq, Tk) order, then viewed transposed
            key = backend.dropout_key()
            att = att_t.swapaxes(-1, -2)
            kern = kernels.for_arrays(att)  # C-contiguous when the forward ran the softmax kernel
            if kern is not None:  # one pass: a bool mask and the dropped weights, kept for backward
                self.drop_scale = np.float32(1.0 / (1.0 - dropout_p))
                self.dropped, self.keep = kern.dropout(att, key, dropout_p, self.drop_scale)
                return self.dropped @ v
            u = backend.keyed_uniform(xp, key, att_t.shape[:-2] + att_t.shape[-1:] + att_t.shape[-2:-1])
            mask = (u >= dropout_p).astype(att_t.dtype)
            mask *= 1.0 / (1.0 - dropout_p)
            self.mask_t = mask.swapaxes(-1, -2)
        return (att_t if self.mask_t is None else att_t * self.mask_t).swapaxes(-1, -2) @ v

    def _attend_backward(self, g):
        xp = xp_of(g)
        att_t, mask_t = self.att_t, self.mask_t
        if self.keep is not None:
            gv = self.dropped.swapaxes(-1, -2) @ g
        else:
            gv = (att_t if mask_t is None else att_t * mask_t) @ g
        att = att_t.swapaxes(-1, -2)
        kern = kernels.for_arrays(att)  # C-contiguous when the forward ran the kernel
        if kern is not None:
            ga = g @ self.v.swapaxes(-1, -2)  # d loss / d weights, (..., Tq, Tk)
            rows = att.reshape(-1, att.shape[-1]), ga.reshape(-1, ga.shape[-1])
            if self.keep is not None:
                kern.softmax_dropout_backward_rows(rows[0], self.keep.reshape(rows[0].shape), self.drop_scale, rows[1])
            else:
                if mask_t is not None:
                    ga *= mask_t.swapaxes(-1, -2)
                kern.softmax_backward_rows(*rows)
            ga_t = ga.swapaxes(-1, -2)
        else:
            ga_t = self.v @ g.swapaxes(-1, -2)  # d loss / d weights, transposed (..., Tk, Tq)
            if mask_t is not None:
                ga_t *= mask_t
            # softmax backward over the keys (axis -2), in place on ga_t
            ga_t -= xp.einsum("...ij,...ij->...j", ga_t, att_t)[..., None, :]
            ga_t *= att_t
        gq = (ga_t.swapaxes(-1, -2) @ self.k) * ga_t.dtype.type(self.scale)
        gk = ga_t @ self.qs
        return gq, gk, gv


@register
class MultiHeadAttention(ScaledDotProductAttention):
    """Self-attention on packed projections: qkv (B, T, 3C) -> (B, T, C) with n_head heads.

    The same math as scaled_dot_product_attention; splitting the heads and merging
    them back inside one primitive saves the composed form's reshapes, transposes
    and three zero-filled slice gradients (heads are strided views, which BLAS
    reads in place).
    """

    def forward(self, qkv, n_head=1, causal=True, dropout_p=0.0):
        if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_head):
            raise ValueError(f"qkv must be (B, T, 3 * n_head * head_size), got {tuple(qkv.shape)} "
                             f"with n_head={n_head}")
        q, k, v = split_heads(qkv, n_head)  # each (B, H, T, hs)
        return merge_heads(self._attend(q, k, v, causal, None, dropout_p))  # (B, T, C)

    def backward(self, g):
        B, T, C = g.shape
        H = self.att_t.shape[1]
        gq, gk, gv = self._attend_backward(g.reshape(B, T, H, C // H).transpose(0, 2, 1, 3))
        out = xp_of(g).empty((B, T, 3, H, C // H), g.dtype)
        for i, gi in enumerate((gq, gk, gv)):
            out[:, :, i] = gi.transpose(0, 2, 1, 3)
        return out.reshape(B, T, 3 * C)
