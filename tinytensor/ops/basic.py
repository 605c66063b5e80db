"""The basic primitives: elementwise math, reductions, shapes, indexing, matmul.

Each primitive is one class with ``forward`` and ``backward`` side by side,
registered once in ``tensor.PRIMITIVES``. ``backward`` gets the gradient of the
output and returns one gradient per input (None where an input takes none).
Arrays only: ``xp`` is the inputs' array module (NumPy or CuPy).
``unbroadcast`` below is the one place broadcasting is undone: the binary ops
here and the attention ops (``ops.attention``) call it.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import xp_of
from ..tensor import Function, _is_float, register


def unbroadcast(grad, shape):
    """Sum ``grad`` back to ``shape``: the one place broadcasting is undone."""
    shape = tuple(shape)
    if tuple(grad.shape) == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def _check_broadcast(a, b):
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be broadcast together") from None


# -- elementwise binary ---------------------------------------------------------------
@register
class Add(Function):
    def forward(self, a, b):
        _check_broadcast(a, b)
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(g, self.shapes[1])


@register
class Mul(Function):
    def forward(self, a, b):
        _check_broadcast(a, b)
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        ga = unbroadcast(g * self.b, self.a.shape) if self.needs_grad[0] else None
        gb = unbroadcast(g * self.a, self.b.shape) if self.needs_grad[1] else None
        return ga, gb


@register
class Where(Function):
    """where(cond, a, b): cond is a boolean tensor and takes no gradient."""

    def forward(self, cond, a, b):
        if cond.dtype != bool:
            raise TypeError(f"condition must be a bool tensor, got {cond.dtype}")
        self.cond, self.shapes = cond, (a.shape, b.shape)
        return xp_of(a).where(cond, a, b)

    def backward(self, g):
        xp = xp_of(g)
        zero = xp.zeros((), g.dtype)
        return (None,
                unbroadcast(xp.where(self.cond, g, zero), self.shapes[0]),
                unbroadcast(xp.where(self.cond, zero, g), self.shapes[1]))


# -- elementwise unary -----------------------------------------------------------------
@register
class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return -g


@register
class Pow(Function):
    """a ** exponent for a Python-number exponent (tensor exponents go through exp/log)."""

    def forward(self, a, exponent):
        self.a, self.exponent = a, exponent
        return a ** exponent

    def backward(self, g):
        return g * (self.exponent * self.a ** (self.exponent - 1))


@register
class Exp(Function):
    def forward(self, a):
        self.out = xp_of(a).exp(a)  # keep the output: it is the derivative
        return self.out

    def backward(self, g):
        return g * self.out


@register
class Log(Function):
    def forward(self, a):
        self.a = a
        return xp_of(a).log(a)

    def backward(self, g):
        return g / self.a


@register
class Tanh(Function):
    def forward(self, a):
        self.out = xp_of(a).tanh(a)
        return self.out

    def backward(self, g):
        return g * (1 - self.out * self.out)


@register
class Sigmoid(Function):
    def forward(self, a):
        xp = xp_of(a)
        # 0.5 * (1 + tanh(a/2)) never overflows, unlike 1 / (1 + exp(-a))
        self.out = 0.5 * (1 + xp.tanh(0.5 * a))
        return self.out

    def backward(self, g):
        return g * self.out * (1 - self.out)


@register
class Relu(Function):
    def forward(self, a):
        self.mask = a > 0
        return a * self.mask

    def backward(self, g):
        return g * self.mask


@register
class Cast(Function):
    def forward(self, a, dtype):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return g.astype(self.dtype) if _is_float(self.dtype) else None


# -- reductions ----------------------------------------------------------------------------
def _norm_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for ax in axes:
        if not -ndim <= ax < max(ndim, 1):
            raise ValueError(f"axis {ax} is out of range for a tensor of {ndim} dims")
    return tuple(sorted(ax % ndim if ndim else 0 for ax in axes))


def _expand_reduced(g, shape, axes, keepdims):
    """Give a reduced gradient back its reduced axes (size 1) so it broadcasts."""
    if not keepdims and axes:
        g = g.reshape([1 if i in axes else n for i, n in enumerate(shape)])
    return g


@register
class Sum(Function):
    def forward(self, a, axis=None, keepdims=False):
        self.shape, self.axes, self.keepdims = a.shape, _norm_axis(axis, a.ndim), keepdims
        return a.sum(axis=self.axes, keepdims=keepdims)

    def backward(self, g):
        g = _expand_reduced(g, self.shape, self.axes, self.keepdims)
        return xp_of(g).broadcast_to(g, self.shape)


@register
class Max(Function):
    """Maximum over axes; ties share the gradient equally (as torch.amax)."""

    def forward(self, a, axis=None, keepdims=False):
        self.axes, self.keepdims = _norm_axis(axis, a.ndim), keepdims
        if a.size == 0:
            raise ValueError(f"max of an empty tensor of shape {tuple(a.shape)}")
        self.a = a
        self.out = a.max(axis=self.axes, keepdims=True)
        return self.out if keepdims else self.out.reshape(
            [n for i, n in enumerate(a.shape) if i not in self.axes])

    def backward(self, g):
        g = _expand_reduced(g, self.a.shape, self.axes, self.keepdims)
        mask = self.a == self.out
        return mask * (g / mask.sum(axis=self.axes, keepdims=True).astype(g.dtype))


# -- shapes and indexing ------------------------------------------------------------
@register
class Reshape(Function):
    def forward(self, a, shape):
        self.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"cannot reshape {tuple(a.shape)} ({a.size} elements) to {tuple(shape)}") from None

    def backward(self, g):
        return g.reshape(self.shape)


@register
class Permute(Function):
    def forward(self, a, axes):
        if sorted(ax % max(a.ndim, 1) for ax in axes) != list(range(a.ndim)):
            raise ValueError(f"permute axes {tuple(axes)} do not match a tensor of {a.ndim} dims")
        self.axes = tuple(ax % a.ndim for ax in axes)
        return a.transpose(self.axes)

    def backward(self, g):
        return g.transpose(np.argsort(self.axes))


def _is_basic_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (int, np.integer, slice)) or i is None or i is Ellipsis for i in items)


@register
class GetItem(Function):
    """a[index] for ints, slices, None, Ellipsis and integer/bool arrays."""

    def forward(self, a, index):
        self.shape, self.dtype, self.index = a.shape, a.dtype, index
        return a[index]

    def backward(self, g):
        xp = xp_of(g)
        out = xp.zeros(self.shape, self.dtype)
        if _is_basic_index(self.index):
            out[self.index] = g  # views never overlap: plain assignment
        else:
            backend.add_at(out, self.index, g)  # repeated indices must add up
        return out


@register
class Cat(Function):
    def forward(self, *arrays, axis=0):
        xp = xp_of(arrays[0])
        ndim = arrays[0].ndim
        if not -ndim <= axis < ndim:
            raise ValueError(f"axis {axis} out of range for {ndim}-d tensors")
        self.axis = axis % ndim
        self.sizes = np.cumsum([a.shape[self.axis] for a in arrays])[:-1]
        return xp.concatenate(arrays, axis=self.axis)

    def backward(self, g):
        return tuple(xp_of(g).split(g, self.sizes, axis=self.axis))


# -- matmul ----------------------------------------------------------------------------------
@register
class MatMul(Function):
    """a @ b with NumPy's rules: 1-d operands and broadcast batch dims."""

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError("matmul needs tensors of at least 1 dim; use * for scalars")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ValueError(f"inner dimensions differ: {tuple(a.shape)} @ {tuple(b.shape)}")
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        a, b = self.a, self.b
        # treat 1-d operands as matrices, then drop the added dims again
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        # b's dim first: for 1-d @ 1-d, g is 0-d and g[..., None, :] would fail
        if b.ndim == 1:
            g = g[..., None]
        if a.ndim == 1:
            g = g[..., None, :]
        ga = gb = None
        if self.needs_grad[0]:
            ga = unbroadcast(g @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if self.needs_grad[1]:
            gb = unbroadcast(a2.swapaxes(-1, -2) @ g, b2.shape).reshape(b.shape)
        return ga, gb
