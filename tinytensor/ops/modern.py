"""Fused primitives for the modern model options (issue 11): RMSNorm, ReLU^2, SwiGLU, and QK-norm +
RoPE on the packed q/k/v projection.

Each could be written from the basic primitives (``tests/test_fused.py`` checks it against exactly
that composition); fused, a modern block's forward is 4 calls where the composed form took ~40
(multiplies, means, slices, concatenations), and the backward has no zero-filled slice gradients to
add up. Float32 NumPy arrays take the Numba kernels (``tinytensor.kernels.modern``); the code here
is the reference (float64, half precision computed in float32, CuPy).
"""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..backend import xp_of
from ..tensor import Function, register
from .fused import _f32


def _modern_kernels(*arrays):
    """``kernels.modern`` for float32 NumPy arrays with the kernels on, else None."""
    return kernels.modern_for_arrays(*arrays, contiguous=False)


@register
class RmsNorm(Function):
    """x / sqrt(mean(x^2) + eps) over the last axis, times a gain: inputs (x[, weight]). Keeps x
    and rstd (the normalised x is recomputed in backward)."""

    def forward(self, x, *params, eps=1e-5):
        C = x.shape[-1]
        if params and params[0].shape != (C,):
            raise ValueError(f"weight shape {tuple(params[0].shape)} does not match the last dim {C}")
        self.dtype, self.shape = x.dtype, x.shape
        x2 = _f32(x).reshape(-1, C)
        w = _f32(params[0]) if params else None
        self.has_weight = w is not None
        k = _modern_kernels(x, *params)  # float32 only: half precision takes the code below
        if k is not None:
            self.kernel = True
            self.x2 = np.ascontiguousarray(x2)
            self.w = np.ascontiguousarray(w) if w is not None else np.ones(C, np.float32)
            y, self.rstd = np.empty_like(self.x2), np.empty(x2.shape[0], np.float32)
            k.rms_norm_forward(self.x2, self.w, np.float32(eps), y, self.rstd)
            return y.reshape(x.shape)
        xp = xp_of(x)
        self.kernel, self.x2, self.w = False, x2, w
        ms = xp.einsum("ni,ni->n", x2, x2)[:, None] * x2.dtype.type(1.0 / C)
        self.rstd = 1.0 / xp.sqrt(ms + x2.dtype.type(eps))
        y = x2 * self.rstd
        if w is not None:
            y *= w
        return y.reshape(x.shape).astype(self.dtype, copy=False)

    def backward(self, g):
        C = self.shape[-1]
        if self.kernel:
            k = kernels.modern_module()
            g2 = np.ascontiguousarray(g.reshape(-1, C), np.float32)
            gx, parts = np.empty_like(g2), np.empty((k.N_PARTS, C), np.float32)
            k.rms_norm_backward(self.x2, self.rstd, self.w, g2, gx, parts)
            grads = (gx.reshape(self.shape),) + ((parts.sum(axis=0),) if self.has_weight else ())
            return grads
        xp = xp_of(g)
        g2 = _f32(g).reshape(-1, C)
        xhat = self.x2 * self.rstd
        gxhat = g2 * self.w if self.has_weight else g2
        mean = xp.einsum("ni,ni->n", gxhat, xhat)[:, None] * xhat.dtype.type(1.0 / C)
        gx = (gxhat - xhat * mean) * self.rstd
        grads = [gx.reshape(self.shape)]
        if self.has_weight:
            grads.append(xp.einsum("ni,ni->i", g2, xhat))
        return tuple(gr.astype(self.dtype, copy=False) for gr in grads)


@register
class ReluSquared(Function):
    """relu(x)^2 (the ReLU^2 MLP of modded-nanogpt). Keeps x."""

    def forward(self, x):
        k = _modern_kernels(x)
        self.x, self.kernel = x, k is not None
        if k is not None:
            self.x = np.ascontiguousarray(x)
            y = np.empty_like(self.x)
            k.relu_squared_forward(self.x.reshape(-1), y.reshape(-1))
            return y
        r = xp_of(x).maximum(x, 0)
        return r * r

    def backward(self, g):
        if self.kernel:
            g, gx = np.ascontiguousarray(g, np.float32), np.empty_like(self.x)
            kernels.modern_module().relu_squared_backward(self.x.reshape(-1), g.reshape(-1), gx.reshape(-1))
            return gx
        return (2 * xp_of(g).maximum(self.x, 0)) * g


