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

Reading treats the file as untrusted: the header is parsed and checked here
(``gpt.checkpoint_validate``) before a single tensor byte is read, and the tensors
are then read straight into arrays of the sizes the header promised.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, fields
import io
import json
import os
import stat
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Union

import numpy as np

from . import strict_json
from .atomic import atomic_write_bytes
from .checkpoint_validate import (DTYPES, FORMAT, MAX_HEADER_BYTES, METADATA_KEY, CheckpointError, TensorSpec,
                                  check_optimizer_meta, upgrade_optimizer_meta, corrupt, model_tensor_shapes, parse_header,
                                  parse_metadata,
                                  validate_model_meta, validate_training_meta)
from .resources import ResourceError, check_fits

__all__ = ["CheckpointError", "TensorSpec", "InMemoryCheckpoint", "TrainingState", "save_checkpoint", "load_checkpoint", "read_checkpoint_metadata",
           "read_header_metadata", "read_model_weights", "weights_are_finite", "pack_training_state", "unpack_training_state",
           "validate_model_meta", "validate_training_meta", "FORMAT", "METADATA_KEY"]

# dtypes safetensors can store and NumPy can represent (native byte order)
_SUPPORTED_DTYPES = {dt.newbyteorder("=") for dt in DTYPES.values()}


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
        CheckpointError: bad names, unsupported dtypes, metadata that is not JSON
            (NaN/Infinity included) or that a reader would refuse, or ``path`` is a
            directory. I/O errors during the write propagate unchanged after the
            temporary file has been removed.
    """
    from safetensors.numpy import save as safetensors_save

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint path is a directory: {path}; pass a file path such as "
                              f"{path / 'ckpt.safetensors'}")
    if not isinstance(tensors, dict):
        raise CheckpointError(f"tensors must be a dict of name -> array, got {type(tensors).__name__}")
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CheckpointError(f"tensor names must be non-empty strings other than '__metadata__', got {name!r}")
        arrays[name] = _to_numpy(name, value)
    if not isinstance(metadata, dict):
        raise CheckpointError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        # allow_nan=False: readers refuse NaN/Infinity, so never write a file they would refuse
        meta_json = json.dumps(metadata, allow_nan=False)
        strict_json.check_depth(meta_json)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from e
    header = {"format": FORMAT, METADATA_KEY: meta_json}

    # Serialise to bytes and write them ourselves (rather than save_file): the
    # file then gets normal umask permissions, and the write is atomic.
    blob = safetensors_save(arrays, metadata=header)
    header_len = int.from_bytes(blob[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"the checkpoint's header would be {header_len} bytes; readers accept at most "
                              f"{MAX_HEADER_BYTES}. Keep large logs (e.g. per-step history) out of the metadata")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    return path


# --------------------------------------------------------------------------- reading
class InMemoryCheckpoint(NamedTuple):
    """A checkpoint's bytes that never touched the disk (e.g. an upload), accepted wherever a
    path is read: the same reader and checks run on them; ``name`` is what messages call it.

    >>> model, tokenizer, meta = load_model(InMemoryCheckpoint(data, "upload.safetensors"))  # doctest: +SKIP
    """
    data: bytes
    name: str

    def __str__(self) -> str:
        return self.name


Source = Union[str, os.PathLike, InMemoryCheckpoint]


def _source(source: Source):
    return source if isinstance(source, InMemoryCheckpoint) else Path(source)


@contextlib.contextmanager
def _open(path):
    """The opened checkpoint and its size; one open file for header and tensors, so a
    checkpoint replaced meanwhile (a trainer saving) cannot mix two files' contents.
    An InMemoryCheckpoint is read through a BytesIO, which shares its bytes (no copy)."""
    if isinstance(path, InMemoryCheckpoint):
        yield io.BytesIO(path.data), len(path.data)
        return
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
        # O_NONBLOCK: opening a FIFO planted at the path must not hang (regular files ignore it)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise CheckpointError(f"checkpoint {path} is not a regular file; pass a .safetensors file")
    with os.fdopen(fd, "rb") as f:
        yield f, info.st_size


def _read_exactly(f, n: int, path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise corrupt(path, f"it ended while reading {what}")
    return data


def _read_safetensors_header(f, size: int, path) -> tuple[dict[str, str], dict[str, TensorSpec], int]:
    """(the header's ``__metadata__``, specs, byte offset of the data section), reading only the header."""
    if size < 8:
        raise corrupt(path, f"it is {size} bytes long, too short to hold a header")
    n = int.from_bytes(_read_exactly(f, 8, path, "the header length"), "little")
    if n > MAX_HEADER_BYTES:
        raise corrupt(path, f"its header claims {n} bytes, more than the {MAX_HEADER_BYTES} this reader accepts")
    if n > size - 8:
        raise corrupt(path, f"its header claims {n} bytes but only {size - 8} follow")
    header_meta, specs = parse_header(_read_exactly(f, n, path, "the header"), size - 8 - n, path)
    return header_meta, specs, 8 + n


def _read_header(f, size: int, path) -> tuple[dict, dict[str, TensorSpec], int]:
    """(our metadata, specs, byte offset of the data section), reading only the header."""
    header_meta, specs, base = _read_safetensors_header(f, size, path)
    return parse_metadata(header_meta, path), specs, base


def read_header_metadata(path: Source) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (string -> string) of any safetensors file,
    after the header's checks; what a program looks at to pick a loader for a file.

    >>> read_header_metadata("out/ckpt.safetensors")["format"]  # doctest: +SKIP
    'tinytensor-ckpt-v2'
    """
    path = _source(path)
    with _open(path) as (f, size):
        return _read_safetensors_header(f, size, path)[0]


def _read_tensor(f, spec: TensorSpec, base: int, name: str, path) -> np.ndarray:
    arr = np.empty(spec.shape, spec.dtype)
    f.seek(base + spec.start)
    view = memoryview(arr.reshape(-1).view(np.uint8))
    got = 0
    while got < spec.nbytes:  # readinto may return less than asked; 0 means end of file
        n = f.readinto(view[got:])
        if not n:
            raise corrupt(path, f"it ended inside tensor {name!r} (truncated while reading?)")
        got += n
    if spec.dtype.kind == "b" and arr.view(np.uint8).max(initial=0) > 1:
        raise corrupt(path, f"bool tensor {name!r} holds bytes other than 0 and 1")
    if not spec.dtype.isnative:
        arr = arr.astype(spec.dtype.newbyteorder("="))
    return arr


def _read_tensors(f, specs: dict, base: int, names: Iterable[str], path, convert=None) -> dict[str, np.ndarray]:
    """name -> array for ``names``; ``convert(name, array)``, when given, turns each one into what is
    kept (e.g. int8) as soon as it is read, so the float tensors are never all held at once."""
    names = list(names)
    missing = [n for n in names if n not in specs]
    if missing:
        raise CheckpointError(f"{path} has no tensor {', '.join(map(repr, missing[:8]))}"
                              + (" ..." if len(missing) > 8 else ""))
    try:
        check_fits(sum(specs[n].nbytes for n in names), f"loading {path}", "use a machine with more memory")
    except ResourceError as exc:
        raise CheckpointError(str(exc)) from None
    if convert is None:
        return {n: _read_tensor(f, specs[n], base, n, path) for n in names}
    return {n: convert(n, _read_tensor(f, specs[n], base, n, path)) for n in names}


def read_safetensors(path: Source, choose, convert=None) -> tuple[dict, dict[str, np.ndarray]]:
    """(the header's ``__metadata__``, name -> array) from any safetensors file (e.g. Hugging Face's),
    read as boundedly as our own: ``choose(specs)`` judges the header's tensors (raising
    CheckpointError) and returns the names to read, before any tensor is allocated. ``convert``: see
    _read_tensors."""
    path = _source(path)
    with _open(path) as (f, size):
        header_meta, specs, base = _read_safetensors_header(f, size, path)
        return header_meta, _read_tensors(f, specs, base, choose(specs), path, convert)


def read_checkpoint_metadata(path: Source) -> tuple[dict, dict[str, TensorSpec]]:
    """``(metadata, name -> TensorSpec)`` from the header alone; no tensor data is read.

    >>> meta, specs = read_checkpoint_metadata("out/ckpt.safetensors")  # doctest: +SKIP
    >>> meta["step"], specs["transformer.wte.weight"].shape  # doctest: +SKIP
    (5000, (65, 384))

    Raises CheckpointError like :func:`load_checkpoint`.
    """
    path = _source(path)
    with _open(path) as (f, size):
        meta, specs, _ = _read_header(f, size, path)
    return meta, specs


def load_checkpoint(path: Source,
                    names: Optional[Iterable[str]] = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    >>> tensors, meta = load_checkpoint("out/ckpt.safetensors")  # doctest: +SKIP

    Returns ``(tensors, metadata)``; the arrays are writable NumPy arrays. With
    ``names``, only those tensors are read (e.g. the weights without ``optimizer.*``).

    Raises:
        CheckpointError: the file is missing, a directory, truncated/corrupt,
            not safetensors, a safetensors file not written by gpt.train, lacks one
            of ``names``, or its tensors would not fit in memory.
    """
    path = _source(path)
    with _open(path) as (f, size):
        meta, specs, base = _read_header(f, size, path)
        tensors = _read_tensors(f, specs, base, specs if names is None else names, path)
    return tensors, meta


