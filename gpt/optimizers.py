"""The run's optimizer: which parameters go to which optimizer, and whether a saved
optimizer state belongs to it (on --resume).

>>> opt = build_optimizer(model, cfg)   # doctest: +SKIP
"""
from __future__ import annotations

import tinytensor as tt

from . import config as C
from .config import UsageError


def build_optimizer(model, cfg: C.TrainConfig):
    """The run's optimizer (--optimizer): AdamW from the model's ``configure_optimizers``, or Muon on
    the blocks' 2-D weights (attention and MLP matrices) beside AdamW on every other parameter
    (embeddings and head with weight decay, gains and biases without), as one ``Combined``.

    >>> opt = build_optimizer(model, cfg)   # doctest: +SKIP
    """
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        return model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, betas)
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    hidden = [p for p in blocks.parameters() if p.ndim == 2 and p.requires_grad] if blocks is not None else []
    if not hidden:
        raise UsageError(f"--optimizer muon needs hidden matrices (--model gpt); the {cfg.model} model has none")
    in_muon = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in in_muon and p.requires_grad]  # (LoRA: frozen base out)
    groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}]
    adamw = tt.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate, betas=betas)
    muon = tt.optim.Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay)
    return tt.optim.Combined([muon, adamw])


def same_hyperparameters(saved: dict, own: dict) -> bool:
    """A saved parameter group has this optimizer's hyperparameters, each of the same kind
    (a number, a flag, a tuple of as many numbers): a checkpoint must not set what we lack."""
    def kind(v):
        if isinstance(v, (list, tuple)):
            return "tuple", len(v)
        return ("flag" if isinstance(v, bool) else "number"), 0
    return set(saved) == set(own) and all(k == "params" or kind(saved[k]) == kind(own[k]) for k in own)
