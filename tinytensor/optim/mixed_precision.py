"""Mixed precision: compute in float16 or bfloat16, keep float32 master weights.

The model the optimizer owns stays float32 (its master weights: AdamW's moments and
updates are float32, and so is what a checkpoint saves). ``MixedPrecision`` holds a
copy of it in the low-precision dtype for the forward and backward passes, and the
three casts between the two:

* forward/backward: on the copy, in the low dtype (the fused softmax, layer_norm and
  cross_entropy reduce in float32 inside and return the low dtype, see ``ops.fused``);
  the loss's gradient is seeded with the loss scale instead of 1;
* ``unscale_grads``: each low-precision gradient is cast to float32 and divided by the
  scale there, into the master parameter's ``.grad``;
* ``refresh``: after an optimizer step, the masters are cast back into the copy.

>>> mp = MixedPrecision(model, "float16")  # model: float32, opt = AdamW(model.parameters())  # doctest: +SKIP
>>> _, loss = mp.model(x, y); loss.backward(mp.scaler.seed(loss))       # doctest: +SKIP
>>> mp.unscale_grads(); finite = math.isfinite(nn.utils.global_grad_norm(model.parameters()))  # doctest: +SKIP
>>> mp.scaler.update(finite)                                            # doctest: +SKIP
>>> if finite: opt.step(); mp.refresh()                                 # doctest: +SKIP

``gpt.trainer.train_step`` is this loop with gradient accumulation and clipping.
"""
from __future__ import annotations

import copy

import numpy as np

from .. import backend
from ..nn.module import Parameter

# the --dtype choices; float32 is the plain run (no copy, no scaling)
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(name: str, backend_name: str = "numpy") -> np.dtype:
    """The NumPy dtype of a ``COMPUTE_DTYPES`` name; bfloat16 comes from ml_dtypes.

    >>> resolve_dtype("float16")
    dtype('float16')
    """
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    if name != "bfloat16":
        return np.dtype(name)
    if backend_name != "numpy":
        raise backend.BackendError(f"--dtype bfloat16 is not available on {backend_name} (CuPy has no bfloat16 "
                                   "arrays); use --dtype float16")
    try:
        import ml_dtypes
    except ImportError:
        raise backend.BackendError("--dtype bfloat16 needs the ml_dtypes package: pip install ml_dtypes "
                                   "(or the extra: pip install 'tinytensor[bf16]')") from None
    return np.dtype(ml_dtypes.bfloat16)


class LossScaler:
    """Dynamic loss scaling: the loss's gradient is multiplied by ``scale`` so that small
    gradients do not flush to zero in float16; a step whose gradients hold Inf/NaN is
    skipped and the scale halved, and after ``growth_interval`` good steps in a row the
    scale doubles (PyTorch's GradScaler rule).

    >>> s = LossScaler(init_scale=8.0, growth_interval=2)
    >>> s.update(False); s.scale
    4.0
    >>> s.update(True); s.update(True); s.scale, s.good_steps
    (8.0, 0)
    """

    # 2**15, not GradScaler's 2**16: our loss is float16 itself, so its gradient seed (the scale)
    # must be a float16 number (at most 65504)
    def __init__(self, init_scale: float = 2.0 ** 15, growth_interval: int = 2000, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5):
        self.scale, self.good_steps = float(init_scale), 0
        self.growth_interval, self.growth_factor, self.backoff_factor = growth_interval, growth_factor, backoff_factor

    def seed(self, loss, divide_by: int = 1):
        """The gradient to start ``loss.backward`` from: scale / divide_by, in the loss's dtype."""
        return loss.xp.full(loss.shape, self.scale / divide_by, dtype=loss.dtype)

    def update(self, finite: bool) -> None:
        if not finite:
            # powers of two: scaling and unscaling are exact; never below 2**-24, float16's smallest number
            self.scale, self.good_steps = max(self.scale * self.backoff_factor, 2.0 ** -24), 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale, self.good_steps = self.scale * self.growth_factor, 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def low_precision_copy(model, dtype):
    """A copy of ``model`` (any Module) whose parameters are ``dtype`` copies of its own;
    tied parameters stay tied. Nothing random is drawn (the run's RNG is untouched)."""
    # deepcopy with the parameters pre-mapped: the module tree is copied, the arrays are cast once
    memo = {id(p): Parameter(p.data.astype(dtype)) for p in model.parameters()}
    return copy.deepcopy(model, memo)


class MixedPrecision:
    """A float32 ``master`` model, its low-precision compute copy ``model`` and a ``scaler``."""

    def __init__(self, master, dtype, scaler: LossScaler | None = None):
        self.master, self.dtype = master, np.dtype(dtype)
        self.model = low_precision_copy(master, self.dtype)
        self.scaler = scaler if scaler is not None else LossScaler()
        self._pairs = list(zip(self.model.parameters(), master.parameters()))

    def zero_grad(self):
        self.model.zero_grad()
        self.master.zero_grad()

    def unscale_grads(self) -> None:
        """Master ``.grad`` = the copy's gradient in float32, divided by the scale (in float32:
        the unscaled gradient may be below float16's range). The copy's gradients are freed."""
        inv = np.float32(1.0 / self.scaler.scale)
        for low, master in self._pairs:
            if low.grad is None:
                master.grad = None
                continue
            g = low.grad.astype(np.float32)
            g *= inv
            master.grad, low.grad = g, None

    def refresh(self) -> None:
        """Cast the master weights into the compute copy (after an optimizer step, or a restore)."""
        for low, master in self._pairs:
            low.data[...] = master.data.astype(self.dtype)

