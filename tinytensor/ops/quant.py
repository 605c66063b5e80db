"""Blockwise weight quantization (QLoRA-style frozen bases) and the linear layer that reads it.

A (out, in) float weight is cut, row by row, into blocks of ``block`` consecutive input
features; each block keeps one float32 scale (its largest magnitude over qmax) and its
values rounded to integers in [-qmax, qmax]: int8 (qmax 127, 1 byte each) or 4-bit
(qmax 7, two to a byte). With 64-wide blocks that is 1.06 bytes (int8) or 0.56 bytes (4-bit)
a weight instead of float32's 4. ``QuantizedLinear`` multiplies by the weight dequantized on
the fly, in forward and again in backward, so no float copy of it outlives the op.

>>> w = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
>>> q, scale = quantize_blockwise(w, bits=8, block=64)
>>> float(np.abs(dequantize_blockwise(q, scale, 8, 64) - w).max()) < 0.02
True
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..backend import xp_of
from ..tensor import Function, register

QUANT_BITS = (8, 4)
_QMAX = {8: 127, 4: 7}


def quant_block(in_features: int, block: int = 64, bits: int = 8) -> int:
    """The block width used for ``in_features`` inputs: ``block`` when it divides them, else their
    greatest common divisor (4-bit packs pairs, so it must be even)."""
    width = math.gcd(in_features, block)
    if bits == 4 and width % 2:
        raise ValueError(f"4-bit quantization packs pairs of inputs: {in_features} input features have no even "
                         f"block width dividing them; use int8")
    return width


def quantize_blockwise(w, bits: int = 8, block: int = 64):
    """(q, scale): q int8 (out, in) for 8 bits, or uint8 (out, in/2) holding two 4-bit values
    (offset by 8) for 4 bits; scale float32 (out, in/block). ``block`` must divide ``in``."""
    if bits not in QUANT_BITS:
        raise ValueError(f"quantization bits must be one of {QUANT_BITS}, got {bits!r}")
    xp = xp_of(w)
    out_f, in_f = w.shape
    if block < 1 or in_f % block or (bits == 4 and block % 2):
        raise ValueError(f"block {block} must divide the {in_f} input features (and be even for 4 bits)")
    qmax = _QMAX[bits]
    blocks = w.astype(np.float32).reshape(out_f, in_f // block, block)
    scale = xp.abs(blocks).max(axis=2) / np.float32(qmax)
    scale = xp.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)  # an all-zero block: any scale
    q = xp.clip(xp.rint(blocks / scale[..., None]), -qmax, qmax).astype(np.int8).reshape(out_f, in_f)
    if bits == 4:
        u = (q + 8).astype(np.uint8)
        q = u[:, 0::2] + u[:, 1::2] * np.uint8(16)  # low nibble first (max 15 + 240: no overflow)
    return q, scale


def dequantize_blockwise(q, scale, bits: int, block: int, dtype=np.float32):
    """The float weight (out, in) that ``quantize_blockwise`` stored, in ``dtype``."""
    xp = xp_of(q)
    if bits == 4:
        vals = xp.empty((q.shape[0], 2 * q.shape[1]), np.int8)
        vals[:, 0::2] = (q & 0x0F).astype(np.int8) - 8
        vals[:, 1::2] = (q // np.uint8(16)).astype(np.int8) - 8
        q = vals
    out_f, in_f = q.shape
    w = q.reshape(out_f, in_f // block, block).astype(dtype)
    w *= scale.astype(dtype, copy=False)[..., None]
    return w.reshape(out_f, in_f)


@register
class QuantizedLinear(Function):
    """x @ dequantize(q, scale).T + bias: a linear layer whose weight is a frozen quantized
    constant (attributes, not inputs: it gets no gradient). Inputs (x[, bias])."""

    def forward(self, x, *bias, q, scale, bits, block):
        w = dequantize_blockwise(q, scale, bits, block, x.dtype)
        if x.shape[-1] != w.shape[1]:
            raise ValueError(f"input features {x.shape[-1]} != the quantized weight's {w.shape[1]}")
        self.q, self.scale, self.bits, self.block, self.has_bias = q, scale, bits, block, bool(bias)
        self.x_shape = x.shape
        y = backend.matmul(x.reshape(-1, x.shape[-1]), w.T)
        if bias:
            y += bias[0]
        return y.reshape(*x.shape[:-1], w.shape[0])

    def backward(self, g):
        g2 = g.reshape(-1, g.shape[-1])
        gx = None
        if self.needs_grad[0]:  # dequantized again rather than kept: the point is not to hold it
            w = dequantize_blockwise(self.q, self.scale, self.bits, self.block, g.dtype)
            gx = backend.matmul(g2, w).reshape(self.x_shape)
        if self.has_bias:
            return gx, (g2.sum(axis=0) if self.needs_grad[1] else None)
        return (gx,)
