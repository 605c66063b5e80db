"""Gradient checkpointing: keep a function's inputs, not its activations, and recompute its
forward during backward.

>>> import numpy as np, tinytensor as tt
>>> w = tt.tensor(np.ones((3, 3), np.float32), requires_grad=True)
>>> x = tt.tensor(np.ones((2, 3), np.float32), requires_grad=True)
>>> y = tt.checkpoint(lambda a: (a @ w).tanh(), x)   # no intermediate of the lambda is kept
>>> y.sum().backward(); x.grad.shape, w.grad.shape
((2, 3), (3, 3))

A transformer block checkpointed this way keeps only its input (B, T, C) between forward and
backward; its attention weights, MLP hidden layer and norms are rebuilt one block at a time in
backward, which costs one more forward of the block. Dropout inside ``fn`` draws the very same
masks again: tinytensor's generator state is saved before the forward and replayed for the
recomputation (then put back, so the draws after it are those of a run without checkpointing).
"""
from __future__ import annotations

from . import backend
from .tensor import Function, Tensor, enable_grad, is_grad_enabled


class _Checkpoint(Function):
    """The recorded node: its parents are the inputs of ``fn``; the parameters ``fn`` uses get
    their gradients straight from the inner backward (they are leaves: it accumulates into
    their ``.grad``), so they need not be named. Not a registered primitive: it computes
    nothing itself, and its gradient is that of whatever ``fn`` is built from."""

    name = "checkpoint"

    def backward(self, grad):
        inputs = [Tensor._wrap(t.data, requires_grad=t.requires_grad) for t in self.parents]
        after = backend.get_rng_state()
        backend.set_rng_state(self.rng_state)  # the forward's dropout masks, drawn again
        try:
            with enable_grad():
                out = self.fn(*inputs, **self.kwargs)
        finally:
            backend.set_rng_state(after)
        self.fn = self.kwargs = None
        if out.requires_grad:
            out.backward(grad)  # parameters' gradients accumulate into their .grad here
        return tuple(t.grad if t.requires_grad else None for t in inputs)


def checkpoint(fn, *inputs: Tensor, **kwargs) -> Tensor:
    """``fn(*inputs, **kwargs)`` (one Tensor out) without keeping its intermediate results for
    backward: they are recomputed there. Gradients are those of ``fn(*inputs)`` exactly.

    ``fn`` must be deterministic given tinytensor's generator (dropout is: its state is replayed)
    and must not change anything outside itself. ``kwargs`` are passed through untouched
    (non-Tensor arguments, e.g. a layer index).
    """
    if not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("checkpoint: inputs must be Tensors (pass other arguments as keywords), got "
                        + ", ".join(type(t).__name__ for t in inputs))
    if not is_grad_enabled():  # nothing will run backward: a plain call
        return fn(*inputs, **kwargs)
    rng_state = backend.get_rng_state()
    detached = [Tensor._wrap(t.data, requires_grad=t.requires_grad) for t in inputs]
    # run with the graph recorded, so that the output says whether anything inside (the inputs
    # or parameters of fn) wants a gradient; the graph is dropped on return, one fn at a time,
    # so at most one fn's activations are alive at once
    out = fn(*detached, **kwargs)
    if not isinstance(out, Tensor):
        raise TypeError(f"checkpoint: fn must return one Tensor, got {type(out).__name__}")
    if not out.requires_grad:
        return out
    node = _Checkpoint()
    node.parents, node.needs_grad = inputs, tuple(t.requires_grad for t in inputs)
    node.fn, node.kwargs, node.rng_state = fn, kwargs, rng_state
    result = Tensor._wrap(out.data, requires_grad=True)
    result._ctx = node
    return result