@register
class Swiglu(Function):
    """(..., 2H) [gate | up] -> (..., H): silu(gate) * up (llama's MLP). Keeps the input."""

    def forward(self, h):
        if h.shape[-1] % 2:
            raise ValueError(f"swiglu needs an even last dimension [gate | up], got {h.shape[-1]}")
        H = h.shape[-1] // 2
        self.dtype, self.shape = h.dtype, h.shape
        k = _modern_kernels(h)
        self.kernel = k is not None
        if k is not None:
            self.h2 = np.ascontiguousarray(h.reshape(-1, 2 * H))
            y = np.empty((self.h2.shape[0], H), np.float32)
            k.swiglu_forward(self.h2, y)
            return y.reshape(h.shape[:-1] + (H,))
        xp = xp_of(h)
        self.h2 = _f32(h)
        gate, up = self.h2[..., :H], self.h2[..., H:]
        s = _sigmoid(gate)
        return (gate * s * up).astype(self.dtype, copy=False)

    def backward(self, g):
        H = self.shape[-1] // 2
        if self.kernel:
            g2 = np.ascontiguousarray(g.reshape(-1, H), np.float32)
            gh = np.empty_like(self.h2)
            kernels.modern_module().swiglu_backward(self.h2, g2, gh)
            return gh.reshape(self.shape)
        xp = xp_of(g)
        g32 = _f32(g)
        gate, up = self.h2[..., :H], self.h2[..., H:]
        s = _sigmoid(gate)
        return xp.concatenate([g32 * up * s * (1 + gate * (1 - s)), g32 * gate * s], axis=-1).astype(self.dtype,
                                                                                                       copy=False)


@register
class QkNormRope(Function):
    """On the packed projection qkv (B, T, 3C), C = n_head hs: each head's query and key RMS-normalised
    over hs (no gain) when ``qk_norm``, then rotated by RoPE (GPT-NeoX/llama's half split: dimension d
    pairs with d + hs/2) when cos and sin (T, 1, hs/2) or (T, hs/2) are given; the values pass through.
    Inputs (qkv[, cos, sin]); cos and sin get no gradient. Keeps qkv and the norms' rstd."""

    def forward(self, qkv, *tables, n_head, qk_norm=True, eps=1e-5):
        B, T, C3 = qkv.shape
        if C3 % (3 * n_head) or (tables and (C3 // (3 * n_head)) % 2):
            raise ValueError(f"qkv's last dim {C3} is not 3 n_head hs with n_head {n_head} (and hs even for RoPE)")
        hs = C3 // (3 * n_head)
        rope = bool(tables)
        if rope:
            cos, sin = (t.reshape(t.shape[0], -1) for t in tables)
            if cos.shape != (T, hs // 2) or sin.shape != cos.shape:
                raise ValueError(f"cos and sin must hold (T, hs/2) = ({T}, {hs // 2}) angles, got "
                                 f"{tuple(tables[0].shape)} and {tuple(tables[1].shape)}")
        self.dtype, self.T, self.n_head, self.qk_norm, self.rope = qkv.dtype, T, n_head, qk_norm, rope
        k = _modern_kernels(qkv, *tables)
        self.kernel = k is not None
        if k is not None:
            self.x = np.ascontiguousarray(qkv.reshape(B * T, C3))
            self.cos, self.sin = ((np.ascontiguousarray(cos), np.ascontiguousarray(sin)) if rope
                                  else (np.zeros((1, 1), np.float32),) * 2)
            out, self.rstd = np.empty_like(self.x), np.empty((B * T, 2 * n_head), np.float32)
            k.qk_norm_rope_forward(self.x, T, self.cos, self.sin, n_head, qk_norm, rope, np.float32(eps), out,
                                   self.rstd)
            return out.reshape(qkv.shape)
        xp = xp_of(qkv)
        x = _f32(qkv).reshape(B, T, 3, n_head, hs)
        qk = x[:, :, :2]
        self.x = x
        if qk_norm:
            ms = xp.einsum("...i,...i->...", qk, qk)[..., None] * x.dtype.type(1.0 / hs)
            self.rstd = 1.0 / xp.sqrt(ms + x.dtype.type(eps))
            qk = qk * self.rstd
        if rope:
            self.cos, self.sin = (_f32(t).reshape(T, 1, 1, hs // 2) for t in (cos, sin))
            qk = _rotate(qk, self.cos, self.sin)
        out = xp.concatenate([qk, x[:, :, 2:]], axis=2)
        return out.reshape(qkv.shape).astype(self.dtype, copy=False)

    def backward(self, g):
        if self.kernel:
            g2 = np.ascontiguousarray(g.reshape(self.x.shape), np.float32)
            gx = np.empty_like(self.x)
            kernels.modern_module().qk_norm_rope_backward(self.x, self.T, self.cos, self.sin, self.n_head,
                                                          self.qk_norm, self.rope, self.rstd, g2, gx)
            return gx.reshape(g.shape)
        xp = xp_of(g)
        g5 = _f32(g).reshape(self.x.shape)
        gqk = g5[:, :, :2]
        if self.rope:  # the transpose of a rotation turns back by the same angle
            gqk = _rotate(gqk, self.cos, -self.sin)
        if self.qk_norm:
            x, r = self.x[:, :, :2], self.rstd
            hs = x.shape[-1]
            s = xp.einsum("...i,...i->...", gqk, x)[..., None] * (r * r) * x.dtype.type(1.0 / hs)
            gqk = (gqk - x * s) * r
        gx = xp.concatenate([gqk, g5[:, :, 2:]], axis=2)
        return gx.reshape(g.shape).astype(self.dtype, copy=False)


def _rotate(x, cos, sin):
    """(..., hs) pairs (d, d + hs/2) turned by the angles: [x1 c - x2 s, x2 c + x1 s]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return xp_of(x).concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _sigmoid(x):
    """1 / (1 + exp(-x)) with no overflow and full relative precision in both tails."""
    xp = xp_of(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0, e) / (1.0 + e)
