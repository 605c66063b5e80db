"""What a checkpoint must satisfy before anything in it is used: a checkpoint is untrusted input.

``gpt.checkpoint`` does the file I/O; this module only judges what it read, in two layers:

* the safetensors header (:func:`parse_header`): sizes, dtypes and byte ranges, so no
  tensor is read or allocated before its size is known to fit the file;
* the metadata each consumer uses (:func:`validate_model_meta` for sampling and training,
  :func:`validate_training_meta` for resuming), so a tampered field is a
  :class:`CheckpointError` naming the field, its value and what to do, never a traceback
  or a huge allocation.

>>> validate_training_meta({"step": -1}, "ckpt.safetensors")
Traceback (most recent call last):
...
gpt.checkpoint_validate.CheckpointError: ckpt.safetensors: its metadata field 'train_config' must be an object (dict), got None; the file was not written by gpt.train or was edited; use another checkpoint
"""
from __future__ import annotations

import math
import numbers
import re
from typing import NamedTuple, Optional

import numpy as np

from . import strict_json
from .resources import ResourceError, check_fits

__all__ = ["CheckpointError", "TensorSpec", "DTYPES", "MAX_HEADER_BYTES", "FORMAT", "METADATA_KEY",
           "parse_header", "parse_metadata", "validate_model_meta", "validate_training_meta",
           "check_model_tensors", "model_tensor_shapes"]

FORMAT = "tinytensor-ckpt-v2"  # v2: any optimizer's state; v1 (AdamW moments + "steps") is still read
_READABLE = (FORMAT, "tinytensor-ckpt-v1")
METADATA_KEY = "tinytensor"

# Far above what gpt.train writes (a 65k-token BPE is ~1 MB of JSON), and small enough
# that parsing the largest accepted header cannot exhaust memory (safetensors allows 100 MB).
MAX_HEADER_BYTES = 16 << 20
MAX_NDIM = 16

# safetensors dtype name -> NumPy dtype (the file is little-endian); the one list of
# what a checkpoint can hold (no BF16/FP8: NumPy has no such type).
DTYPES = {name: np.dtype(t) for name, t in (
    ("BOOL", "?"), ("U8", "u1"), ("I8", "i1"), ("U16", "<u2"), ("I16", "<i2"), ("U32", "<u4"),
    ("I32", "<i4"), ("U64", "<u8"), ("I64", "<i8"), ("F16", "<f2"), ("F32", "<f4"), ("F64", "<f8"))}

