"""SGD with momentum and (coupled) weight decay, as torch.optim.SGD."""
from __future__ import annotations

from .optimizer import Optimizer


class SGD(Optimizer):
    state_names = ("momentum_buffer",)

    def __init__(self, params, lr=1e-2, momentum=0.0, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad + wd * p.data if wd else p.grad
                if mu:
                    s = self.state.setdefault(id(p), {})
                    if "momentum_buffer" not in s:
                        s["momentum_buffer"] = g.copy()  # torch: the first step takes the raw gradient
                    else:
                        s["momentum_buffer"] *= mu
                        s["momentum_buffer"] += g
                    g = s["momentum_buffer"]
                p.data -= lr * g