def weights_are_finite(weights) -> tuple[bool, Optional[str]]:
    """``(True, None)`` if every floating-point array is finite, else ``(False, first bad name)``.

    ``weights``: a dict name -> array (NumPy or CuPy), or a model (its ``state_dict()``).

    >>> weights_are_finite({"w": np.ones(2), "b": np.array([0.0, np.nan])})
    (False, 'b')
    """
    from tinytensor.backend import xp_of

    state = weights.state_dict() if hasattr(weights, "state_dict") else weights
    for name, arr in state.items():
        if getattr(arr, "dtype", np.dtype(object)).kind in "fc" and not bool(xp_of(arr).isfinite(arr).all()):
            return False, name
    return True, None


# --------------------------------------------------------------------------- training state
# A training checkpoint holds the model weights under their state-dict names,
# the AdamW moments as "optimizer.<i>.exp_avg" / ".exp_avg_sq" (i = the
# parameter's index in the optimizer), and everything else as JSON metadata.

@dataclass
class TrainingState:
    """A training checkpoint's metadata: the one place its fields are named. The arrays (the
    weights, the optimizer's state) are written and read with it.

    >>> state = TrainingState.read("out/ckpt.safetensors")            # doctest: +SKIP
    >>> model_state, optimizer_state = state.load_arrays("out/ckpt.safetensors")  # doctest: +SKIP
    """

    model_type: str
    model_config: dict
    train_config: dict
    tokenizer: str  # the tokenizer's JSON
    step: int
    rng: dict  # {"batches": the batch generator's state, "tinytensor": tinytensor's}
    data: dict = field(default_factory=dict)  # {"name", "source_sha256"} of the prepared dataset
    best_val_loss: Optional[float] = None  # None until the first evaluation
    elapsed_s: float = 0.0  # training wall time, summed over resumes
    optimizer: Optional[dict] = None  # read from a file; written by pack_training_state
    # mixed precision (--dtype float16/bfloat16) only: the LossScaler's {"scale": float, "good_steps": int};
    # absent from float32 runs' checkpoints
    loss_scale: Optional[dict] = None
    # LoRA runs only: the adapters' settings (gpt.lora.LoRASpec.to_dict()); the model tensors are then the
    # frozen base's (quantized for an int8/int4 base) plus the adapters (gpt.lora.checkpoint_tensors)
    lora: Optional[dict] = None

    def save(self, path, model, optimizer) -> Path:
        meta = {k: v for k, v in asdict(self).items()
                if k != "optimizer" and not (k in ("loss_scale", "lora") and v is None)}
        return save_checkpoint(path, *pack_training_state(model, optimizer, meta))

    @classmethod
    def read(cls, path) -> "TrainingState":
        """The checkpoint's header only, validated as untrusted input (nothing else is read)."""
        meta, specs = read_checkpoint_metadata(path)
        validate_model_meta(meta, path, specs)
        validate_training_meta(meta, path, specs)
        return cls(**{f.name: meta[f.name] for f in fields(cls) if f.name in meta})

    def load_arrays(self, path):
        """(model state dict, optimizer state dict) from the file this state was read from."""
        tensors, _ = load_checkpoint(path)
        return unpack_training_state(tensors, {"optimizer": self.optimizer}, path)


