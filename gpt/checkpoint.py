"""Checkpoints as safetensors files: arrays plus a JSON metadata blob.

safetensors is used rather than pickle/np.savez because loading it can never
execute code, and the format is readable from other frameworks.

Layout: the tensors are stored under their names; the safetensors header
metadata (which must be ``dict[str, str]``) holds

* ``"format": "tinytensor-ckpt-v1"``
* ``"tinytensor": json.dumps(metadata)`` -- any JSON-serialisable dict
  (model config, tokenizer JSON, step, optimizer hyper-parameters, ...).

Example::

    from gpt.checkpoint import save_checkpoint, load_checkpoint
    save_checkpoint("out/ckpt.safetensors",
                    {"wte": wte, "step": np.array(1000)},
                    {"config": {"n_layer": 4}, "step": 1000})
    tensors, meta = load_checkpoint("out/ckpt.safetensors")

Saving is atomic: the file is written under a temporary name in the same
directory, fsynced, and renamed over ``path``; an interrupted save leaves the
previous checkpoint untouched.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import numpy as np

from .atomic import atomic_write_bytes

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "FORMAT", "METADATA_KEY"]

FORMAT = "tinytensor-ckpt-v1"
METADATA_KEY = "tinytensor"

# dtypes safetensors can store and NumPy can represent
_SUPPORTED_DTYPES = {
    np.dtype(t)
    for t in (
        np.bool_, np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32,
        np.uint64, np.int64, np.float16, np.float32, np.float64,
    )
}


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message says why and what to do."""


def _to_numpy(name: str, value: Any) -> np.ndarray:
    # CuPy arrays (and similar device arrays) expose .get() to copy to the host.
    if not isinstance(value, np.ndarray) and callable(getattr(value, "get", None)) \
            and not isinstance(value, dict):
        value = value.get()
    arr = np.asarray(value)
    if arr.dtype not in _SUPPORTED_DTYPES:
        raise CheckpointError(
            f"tensor {name!r} has dtype {arr.dtype}, which a checkpoint cannot store "
            f"(supported: bool, (u)int8-64, float16/32/64)"
        )
    # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,).
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return arr


def save_checkpoint(
    path: Union[str, os.PathLike], tensors: dict, metadata: dict
) -> Path:
    """Atomically write ``tensors`` (name -> array) and ``metadata`` to ``path``.

    Arrays may be NumPy arrays or objects with ``.get()`` (CuPy). Parent
    directories are created. Returns the path written.

    Raises:
        CheckpointError: bad names, unsupported dtypes, non-JSON metadata, or
            ``path`` is a directory. I/O errors during the write propagate
            unchanged after the temporary file has been removed.
    """
    from safetensors.numpy import save as safetensors_save

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory: {path}; pass a file path such as {path / 'ckpt.safetensors'}")
    if not isinstance(tensors, dict):
        raise CheckpointError(f"tensors must be a dict of name -> array, got {type(tensors).__name__}")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"tensor names must be non-empty strings, got {name!r}")
        arrays[name] = _to_numpy(name, value)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        meta_json = json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from e
    header = {"format": FORMAT, METADATA_KEY: meta_json}

    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialise to bytes and write them ourselves (rather than save_file): the
    # file then gets normal umask permissions, and the write is atomic.
    atomic_write_bytes(path, safetensors_save(arrays, metadata=header))
    return path


def load_checkpoint(path: Union[str, os.PathLike]) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns ``(tensors, metadata)``; the arrays are writable NumPy copies.

    Raises:
        CheckpointError: the file is missing, a directory, truncated/corrupt,
            not safetensors, or a safetensors file not written by gpt.train.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint not found: {path}. Train a model first with `python -m gpt.train` "
            f"(it writes the checkpoint), or pass --checkpoint PATH to an existing one."
        )
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint path is a directory: {path}; pass the .safetensors file inside it "
            f"with --checkpoint PATH."
        )
    try:
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
            for name in f.keys():
                arr = f.get_tensor(name)
                # Callers load these into parameters in place: give them owned, writable copies.
                tensors[name] = arr if (arr.flags.writeable and arr.flags.owndata) else np.array(arr)
    except Exception as e:  # SafetensorError, OSError, ...: never leak raw library errors
        raise CheckpointError(
            f"{path} is not a valid tinytensor checkpoint (truncated or not safetensors): "
            f"{type(e).__name__}: {e}"
        ) from e

    if METADATA_KEY not in header:
        raise CheckpointError(
            f"{path} is a safetensors file but was not written by gpt.train "
            f"(no {METADATA_KEY!r} metadata in its header)."
        )
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {header.get('format')!r}; this version reads {FORMAT!r}."
        )
    try:
        metadata = json.loads(header[METADATA_KEY])
    except ValueError as e:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON: {e}") from e
    return tensors, metadata


# --------------------------------------------------------------------------- training state
# A training checkpoint holds the model weights under their state-dict names,
# the AdamW moments as "optimizer.<i>.exp_avg" / ".exp_avg_sq" (i = the
# parameter's index in the optimizer), and everything else as JSON metadata.

def pack_training_state(model, optimizer, metadata: dict) -> tuple[dict, dict]:
    """(tensors, metadata) for ``save_checkpoint`` from a model and its optimizer."""
    tensors = dict(model.state_dict())
    opt_state = optimizer.state_dict()
    steps = {}
    for i, s in opt_state["state"].items():
        steps[str(i)] = int(s["step"])
        tensors[f"optimizer.{i}.exp_avg"] = s["exp_avg"]
        tensors[f"optimizer.{i}.exp_avg_sq"] = s["exp_avg_sq"]
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in opt_state["param_groups"]]
    return tensors, {**metadata, "optimizer": {"param_groups": groups, "steps": steps}}


def unpack_training_state(tensors: dict, metadata: dict):
    """(model state dict, optimizer state dict or None) from a loaded checkpoint."""
    model_state = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    opt_meta = metadata.get("optimizer")
    if opt_meta is None:
        return model_state, None
    state = {int(i): {"step": step, "exp_avg": tensors[f"optimizer.{i}.exp_avg"],
                      "exp_avg_sq": tensors[f"optimizer.{i}.exp_avg_sq"]}
             for i, step in opt_meta["steps"].items()}
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in opt_meta["param_groups"]]
    return model_state, {"state": state, "param_groups": groups}


def load_model(path, backend: str = "numpy"):
    """(model, tokenizer, metadata) from a checkpoint written by ``gpt.train``."""
    from .model import MODELS, GPTConfig
    from .tokenizer import tokenizer_from_json

    tensors, meta = load_checkpoint(path)
    try:
        config = GPTConfig(**meta["model_config"])
        model = MODELS[meta["model_type"]](config)
        tokenizer = tokenizer_from_json(meta["tokenizer"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is incomplete or invalid ({exc})") from None
    model_state, _ = unpack_training_state(tensors, meta)
    try:
        model.load_state_dict(model_state)
    except KeyError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model: {exc}") from None
    return model.to(backend), tokenizer, meta
