"""Module: a tree of named parameters and submodules, with state dicts.

>>> import tinytensor as tt
>>> class MLP(tt.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.fc1, self.fc2 = tt.nn.Linear(2, 8), tt.nn.Linear(8, 1)
...     def forward(self, x):
...         return self.fc2(self.fc1(x).relu())
>>> sorted(MLP().state_dict())
['fc1.bias', 'fc1.weight', 'fc2.bias', 'fc2.weight']
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module owns and an optimizer updates (requires grad)."""

    __slots__ = ()

    def __init__(self, data, requires_grad: bool = True):
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, backend={self.backend})"


class Module:
    """Base class: assign Parameters and Modules as attributes; define ``forward``."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- traversal -----------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, module in self._modules.items():
            yield from module.named_modules(f"{prefix}{name}.")

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_parameters(self):
        """(name, Parameter) pairs, each parameter once even when shared (tied weights)."""
        seen = set()
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield prefix + name, p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters()))

    # -- modes and grads ---------------------------------------------------------
    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, backend_name: str):
        """Move every parameter to a backend ("numpy" or "cupy"), in place."""
        for p in self.parameters():
            p.data = backend.to_backend(p.data, backend_name)
            p.grad = None if p.grad is None else backend.to_backend(p.grad, backend_name)
        return self

    # -- state dicts ---------------------------------------------------------------
    def state_dict(self) -> "OrderedDict[str, object]":
        """name -> parameter array (the live arrays, not copies). Tied weights appear
        under every name that uses them, as in PyTorch."""
        out = OrderedDict()
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                out[prefix + name] = p.data
        return out

    def load_state_dict(self, state: dict, strict: bool = True):
        """Copy arrays into the parameters (in place). With ``strict``, missing or
        unexpected names are an error; a shape mismatch is always one."""
        own = self.state_dict()
        params = {}
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                params[prefix + name] = p
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {missing}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        for k, v in state.items():
            if k in params and tuple(v.shape) != params[k].shape:
                problems.append(f"shape mismatch for {k}: checkpoint {tuple(v.shape)} vs model {params[k].shape}")
        if problems:
            raise KeyError(f"load_state_dict into {type(self).__name__}: " + "; ".join(problems))
        for k, v in state.items():
            if k in params:
                p = params[k]
                p.data[...] = backend.to_backend(np.asarray(v) if isinstance(v, (list, tuple)) else v,
                                                 p.backend).astype(p.dtype, copy=False)
        return {"missing_keys": missing, "unexpected_keys": unexpected}

    def __repr__(self):
        lines = [f"{type(self).__name__}("]
        for name, m in self._modules.items():
            lines.append("  (" + name + "): " + repr(m).replace("\n", "\n  "))
        return "\n".join(lines) + ")" if len(lines) > 1 else f"{type(self).__name__}()"