def pack_training_state(model, optimizer, metadata: dict) -> tuple[dict, dict]:
    """(tensors, metadata) for ``save_checkpoint`` from a model and any tinytensor optimizer.

    The weights keep their state-dict names; each array of the optimizer's state becomes
    the tensor ``optimizer.<parameter index>.<name>`` (AdamW: exp_avg, exp_avg_sq; SGD:
    momentum_buffer) and its scalars (AdamW's step) go to the metadata, so a new optimizer
    needs no change here.
    """
    tensors = dict(model.state_dict())
    opt_state = optimizer.state_dict()
    state = {}
    for i, s in opt_state["state"].items():
        scalars = {}
        for name, value in s.items():
            if getattr(value, "ndim", 0) > 0:
                tensors[f"optimizer.{i}.{name}"] = value
            else:
                scalars[name] = value.item() if hasattr(value, "item") else value
        state[str(i)] = scalars
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
              for g in opt_state["param_groups"]]
    return tensors, {**metadata, "optimizer": {"type": type(optimizer).__name__, "param_groups": groups,
                                               "state": state}}


def unpack_training_state(tensors: dict, metadata: dict, path="the checkpoint"):
    """(model state dict, optimizer state dict or None) from a loaded checkpoint (v1 or v2).

    >>> model_state, opt_state = unpack_training_state(*load_checkpoint("out/ckpt.safetensors"))  # doctest: +SKIP

    Raises CheckpointError when the ``optimizer`` metadata is malformed, names a state
    without its tensors, or ``optimizer.*`` tensors are misnamed.
    """
    model_state = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    opt_meta = metadata.get("optimizer")
    if opt_meta is None:
        return model_state, None
    opt_meta = upgrade_optimizer_meta(opt_meta)
    with_state = check_optimizer_meta(opt_meta, path)
    state = {i: dict(opt_meta["state"][str(i)]) for i in with_state}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            if not index.isdigit() or int(index) not in state:
                raise CheckpointError(f"{path}: optimizer tensor {name!r} belongs to no parameter with saved "
                                      "state; the file was not written by gpt.train or was edited")
            state[int(index)][key] = value
    if opt_meta["type"] == "AdamW":  # (v1 files name their moments only through these tensors)
        missing = [f"optimizer.{i}.{m}" for i in with_state for m in ("exp_avg", "exp_avg_sq") if m not in state[i]]
        if missing:
            raise CheckpointError(f"{path}: optimizer tensors {', '.join(missing[:8])} are missing; the file was "
                                  "not written by gpt.train or was edited; use another checkpoint")
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in opt_meta["param_groups"]]
    return model_state, {"type": opt_meta["type"], "state": state, "param_groups": groups}


def read_model_weights(path: Source, convert=None):
    """(model_type, GPTConfig, tokenizer, weights, metadata): the header and metadata validated
    first (nothing allocated for a bad file), then only the model's tensors read. ``path`` may
    be an :class:`InMemoryCheckpoint`. ``convert``: see _read_tensors."""
    path = _source(path)
    with _open(path) as (f, size):
        meta, specs, base = _read_header(f, size, path)
        model_type, config, tokenizer = validate_model_meta(meta, path, specs)
        names, _ = model_tensor_shapes(meta, config, model_type, path)  # a LoRA run's: base + adapters
        weights = _read_tensors(f, specs, base, names, path, convert)
    return model_type, config, tokenizer, weights, meta
