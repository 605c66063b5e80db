"""tinytensor: a small reverse-mode autograd engine on NumPy and CuPy.

>>> import numpy as np, tinytensor as tt
>>> import tinytensor.functional as F
>>> x = tt.tensor(np.random.randn(4, 3).astype(np.float32), requires_grad=True)
>>> w = tt.randn(3, 5, requires_grad=True); b = tt.zeros(5, requires_grad=True)
>>> loss = F.cross_entropy(x @ w + b, tt.tensor(np.array([0, 1, 4, 2])))
>>> loss.backward(); x.grad.shape
(4, 3)
"""
from . import backend, functional, ops  # noqa: F401  (importing ops registers the primitives)
from .checkpointing import checkpoint
from .backend import BackendError, cupy_available, get_rng_state, manual_seed, set_rng_state
from .functional import cat, stack, where
from .tensor import (PRIMITIVES, Tensor, arange, enable_grad, full, is_grad_enabled, no_grad, ones, rand,
                     randn, tensor, zeros)
from . import kernels, memory, nn, optim, testing  # noqa: E402

__all__ = ["Tensor", "tensor", "zeros", "ones", "full", "randn", "rand", "arange", "no_grad", "enable_grad",
           "is_grad_enabled", "cat", "stack", "where", "manual_seed", "get_rng_state", "set_rng_state",
           "BackendError", "checkpoint", "cupy_available", "PRIMITIVES", "nn", "optim", "functional", "testing",
           "kernels", "memory"]
