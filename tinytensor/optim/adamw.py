"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, as torch.optim.AdamW."""
from __future__ import annotations

import math

import numpy as np

from .. import kernels
from .optimizer import Optimizer


class AdamW(Optimizer):
    """>>> opt = AdamW([{"params": decay, "weight_decay": 0.1},
    ...                 {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))

    Each group's parameters and moments live in flat buffers (the parameters'
    ``.data`` become views into theirs), so a step is a dozen vectorised passes
    per group instead of a dozen per tensor. ``state`` still holds per-parameter
    entries (views into the buffers), so ``state_dict`` is the usual one.
    """

    state_names = ("step", "exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._flat = {}  # group index -> flat buffers

    def _check(self, group):
        super()._check(group)
        b1, b2 = group["betas"]
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"AdamW betas must be in [0, 1), got {group['betas']}")
        if group["eps"] < 0 or group["weight_decay"] < 0:
            raise ValueError(f"AdamW eps and weight_decay must be >= 0, got {group['eps']}, {group['weight_decay']}")

    def step(self):
        for index, group in enumerate(self.param_groups):
            flat = self._flat_buffers(index, group)
            if flat is not None:
                self._step_flat(group, flat)
            else:  # mixed dtypes/backends, missing grads or unequal step counts
                for p in group["params"]:
                    if p.grad is not None:
                        self._step_one(group, p)

    def _step_one(self, group, p):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        g, xp = p.grad, p.xp
        s = self.state.get(id(p))
        if s is None:
            s = self.state[id(p)] = {"step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}
        s["step"] += 1
        t, m, v = s["step"], s["exp_avg"], s["exp_avg_sq"]
        if wd:
            p.data *= 1 - lr * wd  # decoupled: decay the weights, not the gradient
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        denom = xp.sqrt(v)
        denom *= 1 / math.sqrt(1 - b2 ** t)
        denom += eps
        p.data -= (lr / (1 - b1 ** t)) * (m / denom)

    def _flat_buffers(self, index, group):
        """The group's flat buffers, (re)built when parameters or state were replaced
        (``Module.to``, ``load_state_dict``); None when the flat path does not apply."""
        params = group["params"]
        steps = {self.state.get(id(p), {}).get("step", 0) for p in params}
        if len(steps) != 1 or any(p.grad is None for p in params):
            return None  # every parameter must take this step, with one bias correction
        flat = self._flat.get(index)
        if flat is not None and all(p.data is pv and self.state.get(id(p), {}).get("exp_avg") is mv
                                    for p, pv, mv in zip(params, flat["p_views"], flat["m_views"])):
            return flat
        xp, dtype = params[0].xp, params[0].dtype
        if any(p.xp is not xp or p.dtype != dtype for p in params):
            return None
        (step,) = steps
        n = sum(p.size for p in params)
        flat = {"p": xp.empty(n, dtype), "m": xp.zeros(n, dtype), "v": xp.zeros(n, dtype),
                "g": xp.empty(n, dtype), "tmp": xp.empty(n, dtype), "p_views": [], "m_views": [], "slices": []}
        offset = 0
        for p in params:
            sl = slice(offset, offset + p.size)
            offset += p.size
            flat["p"][sl] = p.data.ravel()
            p.data = flat["p"][sl].reshape(p.shape)
            old = self.state.get(id(p))
            if old is not None:
                flat["m"][sl], flat["v"][sl] = old["exp_avg"].ravel(), old["exp_avg_sq"].ravel()
            self.state[id(p)] = {"step": step, "exp_avg": flat["m"][sl].reshape(p.shape),
                                 "exp_avg_sq": flat["v"][sl].reshape(p.shape)}
            flat["p_views"].append(p.data)
            flat["m_views"].append(self.state[id(p)]["exp_avg"])
            flat["slices"].append(sl)
        self._flat[index] = flat
        return flat

    def _step_flat(self, group, flat):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        xp = group["params"][0].xp
        P, M, V, G, T = flat["p"], flat["m"], flat["v"], flat["g"], flat["tmp"]
        for p, sl in zip(group["params"], flat["slices"]):
            G[sl] = p.grad.ravel()
            self.state[id(p)]["step"] += 1
        t = self.state[id(group["params"][0])]["step"]
        k = kernels.for_arrays(P, G, M, V)
        if k is not None:  # one fused pass over the four buffers
            f = np.float32
            k.adamw_step(P, G, M, V, f(lr), f(b1), f(b2), f(eps), f(wd), f(1 - b1 ** t), f(math.sqrt(1 - b2 ** t)))
            return
        if wd:
            P *= 1 - lr * wd  # decoupled: decay the weights, not the gradient
        xp.multiply(G, 1 - b1, out=T)
        M *= b1
        M += T
        xp.multiply(G, G, out=T)
        T *= 1 - b2
        V *= b2
        V += T
        xp.sqrt(V, out=T)
        T *= 1 / math.sqrt(1 - b2 ** t)
        T += eps
        xp.divide(M, T, out=T)
        T *= lr / (1 - b1 ** t)
        P -= T
