"""Models that a run starts from or a sampler opens: our own checkpoints and Hugging Face GPT-2.

One door for both (:func:`open_pretrained`): it reads and validates the header, the model's
config and its tokenizer, and reads the weights only when asked, so a bad file fails before
anything large is allocated. ``gpt.train --init-from PATH`` builds on it (:func:`init_config`
resolves the run's configuration, :func:`load_initial_weights` fills the new model), and
``gpt.sample --checkpoint PATH`` loads either kind through it.

>>> src = open_pretrained("out/ckpt.safetensors")       # doctest: +SKIP
>>> src.kind, src.config.n_layer, src.tokenizer.vocab_size  # doctest: +SKIP
('checkpoint', 4, 65)
>>> weights = src.weights()                              # doctest: +SKIP  (our state-dict names)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import config as C
from .checkpoint import CheckpointError, InMemoryCheckpoint, read_checkpoint_metadata, read_model_weights, weights_are_finite
from .config import UsageError
from .model import GPTConfig

__all__ = ["Pretrained", "open_pretrained", "init_config", "load_initial_weights", "INIT_FREE_FIELDS"]

# The model fields a fine-tuning run may set differently from the model it starts from: dropout
# (no weight depends on it) and a shorter block_size (learned positions: the first rows of wpe
# are kept, as nanoGPT's crop_block_size). Every other one is the model's.
INIT_FREE_FIELDS = ("dropout", "block_size")


@dataclass
class Pretrained:
    """A model on disk, validated but not yet read: what it is, and how to read its weights."""

    path: Path
    kind: str  # "checkpoint" (written by gpt.train) or "hf-gpt2" (a Hugging Face GPT-2)
    model_type: str  # a key of gpt.model.MODELS
    config: GPTConfig
    tokenizer: object
    meta: dict  # the checkpoint's metadata (step, ...); for Hugging Face, {"step": None, ...}
    _read: Callable[..., dict]  # (convert=None) -> name -> float32 array (or convert's), our state-dict names

    def weights(self, convert=None) -> dict[str, np.ndarray]:
        """Our state-dict names -> arrays, shapes checked against ``config``, all finite.
        ``convert(name, array)``: applied to each array as soon as it is read (and checked), its
        result kept instead (gpt.quantize.load_int8: int8 rows, never the whole float model)."""
        if convert is None:
            weights = self._read()
            self._check_finite(weights)
            return weights

        def checked(name, array):
            self._check_finite({name: array})
            return convert(name, array)
        return self._read(checked)

    def _check_finite(self, weights):
        ok, bad = weights_are_finite(weights)
        if not ok:
            raise CheckpointError(f"{self.path} holds non-finite weights (NaN/Inf) in {bad}; it cannot be used. "
                                  "Use ckpt_best.safetensors or an earlier checkpoint")

    def build(self, backend: str = "numpy", convert=None):
        """The model with these weights, on ``backend``. Its layers are built uninitialised
        (nn.skip_init) and take the arrays read from the file as their parameters, without a copy:
        loading holds one copy of the weights, not a random model's as well. ``convert``: see
        ``weights`` (it must return arrays of the same shapes)."""
        from tinytensor import nn

        from .model import MODELS

        with nn.skip_init():
            model = MODELS[self.model_type](self.config)
        weights = self.weights(convert)
        params = dict(model.named_parameters())
        bad = sorted(set(params) ^ set(weights)) + [k for k, p in params.items()
                                                    if k in weights and tuple(weights[k].shape) != p.shape]
        if bad:  # unreachable after the header checks, but never a traceback
            raise CheckpointError(f"{self.path}: weights do not fit the model: {', '.join(bad[:6])}")
        for name, p in params.items():
            w = weights.pop(name)
            # (a zero-strided placeholder that a convert left, gpt.quantize's, is taken as it is)
            p.data = w if w.dtype == p.dtype and 0 in w.strides else np.ascontiguousarray(w, dtype=p.dtype)
        return model.to(backend)


def _our_checkpoint(path: Path) -> Optional[Pretrained]:
    """A checkpoint written by gpt.train, or None when ``path`` is a safetensors file of someone else's."""
    from .checkpoint_validate import validate_model_meta

    try:
        meta, specs = read_checkpoint_metadata(path)
    except CheckpointError as exc:
        if "was not written by gpt.train" in str(exc) and isinstance(path, Path) and path.suffix == ".safetensors":
            return None  # a safetensors file without our metadata: maybe Hugging Face's
        raise
    model_type, config, tokenizer = validate_model_meta(meta, path, specs)

    def read(convert=None):
        if meta.get("lora") is None:
            return read_model_weights(path, convert)[3]
        # a LoRA run's: its adapters merged into the base (gpt.lora), in float, then converted
        from .lora import merged_weights
        weights = merged_weights(read_model_weights(path)[3], config, meta["lora"])
        return weights if convert is None else {k: convert(k, weights.pop(k)) for k in list(weights)}
    return Pretrained(path, "checkpoint", model_type, config, tokenizer, meta, read)


