"""Learning-rate schedules."""
from __future__ import annotations

import math


def warmup_cosine_lr(step: int, max_lr: float, warmup_steps: int, decay_steps: int, min_lr: float) -> float:
    """Linear warmup to ``max_lr``, then cosine decay to ``min_lr`` at ``decay_steps``.

    Same curve as nanoGPT's ``get_lr`` (warmup reaches max_lr at step warmup_steps).
    >>> warmup_cosine_lr(0, 1e-3, 100, 5000, 1e-4) < warmup_cosine_lr(99, 1e-3, 100, 5000, 1e-4)
    True
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


class WarmupCosine:
    """Sets every group's lr from ``warmup_cosine_lr``, scaled by that group's initial lr."""

    def __init__(self, optimizer, warmup_steps: int, decay_steps: int, min_lr_ratio: float = 0.1):
        self.optimizer, self.warmup_steps, self.decay_steps = optimizer, warmup_steps, decay_steps
        self.min_lr_ratio = min_lr_ratio
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.last_step = -1
        self.step()

    def step(self):
        self.last_step += 1
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = warmup_cosine_lr(self.last_step, base, self.warmup_steps, self.decay_steps,
                                           base * self.min_lr_ratio)
        return self.optimizer.param_groups[0]["lr"]
