"""Optimizers and learning-rate schedules."""
from .adamw import AdamW
from .lr_scheduler import WarmupCosine, warmup_cosine_lr, warmup_stable_decay_lr
from .muon import Combined, Muon, newton_schulz
from .mixed_precision import COMPUTE_DTYPES, LossScaler, MixedPrecision, resolve_dtype
from .optimizer import Optimizer
from .sgd import SGD

__all__ = ["AdamW", "SGD", "Muon", "Combined", "newton_schulz", "Optimizer", "WarmupCosine", "warmup_cosine_lr",
           "warmup_stable_decay_lr", "COMPUTE_DTYPES", "LossScaler", "MixedPrecision", "resolve_dtype"]