def open_pretrained(path) -> Pretrained:
    """Our checkpoint, or a Hugging Face GPT-2 folder (config.json, model.safetensors and the
    tokenizer's files) or its model.safetensors; header, config and tokenizer validated, no
    weights read yet. Raises CheckpointError (what was wrong and what to do)."""
    if isinstance(path, InMemoryCheckpoint):  # an upload's bytes (gpt.serve): only our own format
        return _our_checkpoint(path)
    path = Path(path).expanduser()
    if path.is_file():
        src = _our_checkpoint(path)
        if src is not None:
            return src
    if path.is_dir() or (path.is_file() and path.suffix == ".safetensors"):
        from .hf_gpt2 import open_hf_gpt2  # a folder, or a safetensors file not written by gpt.train
        return open_hf_gpt2(path)
    return _our_checkpoint(path)  # missing, a FIFO, ...: the checkpoint reader's message says what to do


# -- gpt.train --init-from -----------------------------------------------------------------------------------
def init_config(cfg: C.TrainConfig, overrides) -> tuple[C.TrainConfig, Pretrained]:
    """The configuration of a run that fine-tunes ``cfg.init_from``: its model type, architecture
    and tokenizer come from the model (a command line that sets one differently is a UsageError;
    dropout may change and block_size may shrink); the rest (optimisation, data, run) is the
    command line's. Reads headers only. Returns (config, the opened model)."""
    try:
        src = open_pretrained(cfg.init_from)
    except CheckpointError as exc:
        raise CheckpointError(f"--init-from: {exc}") from None
    theirs = {**{f: getattr(src.config, f) for f in C.MODEL_FIELDS}, "model": src.model_type,
              "tokenizer": src.tokenizer.kind}
    changes = {}
    for name, value in theirs.items():
        if name not in overrides:
            changes[name] = value
        elif getattr(cfg, name) != value and not (name == "dropout" or (
                name == "block_size" and (cfg.block_size <= value or src.config.pos == "rope"))):
            limit = " (it may only shrink)" if name == "block_size" else ""
            raise UsageError(f"{C._flag(name)} {getattr(cfg, name)} differs from {src.path}'s {value}{limit}: "
                             f"--init-from fine-tunes that model, whose {name} it keeps; drop {C._flag(name)}")
    if "vocab_size" in overrides:
        raise UsageError(f"--vocab-size: --init-from uses {src.path}'s tokenizer ({src.tokenizer.vocab_size} "
                         "tokens); drop --vocab-size")
    # the tokenizer's size goes where gpt.data's cache looks for it (a bpe's requested vocabulary)
    changes["vocab_size"] = src.tokenizer.vocab_size if src.tokenizer.kind == "bpe" else None
    try:
        cfg = dataclasses.replace(cfg, **changes).validate()
    except ValueError as exc:
        raise UsageError(f"--init-from {src.path}: {exc}") from None
    return cfg, src


def load_initial_weights(model, src: Pretrained) -> None:
    """Fill a freshly built model (of ``init_config``'s configuration) with ``src``'s weights;
    a shorter block_size keeps the first rows of the position table."""
    weights = src.weights()
    wpe = "transformer.wpe.weight"
    if wpe in weights:
        weights[wpe] = weights[wpe][:model.config.block_size]
    try:
        model.load_state_dict(weights)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"--init-from {src.path}: its weights do not fit the model ({exc})") from None
