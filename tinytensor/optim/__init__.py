"""Optimizers and learning-rate schedules."""
from .adamw import AdamW
from .lr_scheduler import WarmupCosine, warmup_cosine_lr
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["AdamW", "SGD", "Optimizer", "WarmupCosine", "warmup_cosine_lr"]