_PCG64_MAX = 1 << 128
_EDITED = "the file was not written by gpt.train or was edited; use another checkpoint"


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message says why and what to do."""


class TensorSpec(NamedTuple):
    """A tensor as the header describes it; ``start``/``end`` are byte offsets into the
    data section that follows the header."""
    dtype: np.dtype
    shape: tuple
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def corrupt(path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a valid tinytensor checkpoint: {reason}. It may be truncated or damaged, or "
        "not a checkpoint at all; use another one (e.g. ckpt_best.safetensors) or train again.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _show(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- the safetensors header
def parse_header(raw: bytes, data_len: int, path) -> tuple[dict[str, str], dict[str, TensorSpec]]:
    """(``__metadata__``, name -> TensorSpec) from a safetensors header's JSON bytes.

    ``data_len`` is the number of bytes after the header. Every tensor's byte range
    must match its dtype and shape, and the ranges must tile the data section exactly
    (no overlap: a small file cannot make many large tensors out of the same bytes).
    """
    try:
        header = strict_json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise corrupt(path, "its header is not UTF-8 text") from None
    except ValueError as exc:
        raise corrupt(path, f"its header is not valid: {exc}") from None
    if not isinstance(header, dict):
        raise corrupt(path, "its header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise corrupt(path, "its __metadata__ is not a map of strings")
    specs = {}
    for name, entry in header.items():
        if not name or not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(path, f"its header entry {_show(name)} is not a tensor description")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise corrupt(path, f"tensor {_show(name)} has dtype {_show(dtype)}; this reader supports "
                                f"{', '.join(DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
            raise corrupt(path, f"tensor {_show(name)} has shape {_show(shape)}; expected a list of at most "
                                f"{MAX_NDIM} non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_len):
            raise corrupt(path, f"tensor {_show(name)} has data_offsets {_show(offsets)} outside the file's "
                                f"{data_len} data bytes")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise corrupt(path, f"tensor {_show(name)} of shape {tuple(shape)} and dtype {dtype} needs {nbytes} "
                                f"bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}")
        specs[name] = TensorSpec(DTYPES[dtype], tuple(shape), offsets[0], offsets[1])
    end = 0
    for name, spec in sorted(specs.items(), key=lambda item: (item[1].start, item[1].end)):
        if spec.start != end:
            raise corrupt(path, f"tensor {_show(name)} starts at data byte {spec.start}, expected {end} "
                                "(tensors overlap or leave a gap)")
        end = spec.end
    if end != data_len:
        raise corrupt(path, f"its tensors end at data byte {end} but the file holds {data_len} data bytes")
    return meta, specs


def parse_metadata(header_meta: dict[str, str], path) -> dict:
    """The checkpoint's own metadata (a JSON object) from the header's ``__metadata__``."""
    if METADATA_KEY not in header_meta:
        raise CheckpointError(f"{path} is a safetensors file but was not written by gpt.train "
                              f"(no {METADATA_KEY!r} metadata in its header).")
    if header_meta.get("format") not in _READABLE:
        raise CheckpointError(f"{path} has checkpoint format {_show(header_meta.get('format'))}; this "
                              f"version reads {' and '.join(map(repr, _READABLE))}.")
    try:
        meta = strict_json.loads(header_meta[METADATA_KEY])
    except ValueError as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    return meta


# --------------------------------------------------------------------------- the metadata consumers read
def _field(meta, key, path, check, expected: str, required: bool = True):
    if key not in meta and not required:
        return None
    value = meta.get(key)
    if not check(value):
        raise CheckpointError(f"{path}: its metadata field {key!r} must be {expected}, got {_show(value)}; "
                              + _EDITED)
    return value


def _tokenizer(text, vocab_size: int, path):
    from .tokenizer import TokenizerError, tokenizer_from_json

    if not isinstance(text, str):
        raise CheckpointError(f"{path}: its metadata field 'tokenizer' must be the tokenizer's JSON text, "
                              f"got {_show(text)}; {_EDITED}")
    # the tokenizer checks its own JSON (nesting, numbers) and its merges' size before building
    try:
        tokenizer = tokenizer_from_json(text)
    except (TokenizerError, ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: its tokenizer is invalid ({exc}); {_EDITED}") from None
    if tokenizer.vocab_size != vocab_size:
        raise CheckpointError(f"{path}: its tokenizer has {tokenizer.vocab_size} tokens but model_config.vocab_size "
                              f"is {vocab_size}; {_EDITED}")
    return tokenizer


def validate_model_meta(meta: dict, path, specs: Optional[dict] = None, copies: int = 2):
    """Check what building the model needs; returns ``(model_type, GPTConfig, tokenizer)``.

    >>> meta, specs = read_checkpoint_metadata("out/ckpt.safetensors")  # doctest: +SKIP
    >>> model_type, config, tokenizer = validate_model_meta(meta, "out/ckpt.safetensors", specs)  # doctest: +SKIP

    Checks ``model_type``, every ``model_config`` field (type and range, via GPTConfig),
    the tokenizer and its vocabulary size, ``step``, and that ``copies`` float32 copies
    of the weights fit in the available memory (loading: the file's tensors and the
    model). With ``specs`` (from the header), the weights' names and shapes must be
    exactly those the config implies. Nothing is allocated beyond the tokenizer.
    """
    from .model import ARCHITECTURE_OPTIONS, MODELS, GPTConfig

    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    model_type = _field(meta, "model_type", path, lambda v: isinstance(v, str) and v in MODELS,
                        f"one of {', '.join(map(repr, MODELS))}")
    fields = list(GPTConfig.__dataclass_fields__)
    raw = _field(meta, "model_config", path, lambda v: isinstance(v, dict), "an object (dict)")
    # a checkpoint written before the architecture options is the GPT their defaults build
    missing_options = set(ARCHITECTURE_OPTIONS) - set(raw)
    if set(raw) | missing_options != set(fields):
        missing, extra = sorted(set(fields) - set(raw) - missing_options), sorted(set(raw) - set(fields))
        raise CheckpointError(f"{path}: model_config must have exactly the fields {', '.join(fields)}"
                              + (f"; missing {', '.join(missing)}" if missing else "")
                              + (f"; unknown {', '.join(map(_show, extra))}" if extra else "") + f"; {_EDITED}")
    try:
        config = GPTConfig(**raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: its model_config is invalid: {exc}; {_EDITED}") from None
    _field(meta, "step", path, lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    n_params = config.num_parameters(model_type)
    try:
        check_fits(copies * 4 * n_params, f"the model in {path} ({n_params:,} parameters)",
                   "use a machine with more memory, or a smaller model")
    except ResourceError as exc:
        raise CheckpointError(str(exc)) from None
    if specs is not None:
        check_model_tensors(specs, *model_tensor_shapes(meta, config, model_type, path), path=path)
    tokenizer = _tokenizer(meta.get("tokenizer"), config.vocab_size, path)
    return model_type, config, tokenizer


def model_tensor_shapes(meta: dict, config, model_type: str, path) -> tuple[dict, set]:
    """(name -> shape, names holding integers) of the model tensors a checkpoint must hold:
    ``config.param_shapes``, or for a LoRA run's checkpoint (metadata ``lora``, validated here)
    the frozen base (quantized or not) plus the adapters (``gpt.lora.checkpoint_tensors``)."""
    if meta.get("lora") is None:
        return config.param_shapes(model_type), set()
    from .lora import LoRASpec, checkpoint_tensors, check_quantizable
    try:
        spec = LoRASpec.from_dict(meta["lora"])
        if model_type != "gpt":
            raise ValueError(f"LoRA adapts a gpt model, not {model_type!r}")
        check_quantizable(config, spec)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its metadata field 'lora' is invalid ({exc}); {_EDITED}") from None
    return checkpoint_tensors(config, spec)


def check_model_tensors(specs: dict, expected: dict, integer=(), path="the checkpoint") -> None:
    """The weights in ``specs`` (all but ``optimizer.*``) must be exactly ``expected``
    (name -> shape, e.g. ``GPTConfig.param_shapes()``), in a floating-point dtype (an integer
    one for the names in ``integer``: a quantized base's blocks)."""
    weights = {n: s for n, s in specs.items() if not n.startswith("optimizer.")}
    problems = []
    missing = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected]
    wrong = [f"{n} {weights[n].shape} (expected {expected[n]})" for n in expected
             if n in weights and weights[n].shape != tuple(expected[n])]
    not_float = [f"{n} ({weights[n].dtype})" for n in expected
                 if n in weights and weights[n].dtype.kind not in ("iu" if n in integer else "f")]
    for label, items in (("missing weights", missing), ("unexpected tensors", extra),
                         ("wrong shapes", wrong), ("non-float weights", not_float)):
        if items:
            problems.append(f"{label}: {', '.join(map(str, items[:8]))}" + (" ..." if len(items) > 8 else ""))
    if problems:
        raise CheckpointError(f"{path}: its weights do not fit its model_config ({'; '.join(problems)}); "
                              + _EDITED)


