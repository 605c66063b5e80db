"""LoRA (Hu et al. 2021): a frozen Linear plus a trainable low-rank update, optionally on a
quantized base (QLoRA-style: the frozen weight in int8 or 4-bit blocks, the adapter in float32).

    y = x @ W.T + b + (dropout(x) @ A.T @ B.T) * alpha / rank

A (rank, in) starts random and B (out, rank) at zero, so a fresh adapter changes nothing.
W and b are frozen (``requires_grad`` false): no gradient is computed for them and an
optimizer given ``trainable_parameters`` keeps no state for them.

>>> import tinytensor as tt
>>> layer = LoRALinear(tt.nn.Linear(16, 8), rank=4, alpha=8)
>>> [name for name, p in layer.named_parameters() if p.requires_grad]
['lora_A', 'lora_B']
>>> layer.merge(); layer.merged       # W += B A alpha/rank: a plain Linear's cost at inference
True

The frozen weight keeps its name (``weight``, or ``weight_q`` + ``weight_scale`` when quantized),
so a model's state-dict names are its base's plus ``lora_A``/``lora_B`` per adapted layer.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from .. import functional as F
from ..ops.quant import QUANT_BITS, dequantize_blockwise, quant_block, quantize_blockwise
from ..tensor import DEFAULT_DTYPE
from .layers import Linear
from .module import Module, Parameter

BASE_DTYPES = ("float32", "int8", "int4")  # how the frozen weight is held
_BITS = {"int8": 8, "int4": 4}


class LoRALinear(Module):
    """A frozen ``Linear`` (its Parameters taken over, not copied, or quantized) plus a rank-``rank``
    adapter. ``base_dtype``: float32, or int8/int4 blocks of ``quant_block`` inputs with a scale each."""

    def __init__(self, linear: Linear, rank: int, alpha: float, dropout: float = 0.0,
                 base_dtype: str = "float32", quant_block_size: int = 64):
        super().__init__()
        if not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        if base_dtype not in BASE_DTYPES:
            raise ValueError(f"LoRA base_dtype must be one of {', '.join(BASE_DTYPES)}, got {base_dtype!r}")
        weight = linear.weight
        self.out_features, self.in_features = weight.shape
        self.rank, self.alpha, self.dropout, self.base_dtype = rank, float(alpha), dropout, base_dtype
        self.scaling = float(alpha) / rank
        if base_dtype == "float32":
            self.weight = weight
            weight.requires_grad_(False)
        else:
            self.bits = _BITS[base_dtype]
            self.block = quant_block(self.in_features, quant_block_size, self.bits)
            q, scale = quantize_blockwise(weight.data, self.bits, self.block)
            self.weight_q, self.weight_scale = Parameter(q, requires_grad=False), Parameter(scale, requires_grad=False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        xp = weight.xp
        # A as PyTorch's (and PEFT's) default Linear init, B zero: the adapter starts as a no-op
        bound = 1.0 / math.sqrt(self.in_features)
        a = backend.rng().uniform(-bound, bound, (rank, self.in_features)).astype(DEFAULT_DTYPE)
        self.lora_A = Parameter(xp.asarray(a))
        self.lora_B = Parameter(xp.zeros((self.out_features, rank), DEFAULT_DTYPE))
        self.merged = False

    def base_weight(self):
        """The frozen weight as a float array (dequantized for a quantized base)."""
        if self.base_dtype == "float32":
            return self.weight.data
        return dequantize_blockwise(self.weight_q.data, self.weight_scale.data, self.bits, self.block)

    def delta(self):
        """The adapter's update to the weight, B A alpha/rank (out, in), as an array."""
        return backend.matmul(self.lora_B.data, self.lora_A.data) * np.float32(self.scaling)

    def forward(self, x):
        if self.merged:  # (only a float base merges)
            return F.linear(x, self.weight, self.bias)
        # one fused primitive: (x A^T) B^T as two thin products, never the (out, in) update itself,
        # added into the base's output in place (composed, it kept two more (tokens, out) arrays)
        quant = None if self.base_dtype == "float32" else (self.weight_q.data, self.weight_scale.data, self.bits,
                                                           self.block)
        return F.lora_linear(x, self.weight if quant is None else None, self.lora_A, self.lora_B, self.bias,
                             self.scaling, self.dropout, self.training, quant=quant)

    def merge(self):
        """Fold the adapter into the float weight (inference at a plain Linear's cost)."""
        if self.base_dtype != "float32":
            raise ValueError("a quantized base cannot take the adapter in place; use to_linear() for a merged "
                             "float Linear")
        if not self.merged:
            self.weight.data += self.delta().astype(self.weight.dtype)
            self.merged = True
        return self

    def unmerge(self):
        """Take the adapter back out of the weight (training it again)."""
        if self.merged:
            self.weight.data -= self.delta().astype(self.weight.dtype)
            self.merged = False
        return self

    def to_linear(self) -> Linear:
        """A plain float ``Linear`` holding base + update (the adapter merged for good)."""
        layer = Linear.__new__(Linear)
        Module.__init__(layer)
        layer.in_features, layer.out_features = self.in_features, self.out_features
        w = self.base_weight()
        layer.weight = Parameter(w.copy() if self.merged else w + self.delta().astype(w.dtype))
        layer.bias = None if self.bias is None else Parameter(self.bias.data.copy())
        return layer

    def __repr__(self):
        return (f"LoRALinear({self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha:g}, "
                f"base={self.base_dtype}{', merged' if self.merged else ''})")


def trainable_parameters(module: Module):
    """The parameters that require grad (what an optimizer gets in a LoRA run)."""
    return [p for p in module.parameters() if p.requires_grad]


__all__ = ["LoRALinear", "BASE_DTYPES", "QUANT_BITS", "trainable_parameters"]
