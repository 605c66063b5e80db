"""LoRA's linear layer as one primitive: a frozen base plus the low-rank update, fused.

    y = x @ W.T + b + s * (drop(x) @ A.T) @ B.T        W (out, in), A (rank, in), B (out, rank)

Composed from ``linear``, ``mul`` and ``add`` the update keeps two extra (tokens, out)
activations alive until backward (the product with B, and the sum) and adds a third pass over
x's gradient (the two branches' gradients summed by the engine): on the full preset that is
more memory than full fine-tuning needs. Fused, the update is added into the base's output in
place, backward adds the thin branch into the base's input gradient in place, and the only
thing kept beyond the inputs is the (tokens, rank) product ``s * drop(x) @ A.T`` (and the
dropout mask when dropout is on). Without dropout, on a float base, the layer is one product with
``W + s B A`` (an (out, in) sum, kept for backward's input gradient): no pass over the (tokens, out)
output or the (tokens, in) gradient for the thin branch at all.

The frozen weight is an input (float base, ``W`` gets a gradient only if it requires one) or
attributes (a quantized base: ``quant=(q, scale, bits, block)``, dequantized on the fly in
forward and again in backward, never kept).
"""
from __future__ import annotations

import numpy as np

from .. import backend, kernels
from ..backend import xp_of
from ..tensor import Function, register
from .quant import dequantize_blockwise


@register
class LoraLinear(Function):
    """Inputs (x, lora_A, lora_B[, weight][, bias]); attributes ``scaling``, ``p`` (dropout on
    the adapter's input, already 0 outside training), ``has_weight``, ``has_bias``, ``quant``."""

    def forward(self, x, lora_A, lora_B, *base, scaling, p=0.0, has_weight=True, has_bias=False, quant=None):
        if has_weight == (quant is not None) or len(base) != has_weight + has_bias:
            raise ValueError("lora_linear takes a float weight input or quant=(q, scale, bits, block), not both")
        weight = base[0] if has_weight else None
        bias = base[-1] if has_bias else None
        self.quant, self.scaling = quant, np.dtype(x.dtype).type(scaling)
        w = weight if has_weight else dequantize_blockwise(*quant, dtype=x.dtype)
        if x.shape[-1] != w.shape[1] or lora_A.shape != (lora_B.shape[1], w.shape[1]) or lora_B.shape[0] != w.shape[0]:
            raise ValueError(f"shapes do not fit: x {tuple(x.shape)}, weight {tuple(w.shape)}, "
                             f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}")
        x2 = x.reshape(-1, x.shape[-1])  # rows = tokens: the fast layout for BLAS
        self.mask = None
        h2 = x2
        if p > 0:  # drawn exactly as the Dropout primitive draws (one key from the generator, same order)
            key, scale = backend.dropout_key(), x.dtype.type(1.0 / (1.0 - p))
            kern = kernels.for_arrays(x2)
            if kern is not None:  # the mask's floats made where they are used (the same bits as below)
                h2, keep = kern.dropout(x2, key, p, scale)
            else:
                keep = backend.keyed_uniform(xp_of(x), key, x2.shape) >= p
            self.mask = keep.astype(x.dtype)
            self.mask *= scale
            if kern is None:
                h2 = x2 * self.mask
        ts = backend.matmul(h2, lora_A.T)  # (N, rank): thin, so scaling here costs nothing
        ts *= self.scaling
        self.w_eff = None
        if self.mask is None and quant is None:
            # no dropout, float base: the adapter's input is the base's, so x (W + s B A)^T is the whole
            # layer in one product; the (out, in) sum costs out*in*rank, where ts @ B^T and adding it in
            # would be two more passes over the (N, out) output (and backward's over the (N, in) gradient)
            self.w_eff = backend.matmul(lora_B, lora_A)
            self.w_eff *= self.scaling
            self.w_eff += w
        y = backend.matmul(x2, (w if self.w_eff is None else self.w_eff).T)
        if bias is not None:
            y += bias
        if self.w_eff is None:
            y += backend.matmul(ts, lora_B.T)
        self.x2, self.x_shape, self.weight, self.A, self.B, self.ts = x2, x.shape, weight, lora_A, lora_B, ts
        self.has_bias = has_bias
        return y.reshape(*x.shape[:-1], w.shape[0])

    def backward(self, g):
        need_x, need_a, need_b = self.needs_grad[:3]
        need_w = self.weight is not None and self.needs_grad[3]
        g2 = g.reshape(-1, g.shape[-1])
        gts = backend.matmul(g2, self.B) if (need_a or need_x and self.w_eff is None) else None  # (N, rank)
        if gts is not None:
            gts *= self.scaling  # now the gradient of drop(x) @ A.T
        gx = ga = gb = gw = None
        if need_b:
            gb = backend.matmul(g2.T, self.ts)
        if need_a:
            h2 = self.x2 if self.mask is None else self.x2 * self.mask
            ga = backend.matmul(gts.T, h2)
        if need_x and self.w_eff is not None:
            gx = backend.matmul(g2, self.w_eff).reshape(self.x_shape)
        elif need_x:
            w = self.weight if self.quant is None else dequantize_blockwise(*self.quant, dtype=g.dtype)
            gx = backend.matmul(g2, w)
            thin = backend.matmul(gts, self.A)
            if self.mask is not None:
                thin *= self.mask
            gx += thin
            gx = gx.reshape(self.x_shape)
        if need_w:
            gw = backend.matmul(g2.T, self.x2)
        grads = (gx, ga, gb) + ((gw,) if self.weight is not None else ())
        if self.has_bias:
            grads += (g2.sum(axis=0) if self.needs_grad[-1] else None,)
        return grads
