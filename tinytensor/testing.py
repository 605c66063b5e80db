"""The one gradient checker: backprop against float64 central differences.

>>> import numpy as np, tinytensor as tt
>>> tt.testing.check_grad(lambda x: (x * x).sum(), np.random.randn(3, 4))
"""
from __future__ import annotations

import numpy as np

from . import backend
from .tensor import Function, Tensor, no_grad


class _WeightedSum(Function):
    """sum_k <u_k, out_k>: lets several outputs share one backward (not a registered primitive)."""

    name = "weighted_sum"

    def forward(self, *arrays, weights):
        self.weights = weights
        return backend.xp_of(arrays[0]).asarray(sum((a * w).sum() for a, w in zip(arrays, weights)))

    def backward(self, g):
        return tuple((g * w).astype(w.dtype) for w in self.weights)


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check_grad(fn, *inputs, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0, backend_name="numpy"):
    """Check the gradient of ``fn`` at ``inputs`` along random directions.

    ``fn`` takes Tensors and returns a Tensor (any shape) or a tuple of them.
    Floating inputs become float64 Tensors that require grad; integer arrays and
    other values pass through unchanged. For each float input ``x_i`` and a random
    direction ``d`` and output weighting ``u``, the directional derivative of
    ``sum(u * fn(x))`` from backprop must equal
    ``(f(x + eps d) - f(x - eps d)) / (2 eps)``. On failure an AssertionError
    prints the inputs, the direction and both numbers.
    """
    rng = np.random.default_rng(seed)
    xp = backend.get_xp(backend_name)
    arrays = []
    for x in inputs:
        if isinstance(x, Tensor):
            x = backend.to_numpy(x.data)
        if isinstance(x, (np.ndarray, float)) and np.issubdtype(np.asarray(x).dtype, np.floating):
            arrays.append(np.asarray(x, dtype=np.float64))
        else:
            arrays.append(x)
    float_idx = [i for i, a in enumerate(arrays) if isinstance(a, np.ndarray) and a.dtype == np.float64]

    def to_tensors(values, grad):
        out = []
        for i, a in enumerate(values):
            if isinstance(a, np.ndarray):
                out.append(Tensor(xp.asarray(a), requires_grad=grad and i in float_idx))
            else:
                out.append(a)
        return out

    tensors = to_tensors(arrays, grad=True)
    outs = _as_list(fn(*tensors))
    weights = [rng.standard_normal(o.shape) for o in outs]

    def weighted(outputs):  # sum_k <u_k, out_k> as a float, from arrays
        return float(sum(np.sum(backend.to_numpy(o.data) * u) for o, u in zip(_as_list(outputs), weights)))

    live = [(o, u) for o, u in zip(outs, weights) if o.requires_grad]
    if live:
        # one backward from all outputs together: outputs may share a graph, and a
        # second backward through it would raise (the first one frees it)
        _WeightedSum.apply(*[o for o, _ in live],
                           weights=[xp.asarray(u, dtype=o.dtype) for o, u in live]).backward()
    for i in float_idx:
        t = tensors[i]
        grad = np.zeros_like(arrays[i]) if t.grad is None else backend.to_numpy(t.grad)
        if grad.shape != arrays[i].shape or grad.dtype != arrays[i].dtype:
            raise AssertionError(f"gradient of input {i} has shape {grad.shape} {grad.dtype}, "
                                 f"input has {arrays[i].shape} {arrays[i].dtype}")
        d = rng.standard_normal(arrays[i].shape)
        analytic = float(np.sum(grad * d))
        with no_grad():
            plus, minus = list(arrays), list(arrays)
            # np.asarray: for a 0-d input, array + float is a NumPy scalar, not an array
            plus[i] = np.asarray(arrays[i] + eps * d)
            minus[i] = np.asarray(arrays[i] - eps * d)
            numeric = (weighted(fn(*to_tensors(plus, False))) - weighted(fn(*to_tensors(minus, False)))) / (2 * eps)
        if not abs(analytic - numeric) <= atol + rtol * abs(numeric):
            raise AssertionError(
                f"gradient check failed for input {i}:\n"
                f"  backprop  d/dt f(x + t d) = {analytic!r}\n"
                f"  numerical d/dt f(x + t d) = {numeric!r}\n"
                f"  inputs = {arrays!r}\n  direction = {d!r}\n  output weights = {weights!r}")
