"""Optimizer base: parameter groups and a state dict that resumes exactly."""
from __future__ import annotations

import copy

from .. import backend


class Optimizer:
    """Holds parameter groups (dicts with "params" and hyperparameters) and
    per-parameter state (dicts of arrays and counters); ``state_names``: the entries of one
    parameter's state, which a loaded state must hold exactly."""

    state_names: tuple = ()

    def __init__(self, params, defaults: dict):
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.defaults = dict(defaults)
        self.param_groups = []
        seen = set()
        for g in groups:
            group = {**self.defaults, **g, "params": list(g["params"])}
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"{type(self).__name__}: a parameter appears in more than one group")
                if not p.requires_grad:
                    raise ValueError(f"{type(self).__name__}: parameter of shape {p.shape} does not require grad")
                seen.add(id(p))
            self._check(group)
            self.param_groups.append(group)
        self.state: dict = {}  # id(param) -> per-parameter state

    def _check(self, group):
        if group["lr"] < 0:
            raise ValueError(f"learning rate must be >= 0, got {group['lr']}")

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}; arrays are copies."""
        index = {id(p): i for i, p in enumerate(self._params())}
        state = {index[k]: {n: (v.copy() if hasattr(v, "copy") else v) for n, v in s.items()}
                 for k, s in self.state.items() if k in index}
        groups = [{**{k: v for k, v in g.items() if k != "params"},
                   "params": [index[id(p)] for p in g["params"]]} for g in self.param_groups]
        return {"state": state, "param_groups": copy.deepcopy(groups)}

    def load_state_dict(self, state_dict: dict):
        params = self._params()
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(own["params"]) for g, own in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict does not match this optimizer's parameter groups "
                             f"(saved sizes {[len(g['params']) for g in groups]}, "
                             f"here {[len(g['params']) for g in self.param_groups]})")
        for g, own in zip(groups, self.param_groups):
            own.update({k: v for k, v in g.items() if k != "params"})
            self._check(own)  # a saved group is checked like a new one (e.g. Muon's ns_steps bounds the work)
        self.state = {}
        for i, s in state_dict["state"].items():
            p = params[int(i)]
            if self.state_names and set(s) != set(self.state_names):
                raise ValueError(f"{type(self).__name__} state for parameter {i} holds {sorted(s)}; expected "
                                 f"{sorted(self.state_names)}")
            loaded = {}
            for n, v in s.items():
                if hasattr(v, "shape") and getattr(v, "ndim", 0) > 0:
                    if tuple(v.shape) != p.shape:
                        raise ValueError(f"optimizer state {n!r} for parameter {i} has shape {tuple(v.shape)}, "
                                         f"parameter has {p.shape}")
                    v = backend.to_backend(v, p.backend).astype(p.dtype, copy=True)
                loaded[n] = v
            self.state[id(p)] = loaded
