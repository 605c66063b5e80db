"""AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, as torch.optim.AdamW."""
from __future__ import annotations

import math

from .optimizer import Optimizer


class AdamW(Optimizer):
    """>>> opt = AdamW([{"params": decay, "weight_decay": 0.1},
    ...                 {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _check(self, group):
        super()._check(group)
        b1, b2 = group["betas"]
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"AdamW betas must be in [0, 1), got {group['betas']}")
        if group["eps"] < 0 or group["weight_decay"] < 0:
            raise ValueError(f"AdamW eps and weight_decay must be >= 0, got {group['eps']}, {group['weight_decay']}")

    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                xp = p.xp
                s = self.state.get(id(p))
                if s is None:
                    s = self.state[id(p)] = {"step": 0, "exp_avg": xp.zeros_like(p.data),
                                             "exp_avg_sq": xp.zeros_like(p.data)}
                s["step"] += 1
                t, m, v = s["step"], s["exp_avg"], s["exp_avg_sq"]
                if wd:
                    p.data *= 1 - lr * wd  # decoupled: decay the weights, not the gradient
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * (g * g)
                bias1, bias2 = 1 - b1 ** t, 1 - b2 ** t
                denom = xp.sqrt(v)
                denom *= 1 / math.sqrt(bias2)
                denom += eps
                p.data -= (lr / bias1) * (m / denom)
