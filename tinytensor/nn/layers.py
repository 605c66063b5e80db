"""The standard layers. Initialisation follows PyTorch's defaults, so a model
built here and one built in PyTorch start from the same distributions."""
from __future__ import annotations

import contextlib
import math

import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import DEFAULT_DTYPE
from .module import Module, Parameter


_skipping = [0]  # depth of skip_init() blocks


@contextlib.contextmanager
def skip_init():
    """Within it, Linear and Embedding allocate their weights uninitialised (``np.empty``: no random
    draw, and the memory is not touched until written): for a model whose weights are loaded right
    after (gpt.pretrained), so that loading does not first fill, and hold, a random copy.

    >>> with skip_init():
    ...     layer = Linear(4, 2)
    >>> layer.weight.shape
    (2, 4)
    """
    _skipping[0] += 1
    try:
        yield
    finally:
        _skipping[0] -= 1


def init_skipped() -> bool:
    """Whether a skip_init() block is active (a model's own initialisation checks it too)."""
    return _skipping[0] > 0


def _uniform(shape, bound):
    if init_skipped():
        return Parameter(np.empty(shape, DEFAULT_DTYPE))
    return Parameter(backend.rng().uniform(-bound, bound, shape).astype(DEFAULT_DTYPE))


class Linear(Module):
    """y = x @ weight.T + bias, weight (out_features, in_features) as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features) if in_features else 0.0
        self.in_features, self.out_features = in_features, out_features
        self.weight = _uniform((out_features, in_features), bound)
        self.bias = _uniform((out_features,), bound) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def __repr__(self):
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias is not None})"


class Embedding(Module):
    """A (num_embeddings, embedding_dim) table looked up by integer indices."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        shape = (num_embeddings, embedding_dim)
        self.weight = Parameter(np.empty(shape, DEFAULT_DTYPE) if init_skipped()
                                else backend.rng().standard_normal(shape).astype(DEFAULT_DTYPE))

    def forward(self, idx):
        return F.embedding(idx, self.weight)

    def __repr__(self):
        return f"Embedding{self.weight.shape}"


class LayerNorm(Module):
    def __init__(self, normalized_shape: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(np.ones(normalized_shape, DEFAULT_DTYPE))
        self.bias = Parameter(np.zeros(normalized_shape, DEFAULT_DTYPE)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def __repr__(self):
        return f"LayerNorm({self.weight.shape[0]}, eps={self.eps})"


class Dropout(Module):
    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def __repr__(self):
        return f"Dropout(p={self.p})"


class ReLU(Module):
    def forward(self, x):
        return F.relu(x)


class GELU(Module):
    def forward(self, x):
        return F.gelu(x)


class ModuleList(Module):
    """A list of modules, registered under the names "0", "1", ..."""

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class Sequential(ModuleList):
    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x