def _pcg64_state(state, where: str, path) -> None:
    """A NumPy PCG64 ``bit_generator.state`` dict that setting cannot reject."""
    ok = (isinstance(state, dict) and set(state) == {"bit_generator", "state", "has_uint32", "uinteger"}
          and state["bit_generator"] == "PCG64"
          and isinstance(state["state"], dict) and set(state["state"]) == {"state", "inc"}
          and all(_is_int(v) and 0 <= v < _PCG64_MAX for v in state["state"].values())
          and state["state"]["inc"] % 2 == 1  # PCG64's increment is always odd
          and state["has_uint32"] in (0, 1) and _is_int(state["has_uint32"])
          and _is_int(state["uinteger"]) and 0 <= state["uinteger"] < 1 << 32)
    if not ok:
        raise CheckpointError(f"{path}: its random generator state rng.{where} is not a valid NumPy PCG64 "
                              f"state ({_show(state)}); the checkpoint cannot be resumed exactly")


_STATE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,31}")  # optimizer state and group keys: exp_avg, momentum_buffer, ...


def upgrade_optimizer_meta(opt):
    """A v1 checkpoint's AdamW metadata (``param_groups`` + per-parameter ``steps``) in the v2
    layout (``param_groups`` + per-parameter ``state`` scalars); anything else unchanged."""
    if isinstance(opt, dict) and set(opt) == {"param_groups", "steps"} and isinstance(opt["steps"], dict):
        return {"type": "AdamW", "param_groups": opt["param_groups"],
                "state": {k: {"step": v} for k, v in opt["steps"].items()}}
    return opt


