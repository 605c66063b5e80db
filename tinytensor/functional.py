"""Functions on Tensors: thin wrappers over the primitives, plus composites.

Composites (``sub``, ``div``, ``mean``, ``var``, ``sqrt``, ``stack``, ``split``,
``masked_fill``...) are built from primitives, so they need no backward of
their own. The Tensor operators and methods (declared in ``tensor.py``) call
these: ``a + b`` is ``add(a, b)``, ``x.sum(0)`` is ``sum(x, 0)``.

>>> import numpy as np, tinytensor as tt, tinytensor.functional as F
>>> logits = tt.randn(4, 5, requires_grad=True)
>>> loss = F.cross_entropy(logits, tt.tensor(np.array([0, 1, 4, 2])))
>>> loss.backward(); logits.grad.shape
(4, 5)
"""
from __future__ import annotations

import builtins

import numpy as np

from . import backend
from .ops import attention as A
from .ops import basic as P
from .ops import fused as N
from .ops import lora as L
from .ops import modern as M
from .ops import quant as Q
from .tensor import DEFAULT_DTYPE, Tensor, _is_float


def _lift(x, like: Tensor) -> Tensor:
    """Turn a Python number or array into a Tensor on ``like``'s backend.

    Numbers take ``like``'s float dtype, so ``x * 0.5`` stays float32.
    """
    if isinstance(x, Tensor):
        return x
    xp = like.xp
    if isinstance(x, (bool, int, float, np.number)) and not isinstance(x, np.ndarray):
        if _is_float(like.dtype):
            dtype = like.dtype
        else:
            dtype = DEFAULT_DTYPE if isinstance(x, (float, np.floating)) else like.dtype
        return Tensor._wrap(xp.asarray(x, dtype=dtype))
    return Tensor(xp.asarray(x))


def _unlift_index(index):
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(_unlift_index(i) for i in index)
    if isinstance(index, list):
        return np.asarray(index)
    return index


# -- arithmetic --------------------------------------------------------------------------
def add(a, b):
    a = a if isinstance(a, Tensor) else _lift(a, b)
    return P.Add.apply(a, _lift(b, a))


def mul(a, b):
    a = a if isinstance(a, Tensor) else _lift(a, b)
    return P.Mul.apply(a, _lift(b, a))


def neg(a):
    return P.Neg.apply(a)


def sub(a, b):
    a = a if isinstance(a, Tensor) else _lift(a, b)
    return add(a, neg(_lift(b, a)))


def div(a, b):
    a = a if isinstance(a, Tensor) else _lift(a, b)
    if not isinstance(b, Tensor):
        return mul(a, 1.0 / b)
    return mul(a, pow(b, -1.0))


def pow(a, exponent):
    a = a if isinstance(a, Tensor) else _lift(a, exponent)
    if isinstance(exponent, Tensor):
        return exp(mul(exponent, log(a)))  # a ** b = exp(b log a), for a > 0
    return P.Pow.apply(a, exponent=exponent)


def matmul(a, b):
    return P.MatMul.apply(a, b)


def exp(a):
    return P.Exp.apply(a)


def log(a):
    return P.Log.apply(a)


def sqrt(a):
    return pow(a, 0.5)


def tanh(a):
    return P.Tanh.apply(a)


def sigmoid(a):
    return P.Sigmoid.apply(a)


def relu(a):
    return P.Relu.apply(a)


def cast(a, dtype):
    """``a`` as ``dtype`` (``Tensor.astype``); a cast to an integer dtype carries no gradient."""
    return P.Cast.apply(a, dtype=np.dtype(dtype))


def gelu(a):
    """GELU with the tanh approximation, as GPT-2 and torch's gelu(approximate="tanh")."""
    return N.Gelu.apply(a)


def where(cond, a, b):
    """Elementwise ``a`` where ``cond`` is true, else ``b`` (numbers allowed for a or b)."""
    like = a if isinstance(a, Tensor) else b
    cond = cond if isinstance(cond, Tensor) else Tensor(like.xp.asarray(cond))
    return P.Where.apply(cond, _lift(a, like), _lift(b, like))


