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


def warmup_stable_decay_lr(step: int, lr: float, warmup: int, total: int, decay_frac: float, min_lr: float) -> float:
    """Linear warmup to ``lr`` (as ``warmup_cosine_lr``'s), constant, then a linear decay over the last
    ``decay_frac`` of ``total`` steps, reaching ``min_lr`` at ``total`` (and staying there).

    >>> [round(warmup_stable_decay_lr(s, 1.0, 1, 10, 0.2, 0.0), 2) for s in (0, 1, 7, 8, 9, 10)]
    [0.5, 1.0, 1.0, 1.0, 0.5, 0.0]
    """
    if step < warmup:
        return lr * (step + 1) / (warmup + 1)
    if step >= total:
        return min_lr
    decay_start = max(warmup, total - round(decay_frac * total))
    if step < decay_start:
        return lr
    return min_lr + (lr - min_lr) * (total - step) / (total - decay_start)