def _scalar(v) -> bool:
    return isinstance(v, bool) or _is_finite(v)


def check_optimizer_meta(opt, path) -> list[int]:
    """Validate the ``optimizer`` metadata of any optimizer: its type name, its parameter
    groups (parameter indices plus hyperparameters: finite numbers, booleans, short lists
    of numbers) and each parameter's scalar state (e.g. AdamW's step). The arrays of the
    state are tensors named ``optimizer.<index>.<name>``. Returns the indices with state."""
    def bad(what):
        return CheckpointError(f"{path}: its optimizer state is malformed ({what}); the checkpoint cannot be "
                               "resumed. Sample from it with gpt.sample, or start a new run")
    if not isinstance(opt, dict) or set(opt) != {"type", "param_groups", "state"}:
        raise bad("expected an object with 'type', 'param_groups' and 'state'")
    if not (isinstance(opt["type"], str) and re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", opt["type"])):
        raise bad(f"'type' must be an optimizer's class name, got {_show(opt['type'])}")
    groups, state = opt["param_groups"], opt["state"]
    if not isinstance(groups, list) or not 0 < len(groups) <= 1024:
        raise bad("param_groups must be a non-empty list")
    indices = []
    for g in groups:
        if not isinstance(g, dict) or "params" not in g or not all(isinstance(k, str) and _STATE_NAME.fullmatch(k)
                                                                    for k in g):
            raise bad(f"a parameter group must be an object with 'params' and named hyperparameters; got {_show(g)}")
        if not isinstance(g["params"], list) or not all(_is_int(i) and i >= 0 for i in g["params"]):
            raise bad(f"'params' must list parameter indices, got {_show(g['params'])}")
        indices += g["params"]
        for k, v in g.items():
            if k != "params" and not (_scalar(v) or isinstance(v, list) and len(v) <= 8 and all(map(_is_finite, v))):
                raise bad(f"hyperparameter {k!r} must be a finite number, a boolean or a short list of numbers; "
                          f"got {_show(v)}")
    if sorted(indices) != list(range(len(indices))):
        raise bad("the groups' parameter indices must be 0..n-1, each once")
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and re.fullmatch(r"0|[1-9][0-9]{0,9}", k) and int(k) < len(indices)
            and isinstance(v, dict) and all(isinstance(n, str) and _STATE_NAME.fullmatch(n) and _scalar(x)
                                            and abs(x) < 1 << 62 for n, x in v.items())
            for k, v in state.items()):
        raise bad(f"'state' must map parameter indices below {len(indices)} to objects of named numbers, "
                  f"got {_show(state)}")
    return sorted(int(k) for k in state)


