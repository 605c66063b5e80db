"""Optimizers and learning-rate schedules."""
from .adamw import AdamW
from .lr_scheduler import WarmupCosine, warmup_cosine_lr
from .mixed_precision import COMPUTE_DTYPES, LossScaler, MixedPrecision, resolve_dtype
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["AdamW", "SGD", "Optimizer", "WarmupCosine", "warmup_cosine_lr", "COMPUTE_DTYPES", "LossScaler",
           "MixedPrecision", "resolve_dtype"]