def masked_fill(x, mask, value):
    """``x`` with ``value`` where ``mask`` is true."""
    return where(mask, value, x)


# -- reductions ------------------------------------------------------------------------------
def sum(x, axis=None, keepdims=False):
    return P.Sum.apply(x, axis=axis, keepdims=keepdims)


def _count(x, axis):
    axes = P._norm_axis(axis, x.ndim)
    return int(np.prod([x.shape[i] for i in axes])) if axes else 1


def mean(x, axis=None, keepdims=False):
    n = _count(x, axis)
    return mul(sum(x, axis, keepdims), 1.0 / n if n else float("nan"))


def max(x, axis=None, keepdims=False):
    return P.Max.apply(x, axis=axis, keepdims=keepdims)


def var(x, axis=None, keepdims=False, correction=1):
    """Variance; ``correction=1`` (the default, as in PyTorch) divides by n - 1."""
    d = sub(x, mean(x, axis, keepdims=True))
    n = _count(x, axis) - correction
    return mul(sum(mul(d, d), axis, keepdims), 1.0 / n if n > 0 else float("nan"))


# -- shapes ---------------------------------------------------------------------------------------
def reshape(x, *shape):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return P.Reshape.apply(x, shape=tuple(shape))


def permute(x, *axes):
    axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    return P.Permute.apply(x, axes=tuple(axes))


def transpose(x, dim0=-2, dim1=-1):
    axes = list(range(x.ndim))
    axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
    return permute(x, axes)


def getitem(x, index):
    return P.GetItem.apply(x, index=_unlift_index(index))


def cat(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: needs at least one tensor")
    return P.Cat.apply(*tensors, axis=axis)


def stack(tensors, axis=0):
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: needs at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"stack: all tensors need the same shape, got {sorted(shapes)}")
    ndim = tensors[0].ndim + 1
    axis = axis % ndim
    expanded = [reshape(t, t.shape[:axis] + (1,) + t.shape[axis:]) for t in tensors]
    return cat(expanded, axis=axis)


