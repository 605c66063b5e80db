"""Gradient utilities."""
from __future__ import annotations

import math

from ..backend import xp_of


def global_grad_norm(parameters) -> float:
    """The L2 norm of all the gradients together (0.0 without any); Inf or NaN when one holds
    Inf or NaN (mixed precision skips such a step)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    xp = xp_of(grads[0])
    # one reduction per tensor, summed in float64 on the device (a float, not a float32 rounding
    # of it) and read back once: on a GPU every read waits for all queued work, so not one per tensor
    squares = xp.stack([xp.vdot(g.ravel(), g.ravel()) for g in grads]).astype(xp.float64)
    return math.sqrt(float(squares.sum()))


def clip_grad_norm_(parameters, max_norm: float, eps: float = 1e-6, norm: float | None = None) -> float:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``.

    Returns the norm before clipping (as torch.nn.utils.clip_grad_norm_). ``norm``: that norm
    when the caller has it already (``global_grad_norm``), which saves reading it back again.
    """
    parameters = list(parameters)
    total = global_grad_norm(parameters) if norm is None else norm
    grads = [p.grad for p in parameters if p.grad is not None]
    coef = max_norm / (total + eps)
    if coef < 1.0:
        for g in grads:
            g *= g.dtype.type(coef)
    return total
