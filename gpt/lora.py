"""LoRA on the GPT: which Linear layers get adapters, the adapter file, and applying it to a base.

>>> spec = LoRASpec(rank=8, alpha=16, targets="attn")
>>> names = apply_lora(model, spec)          # freezes the model, adapts attn.c_attn and attn.c_proj  # doctest: +SKIP
>>> save_adapter("out/adapter.safetensors", model, spec)                                            # doctest: +SKIP
>>> load_adapter(base_model, "out/adapter.safetensors")      # base_model: from the base checkpoint # doctest: +SKIP

An adapter file is a safetensors file of the ``lora_A``/``lora_B`` tensors under the model's
names, and metadata: the LoRA settings and the base's model config (it fits only that shape).
Reading it goes through the project's bounded checkpoint reader, and the file is validated as
untrusted input (settings, names, shapes, dtypes, finiteness) before anything is built.
In a training checkpoint of a LoRA run the same settings sit under the metadata key ``lora``,
with the frozen base (quantized, for int8/int4) and the adapters as the model's tensors.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from tinytensor import nn
from tinytensor.nn.lora import BASE_DTYPES, LoRALinear
from tinytensor.ops.quant import quant_block

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_metadata, save_checkpoint
from .checkpoint_validate import check_model_tensors

# --lora-targets: the Linear layers of every block that get an adapter (GPT-2 names)
TARGETS = {"attn": ("attn.c_attn", "attn.c_proj"),
           "mlp": ("mlp.c_fc", "mlp.c_proj"),
           "all": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
ADAPTER_KIND = "lora-adapter-v1"
MAX_RANK = 1 << 12
QUANT_BLOCK = 64


@dataclass(frozen=True)
class LoRASpec:
    """The adapters' settings; ``from_dict`` validates an untrusted copy (a file's)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "attn"
    base_dtype: str = "float32"  # float32, or int8/int4 blocks (QLoRA-style)

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, numbers.Integral) or not 1 <= self.rank <= MAX_RANK:
            raise ValueError(f"LoRA rank must be an integer in [1, {MAX_RANK}], got {self.rank!r}")
        for name in ("alpha", "dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"LoRA {name} must be a finite number, got {v!r}")
        if not 0 <= self.dropout < 1 or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0 and dropout in [0, 1), got {self.alpha!r}, {self.dropout!r}")
        if self.targets not in TARGETS:
            raise ValueError(f"LoRA targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"LoRA base dtype must be one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")

    @classmethod
    def from_dict(cls, raw) -> "LoRASpec":
        if not isinstance(raw, dict) or set(raw) != {"rank", "alpha", "dropout", "targets", "base_dtype"}:
            raise ValueError(f"LoRA settings must be an object with rank, alpha, dropout, targets and base_dtype; "
                             f"got {str(raw)[:120]}")
        return cls(**raw)

    def to_dict(self) -> dict:
        return {**asdict(self), "alpha": float(self.alpha), "dropout": float(self.dropout)}


def target_layers(config, spec: LoRASpec) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of each adapted Linear, from the config alone (nothing built)."""
    shapes = config.param_shapes("gpt")
    out = {}
    for i in range(config.n_layer):
        for t in TARGETS[spec.targets]:
            name = f"transformer.h.{i}.{t}"
            out[name] = shapes[f"{name}.weight"]
    return out


def adapter_shapes(config, spec: LoRASpec) -> dict[str, tuple[int, ...]]:
    """name -> shape of every adapter tensor (lora_A (r, in), lora_B (out, r))."""
    shapes = {}
    for name, (n_out, n_in) in target_layers(config, spec).items():
        shapes[f"{name}.lora_A"] = (spec.rank, n_in)
        shapes[f"{name}.lora_B"] = (n_out, spec.rank)
    return shapes


def checkpoint_tensors(config, spec: LoRASpec) -> tuple[dict, set]:
    """(name -> shape, the names holding integers) of a LoRA run's model tensors: the base's,
    with a quantized base's adapted weights as weight_q (int8, or uint8 pairs) and weight_scale,
    plus the adapters."""
    shapes = dict(config.param_shapes("gpt"))
    integer = set()
    if spec.base_dtype != "float32":
        bits = 8 if spec.base_dtype == "int8" else 4
        for name, (n_out, n_in) in target_layers(config, spec).items():
            block = quant_block(n_in, QUANT_BLOCK, bits)
            del shapes[f"{name}.weight"]
            shapes[f"{name}.weight_q"] = (n_out, n_in if bits == 8 else n_in // 2)
            shapes[f"{name}.weight_scale"] = (n_out, n_in // block)
            integer.add(f"{name}.weight_q")
    shapes.update(adapter_shapes(config, spec))
    return shapes, integer


def check_quantizable(config, spec: LoRASpec) -> None:
    """ValueError when a 4-bit base cannot pack this model's widths (odd input features)."""
    if spec.base_dtype == "int4":
        for n_out, n_in in target_layers(config, spec).values():
            quant_block(n_in, QUANT_BLOCK, 4)


def apply_lora(model, spec: LoRASpec) -> list[str]:
    """Freeze every parameter of ``model`` and replace the target Linears of each block by
    LoRALinear (in place; quantizing their weights for an int8/int4 base). Returns their names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for i, block in enumerate(model.transformer.h):
        for target in TARGETS[spec.targets]:
            owner_name, attr = target.split(".")
            owner = getattr(block, owner_name)
            layer = getattr(owner, attr)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"transformer.h.{i}.{target} is already adapted ({type(layer).__name__})")
            setattr(owner, attr, LoRALinear(layer, spec.rank, spec.alpha, spec.dropout, spec.base_dtype, QUANT_BLOCK))
            names.append(f"transformer.h.{i}.{target}")
    model.lora_spec = spec
    return names


def lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model) -> None:
    """Fold every adapter into its float weight in place (``unmerge_lora`` takes them out again)."""
    for _, m in lora_layers(model):
        m.merge()


def fold_lora(model) -> None:
    """Replace every LoRALinear by a plain float Linear holding base + update (for inference:
    the model is then a base GPT again, and another adapter can be applied on top)."""
    for name, m in lora_layers(model):
        owner = model
        *path, attr = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, attr, m.to_linear())
    model.lora_spec = None


def unmerge_lora(model) -> None:
    for _, m in lora_layers(model):
        m.unmerge()


def merged_weights(weights: dict, config, lora_meta: dict) -> dict:
    """A LoRA run's checkpoint tensors (``checkpoint_tensors``) as a plain model's state dict:
    each adapted weight = the (dequantized) base + B A alpha/rank. For --init-from such a checkpoint."""
    from tinytensor.ops.quant import dequantize_blockwise
    spec = LoRASpec.from_dict(lora_meta)
    out = {k: v for k, v in weights.items() if not k.endswith((".lora_A", ".lora_B", ".weight_q", ".weight_scale"))}
    for name, (n_out, n_in) in target_layers(config, spec).items():
        if spec.base_dtype == "float32":
            w = weights[f"{name}.weight"].astype(np.float32)
        else:
            bits = 8 if spec.base_dtype == "int8" else 4
            w = dequantize_blockwise(weights[f"{name}.weight_q"], weights[f"{name}.weight_scale"], bits,
                                     quant_block(n_in, QUANT_BLOCK, bits))
        delta = weights[f"{name}.lora_B"] @ weights[f"{name}.lora_A"]
        out[f"{name}.weight"] = w + delta * np.float32(spec.alpha / spec.rank)
    return out


def adapter_state(model) -> dict:
    """name -> array of every adapter tensor (the live arrays)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def save_adapter(path, model, spec: LoRASpec, model_type: str = "gpt"):
    """Write the adapters alone (atomically), with the settings and the base's model config."""
    meta = {"kind": ADAPTER_KIND, "lora": spec.to_dict(), "model_type": model_type,
            "model_config": model.config.to_dict()}
    return save_checkpoint(path, adapter_state(model), meta)


def read_adapter(path, config) -> tuple[LoRASpec, dict]:
    """(spec, name -> array) of an adapter file made for a model of ``config``; CheckpointError
    (what was wrong, the value, what to do) for anything else, before any tensor is read."""
    meta, specs = read_checkpoint_metadata(path)

    def bad(what):
        return CheckpointError(f"{path} is not a usable LoRA adapter: {what}")
    if meta.get("kind") != ADAPTER_KIND:
        raise bad(f"its metadata kind is {str(meta.get('kind'))[:60]!r}, not {ADAPTER_KIND!r} (write one with "
                  "gpt.train --lora-rank N; it is out-dir/adapter.safetensors)")
    try:
        spec = LoRASpec.from_dict(meta.get("lora"))
    except (TypeError, ValueError) as exc:
        raise bad(str(exc)) from None
    saved = meta.get("model_config")
    if not isinstance(saved, dict) or saved != config.to_dict() or meta.get("model_type") != "gpt":
        raise bad("it was trained on a base of another shape (model_config differs from the checkpoint's); "
                  "use it with the base it was trained on")
    expected = adapter_shapes(config, spec)
    check_model_tensors(specs, expected, path=path)
    tensors, _ = load_checkpoint(path, expected)
    for name, arr in tensors.items():
        if not np.isfinite(arr).all():
            raise bad(f"tensor {name} holds NaN/Inf")
    return spec, tensors


def load_adapter(model, path, base_dtype: Optional[str] = None) -> LoRASpec:
    """Apply the adapter file at ``path`` to ``model`` (the base it was trained on), in place.
    ``base_dtype`` overrides the file's (e.g. float32 to merge exactly)."""
    spec, tensors = read_adapter(path, model.config)
    if base_dtype is not None:
        spec = LoRASpec(**{**spec.to_dict(), "base_dtype": base_dtype})
    apply_lora(model, spec)
    model.load_state_dict(tensors, strict=False)
    return spec


def trainable_summary(model) -> tuple[int, int]:
    """(trainable parameters, all parameters' elements)."""
    params = model.parameters()
    return sum(p.size for p in params if p.requires_grad), sum(p.size for p in params)