def check_optimizer_tensors(specs: dict, groups: list, with_state: list, path) -> None:
    """The ``optimizer.<index>.<name>`` tensors: a parameter index with saved state, a state
    name, float data; within a parameter group every parameter with state has the same array
    names (AdamW: exp_avg and exp_avg_sq; Muon: momentum_buffer: a combined optimizer's groups
    differ), all of one shape (the parameter's)."""
    n_params = sum(len(g["params"]) for g in groups)
    arrays: dict = {}
    for name, spec in specs.items():
        if not name.startswith("optimizer."):
            continue
        parts = name.split(".")
        if not (len(parts) == 3 and re.fullmatch(r"0|[1-9][0-9]{0,9}", parts[1]) and int(parts[1]) < n_params
                and _STATE_NAME.fullmatch(parts[2]) and spec.dtype.kind == "f"):
            raise CheckpointError(f"{path}: optimizer tensor {_show(name)} ({spec.dtype}) is not "
                                  f"optimizer.<parameter index below {n_params}>.<state name> in float; {_EDITED}")
        arrays.setdefault(int(parts[1]), {})[parts[2]] = spec
    stateful = set(with_state)
    for g in groups:
        in_group = [i for i in g["params"] if i in stateful]
        names = set().union(*(arrays.get(i, {}) for i in in_group))
        for i in in_group:
            missing = sorted(names - set(arrays.get(i, {})))
            if missing:
                raise CheckpointError(f"{path}: optimizer tensors "
                                      f"{', '.join(f'optimizer.{i}.{m}' for m in missing)} are missing; {_EDITED}")
            shapes = {tuple(spec.shape) for spec in arrays.get(i, {}).values()}
            if len(shapes) > 1:
                raise CheckpointError(f"{path}: the optimizer tensors of parameter {i} must be of one shape, got "
                                      f"{sorted(shapes)}; {_EDITED}")
    stray = sorted(set(arrays) - stateful)
    if stray:
        raise CheckpointError(f"{path}: optimizer tensors for parameter {stray[0]}, which has no saved state; "
                              + _EDITED)


def _loss_scale(v) -> bool:
    """A LossScaler state: the scale (halved and doubled from a power of two, so one itself) and
    the count of good steps since it last changed."""
    return (isinstance(v, dict) and set(v) == {"scale", "good_steps"} and _is_finite(v["scale"])
            and 2.0 ** -24 <= v["scale"] <= 2.0 ** 64 and math.frexp(v["scale"])[0] == 0.5
            and _is_int(v["good_steps"]) and 0 <= v["good_steps"] < 1 << 62)


def validate_training_meta(meta: dict, path, specs: Optional[dict] = None) -> None:
    """Check the fields a resumed run reads: ``train_config`` (a dict; its values are the
    trainer's to validate), ``step``, ``best_val_loss``, ``elapsed_s``, ``data``, ``loss_scale``, both
    random generator states and the optimizer state; with ``specs``, the optimizer's
    tensors must be present, in float, and each parameter's two moments of one shape.

    >>> validate_training_meta(meta, "out/ckpt.safetensors", specs)  # doctest: +SKIP
    """
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: checkpoint metadata is not a JSON object")
    _field(meta, "train_config", path, lambda v: isinstance(v, dict), "an object (dict)")
    _field(meta, "step", path, lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    _field(meta, "best_val_loss", path, lambda v: v is None or _is_finite(v), "null or a finite number")
    _field(meta, "elapsed_s", path, lambda v: _is_finite(v) and v >= 0, "a non-negative number", required=False)
    _field(meta, "data", path, lambda v: isinstance(v, dict) and all(
        isinstance(v.get(k, ""), str) for k in ("name", "source_sha256")), "an object with string fields",
        required=False)
    _field(meta, "loss_scale", path, _loss_scale, "an object {\"scale\": a power of two in [2**-24, 2**64], "
           "\"good_steps\": a non-negative integer}", required=False)
    rng = _field(meta, "rng", path, lambda v: isinstance(v, dict) and set(v) == {"batches", "tinytensor"},
                 "an object with 'batches' and 'tinytensor'")
    for where in ("batches", "tinytensor"):
        _pcg64_state(rng[where], where, path)
    if "optimizer" not in meta:
        raise CheckpointError(f"{path} holds no optimizer state, so a run cannot resume from it exactly; "
                              "sample from it with gpt.sample, or start a new run")
    meta["optimizer"] = upgrade_optimizer_meta(meta["optimizer"])
    with_state = check_optimizer_meta(meta["optimizer"], path)
    if specs is not None:
        check_optimizer_tensors(specs, meta["optimizer"]["param_groups"], with_state, path)