def split(x, split_size_or_sections, axis=0):
    """Pieces of ``x`` along ``axis``: equal chunks of an int size, or the given sizes."""
    n = x.shape[axis]
    if isinstance(split_size_or_sections, int):
        if split_size_or_sections <= 0:
            raise ValueError(f"split size must be positive, got {split_size_or_sections}")
        sizes = [split_size_or_sections] * (n // split_size_or_sections)
        if n % split_size_or_sections:
            sizes.append(n % split_size_or_sections)
    else:
        sizes = list(split_size_or_sections)
        if builtins.sum(sizes) != n:  # the module's own sum is the tensor one
            raise ValueError(f"split sizes {sizes} do not add up to {n} (axis {axis} of {x.shape})")
    pieces, start = [], 0
    lead = (slice(None),) * (axis % x.ndim)
    for size in sizes:
        pieces.append(getitem(x, lead + (slice(start, start + size),)))
        start += size
    return tuple(pieces)


# -- neural-network functions -------------------------------------------------------------------
def softmax(x, axis=-1):
    return N.Softmax.apply(x, axis=axis)


def log_softmax(x, axis=-1):
    return N.LogSoftmax.apply(x, axis=axis)


def _class_indices(op, indices, like: Tensor, n_classes, ignore_index=None, shape=None) -> Tensor:
    """Integer indices as a Tensor on ``like``'s backend, checked once, here (``check_targets``).

    Host indices (a batch drawn by NumPy, a prompt) are checked on the host before they
    move, so a step on a GPU reads nothing back for them; a device tensor costs one read.
    """
    data = indices.data if isinstance(indices, Tensor) else indices
    if backend.xp_of(data) is np:
        data = np.asarray(data)
    if shape is not None and tuple(data.shape) != shape:
        raise ValueError(f"{op}: logits {like.shape} need targets of shape {shape}, got {tuple(data.shape)}")
    N.check_targets(op, data, n_classes, ignore_index)
    return indices if isinstance(indices, Tensor) else Tensor(like.xp.asarray(data))


def cross_entropy(logits, targets, ignore_index=-1):
    """Mean cross-entropy of logits (..., C) against integer targets (...)."""
    C = logits.shape[-1]
    targets = _class_indices("cross_entropy", targets, logits, C, ignore_index, shape=logits.shape[:-1])
    return N.CrossEntropy.apply(reshape(logits, -1, C), reshape(targets, -1), ignore_index=ignore_index)


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    params = [p for p in (weight, bias) if p is not None]
    return N.LayerNorm.apply(x, *params, eps=eps, has_weight=weight is not None, has_bias=bias is not None)


def rms_norm(x, weight=None, eps=1e-5):
    """x / sqrt(mean(x^2) + eps) over the last axis, times ``weight`` if given (fused)."""
    return M.RmsNorm.apply(x, *([weight] if weight is not None else []), eps=eps)


def relu_squared(x):
    """relu(x)^2, fused (the ReLU^2 MLP)."""
    return M.ReluSquared.apply(x)


def swiglu(h):
    """(..., 2H) [gate | up] -> (..., H): silu(gate) * up, fused."""
    return M.Swiglu.apply(h)


def qk_norm_rope(qkv, n_head, rope=None, qk_norm=True, eps=1e-5):
    """The packed projection (B, T, 3C) with each head's query and key RMS-normalised (``qk_norm``)
    and then rotated by RoPE (``rope`` = (cos, sin) tensors of (T, 1, hs/2) or (T, hs/2) angles),
    the values untouched; one fused op. See ``tinytensor.ops.modern.QkNormRope``."""
    return M.QkNormRope.apply(qkv, *(rope if rope is not None else ()), n_head=n_head, qk_norm=qk_norm, eps=eps)


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight (out_features, in_features)."""
    return N.Linear.apply(x, weight, *([bias] if bias is not None else []))


def quantized_linear(x, q, scale, bits, block, bias=None):
    """x @ W.T + bias with W the frozen weight ``tinytensor.ops.quant.quantize_blockwise`` stored
    as (q, scale): dequantized on the fly, no gradient for it."""
    return Q.QuantizedLinear.apply(x, *([bias] if bias is not None else []), q=q, scale=scale, bits=bits, block=block)


def lora_linear(x, weight, lora_A, lora_B, bias=None, scaling=1.0, dropout=0.0, training=True, quant=None):
    """x @ W.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T, fused (see ``tinytensor.ops.lora``).
    W is ``weight`` (a Tensor), or None with ``quant=(q, scale, bits, block)`` for a quantized base."""
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {dropout}")
    base = ([weight] if weight is not None else []) + ([bias] if bias is not None else [])
    return L.LoraLinear.apply(x, lora_A, lora_B, *base, scaling=scaling, p=dropout if training else 0.0,
                              has_weight=weight is not None, has_bias=bias is not None, quant=quant)


def embedding(idx, weight):
    """Rows of ``weight`` (V, C) for integer indices ``idx`` of any shape."""
    return N.Embedding.apply(_class_indices("embedding", idx, weight, weight.shape[0]), weight)


def dropout(x, p=0.5, training=True):
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    return N.Dropout.apply(x, p=p)


def scaled_dot_product_attention(q, k, v, causal=True, scale=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(hs), causal) v on (..., T, hs) tensors, fused."""
    return A.ScaledDotProductAttention.apply(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p)


def multi_head_attention(qkv, n_head, causal=True, dropout_p=0.0):
    """Self-attention of packed q, k, v projections (B, T, 3C) with n_head heads -> (B, T, C), fused."""
    return A.MultiHeadAttention.apply(qkv, n_head=n_head, causal=causal, dropout_p=dropout_p)


def cached_attention(qkv, keys, values, start, n_head):
    """Inference with a KV cache (records no graph): causal self-attention of the new tokens'
    packed projections ``qkv`` (B, T, 3C) over the ``start`` cached tokens in the arrays
    ``keys``/``values`` (B, H, capacity, hs) and themselves; their keys and values are
    written into the cache. Returns a (B, T, C) tensor."""
    if qkv.requires_grad:
        raise RuntimeError("cached attention is for inference: call the model under tt.no_grad() "
                           "(or without a cache to train)")
    return Tensor(A.cached_attention(qkv.data, keys, values, start, n_head))
