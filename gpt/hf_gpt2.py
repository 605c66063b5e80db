"""Hugging Face GPT-2 in both directions: open a GPT-2 folder (config.json, model.safetensors,
the tokenizer's files) as our GPT, and write our GPT as such a folder.

What differs between the two (the rest has GPT-2's names on both sides):

* Hugging Face keys may lack our ``transformer.`` prefix (the hub's gpt2 file does; files that
  ``save_pretrained`` writes carry it); older files add ``attn.bias``/``attn.masked_bias``
  buffers (the causal mask), which carry no weights and are skipped.
* ``Conv1D`` stores its matrix as (in, out): c_attn, c_proj and c_fc are transposed.
* The head is tied to ``wte`` (``tie_word_embeddings``); config.json gives the sizes and
  ``layer_norm_epsilon`` (our ``norm_eps``); the activation is tanh-GELU, as ours.

config.json and the weights are untrusted input: the JSON is read bounded and strict
(gpt.strict_json), every field that would change the architecture is checked, and the tensors'
names, shapes and dtypes are judged from the header before anything is read.

>>> src = open_hf_gpt2("gpt2/")                 # doctest: +SKIP
>>> model = src.build()                          # doctest: +SKIP
>>> export_hf("out/ckpt.safetensors", "gpt2-export/")   # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
import numbers
import re
from pathlib import Path

import numpy as np

from . import strict_json
from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint_metadata, read_safetensors
from .checkpoint_validate import validate_model_meta
from .model import GPTConfig

__all__ = ["open_hf_gpt2", "config_from_hf", "config_to_hf", "from_hf_weights", "to_hf_weights", "export_hf",
           "ExportError"]

MAX_CONFIG_BYTES = 1 << 20  # GPT-2's config.json is under 1 KB
WEIGHTS_FILE = "model.safetensors"
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # the causal mask of older files: no weights
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")  # the names transformers gives 0.5x(1+tanh(...))


class ExportError(ValueError):
    """Our model cannot be written as a Hugging Face GPT-2 (the message says why)."""


# -- config.json -----------------------------------------------------------------------------------------------
def _read_config(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: a Hugging Face GPT-2 folder has config.json beside "
                              f"{WEIGHTS_FILE}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path} is larger than {MAX_CONFIG_BYTES >> 10} KiB; a GPT-2 config.json is "
                              "under 1 KiB, so this is not one")
    try:
        raw = strict_json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def config_from_hf(raw: dict, path="config.json") -> GPTConfig:
    """Our GPTConfig from a GPT-2 config.json's fields; CheckpointError for anything our GPT is not."""
    def bad(key, want):
        return CheckpointError(f"{path}: {key} is {str(raw.get(key))[:60]!r}; {want}")

    if raw.get("model_type", "gpt2") != "gpt2":
        raise bad("model_type", "only GPT-2 (model_type gpt2) is read")

    def integer(key, default=None):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(key, "expected an integer")
        return value

    def flag(key, default):
        value = raw.get(key, default)
        if not isinstance(value, bool):
            raise bad(key, "expected true or false")
        return value

    def prob(key, default):
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
                math.isfinite(value) and 0 <= value < 1):
            raise bad(key, "expected a probability in [0, 1)")
        return float(value)

    n_embd = integer("n_embd", 768)
    if raw.get("activation_function", "gelu_new") not in TANH_GELU:
        raise bad("activation_function", f"this GPT uses tanh-GELU ({' or '.join(TANH_GELU)})")
    if raw.get("n_inner") is not None and integer("n_inner") != 4 * n_embd:
        raise bad("n_inner", f"this GPT's MLP is 4 n_embd = {4 * n_embd} wide (null means that)")
    if not flag("scale_attn_weights", True):
        raise bad("scale_attn_weights", "this GPT scales attention by 1/sqrt(head size) (true)")
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if flag(key, False):
            raise bad(key, "this GPT has neither (false)")
    eps = raw.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise bad("layer_norm_epsilon", "expected a number")
    try:
        return GPTConfig(vocab_size=integer("vocab_size", 50257), block_size=integer("n_positions", 1024),
                         n_layer=integer("n_layer", 12), n_head=integer("n_head", 12), n_embd=n_embd,
                         dropout=prob("resid_pdrop", 0.1), bias=True, norm_eps=float(eps),
                         tie_head=flag("tie_word_embeddings", True))
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def config_to_hf(config: GPTConfig, eos_token_id=None) -> dict:
    """A GPT-2 config.json for our config (checked by :func:`check_exportable`)."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "layer_norm_epsilon": config.norm_eps, "initializer_range": 0.02, "scale_attn_weights": True,
            "use_cache": True, "tie_word_embeddings": config.tie_head,
            "bos_token_id": eos_token_id, "eos_token_id": eos_token_id}


# -- the weights ------------------------------------------------------------------------------------------------
def _ours(hf_name: str, config: GPTConfig):
    """Our state-dict name of a Hugging Face tensor, or None for the mask buffers (and a tied head)."""
    name = hf_name[len("transformer."):] if hf_name.startswith("transformer.") else hf_name
    if BUFFER.fullmatch(name):
        return None
    if name == "lm_head.weight" or hf_name == "lm_head.weight":
        return None if config.tie_head else "lm_head.weight"
    return "transformer." + name


def _transposed(name: str) -> bool:
    return name.startswith("transformer.h.") and name.endswith(CONV1D)


def _expected_hf_shapes(config: GPTConfig) -> dict[str, tuple]:
    """Our name -> the shape Hugging Face stores it in."""
    return {name: tuple(reversed(shape)) if _transposed(name) else tuple(shape)
            for name, shape in config.param_shapes("gpt").items()}


def from_hf_weights(tensors: dict, config: GPTConfig) -> dict[str, np.ndarray]:
    """Hugging Face GPT-2 tensors -> our state dict (float32, Conv1D matrices transposed); empties
    ``tensors`` as it goes."""
    out = {}
    for hf_name in list(tensors):
        value = tensors.pop(hf_name)  # one transposed copy at a time, not a second model's worth
        name = _ours(hf_name, config)
        if name is not None:
            value = np.asarray(value, dtype=np.float32)
            out[name] = np.ascontiguousarray(value.T) if _transposed(name) else value
    return out


def to_hf_weights(state: dict, config: GPTConfig) -> dict[str, np.ndarray]:
    """Our state dict -> Hugging Face GPT-2 tensors (save_pretrained's names): Conv1D matrices
    transposed, and the biases a bias-free model leaves out written as zeros."""
    C = config.n_embd
    zeros = {"attn.c_attn.bias": 3 * C, "attn.c_proj.bias": C, "mlp.c_fc.bias": 4 * C, "mlp.c_proj.bias": C,
             "ln_1.bias": C, "ln_2.bias": C}
    out = {}
    for name, value in state.items():
        value = np.asarray(value, dtype=np.float32)
        out[name] = np.ascontiguousarray(value.T) if _transposed(name) else value
    if not config.bias:
        for i in range(config.n_layer):
            for key, width in zeros.items():
                out[f"transformer.h.{i}.{key}"] = np.zeros(width, np.float32)
        out["transformer.ln_f.bias"] = np.zeros(C, np.float32)
    return out


def _chooser(config: GPTConfig, path):
    """The header check for read_safetensors: exactly the weights ``config`` implies (in float)."""
    expected = _expected_hf_shapes(config)

    def choose(specs):
        mapped, problems = {}, []
        for hf_name, spec in specs.items():
            name = _ours(hf_name, config)
            if name is None:
                continue
            if name not in expected or name in mapped:
                problems.append(f"unexpected tensor {hf_name[:80]!r}")
            elif spec.shape != expected[name]:
                problems.append(f"{hf_name} has shape {spec.shape}, config.json implies {expected[name]}")
            elif spec.dtype.kind != "f":
                problems.append(f"{hf_name} has dtype {spec.dtype}, not floating point")
            mapped[name] = hf_name
        problems += [f"missing {n}" for n in expected if n not in mapped]
        if problems:
            raise CheckpointError(f"{path} does not hold the GPT-2 its config.json describes: "
                                  + "; ".join(problems[:6]) + (" ..." if len(problems) > 6 else ""))
        return list(mapped.values())
    return choose


def open_hf_gpt2(path):
    """A Hugging Face GPT-2 folder (or its model.safetensors) as a gpt.pretrained.Pretrained:
    config and tokenizer read and checked, the header judged; the weights read on demand."""
    from .gpt2_tokenizer import GPT2Tokenizer
    from .pretrained import Pretrained
    from .tokenizer import TokenizerError

    path = Path(path)
    folder, weights = (path, path / WEIGHTS_FILE) if path.is_dir() else (path.parent, path)
    if not weights.is_file():
        other = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.index.json")]
        hint = (f" (found {', '.join(other[:3])}: pickle and sharded files are not read; save the model with "
                "save_pretrained(..., safe_serialization=True) as one file)") if other else ""
        raise CheckpointError(f"{folder} is a directory but not a Hugging Face GPT-2 folder: it has no "
                              f"{WEIGHTS_FILE}{hint}. Pass a checkpoint file (e.g. {folder / 'ckpt.safetensors'}) "
                              "or a GPT-2 folder")
    if not path.is_dir() and not (folder / "config.json").is_file():
        raise CheckpointError(f"{path} is a safetensors file but was not written by gpt.train, and no config.json "
                              "is beside it (as in a Hugging Face GPT-2 folder); pass a checkpoint of gpt.train or "
                              "a GPT-2 folder")
    config = config_from_hf(_read_config(folder / "config.json"), folder / "config.json")
    try:
        tokenizer = GPT2Tokenizer.from_folder(folder)
    except TokenizerError as exc:
        raise CheckpointError(f"{exc} (the tokenizer of the GPT-2 in {folder})") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{folder}: its tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                              f"vocab_size is {config.vocab_size}")
    choose = _chooser(config, weights)

    def header_only(specs):  # judge the header now, so a bad file fails before anything is built
        choose(specs)
        return []
    read_safetensors(weights, header_only)

    def read(convert=None):
        if convert is None:
            return from_hf_weights(read_safetensors(weights, choose)[1], config)

        def ours(hf_name, value):  # each tensor in our layout before convert sees it
            name = _ours(hf_name, config)
            return convert(name, *from_hf_weights({hf_name: value}, config).values())
        return {_ours(k, config): v for k, v in read_safetensors(weights, choose, ours)[1].items()}
    return Pretrained(weights, "hf-gpt2", "gpt", config, tokenizer, {"step": None, "source": "huggingface"}, read)


# -- export ------------------------------------------------------------------------------------------------------
def check_exportable(model_type: str, config: GPTConfig) -> None:
    """GPT-2's architecture only: a GPT with the default options (bias and tie_head may differ:
    missing biases are written as zeros, an untied head as lm_head.weight)."""
    if model_type != "gpt":
        raise ExportError(f"the model is a {model_type!r}; only a GPT can be written as GPT-2")
    defaults = GPTConfig()
    differ = [f"--{name.replace('_', '-')} {getattr(config, name)}" for name in ("pos", "norm", "norm_gain", "mlp",
                                                                                 "qk_norm")
              if getattr(config, name) != getattr(defaults, name)]
    if differ:
        raise ExportError(f"the model uses {', '.join(differ)}, which GPT-2 lacks; only models trained with the "
                          "default architecture options (learned positions, layernorm with gain, gelu MLP, no "
                          "qk-norm) can be written as GPT-2")


def export_hf(checkpoint, out_dir) -> list[Path]:
    """Write our checkpoint as a Hugging Face GPT-2 folder: config.json, model.safetensors and,
    for a GPT-2 tokenizer, vocab.json + merges.txt. Returns the files written."""
    from safetensors.numpy import save as safetensors_save

    from .atomic import atomic_write_bytes
    from .gpt2_tokenizer import GPT2Tokenizer

    meta, specs = read_checkpoint_metadata(checkpoint)
    model_type, config, tokenizer = validate_model_meta(meta, checkpoint, specs)
    check_exportable(model_type, config)
    tensors, _ = load_checkpoint(checkpoint, names=config.param_shapes(model_type))
    eos = tokenizer.special_ids.get("<|endoftext|>") if isinstance(tokenizer, GPT2Tokenizer) else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    blob = safetensors_save(to_hf_weights(tensors, config), metadata={"format": "pt"})  # transformers needs "pt"
    atomic_write_bytes(out / WEIGHTS_FILE, blob)
    atomic_write_bytes(out / "config.json", (json.dumps(config_to_hf(config, eos), indent=2) + "\n").encode())
    written = [out / "config.json", out / WEIGHTS_FILE]
    if isinstance(tokenizer, GPT2Tokenizer):
        tokenizer.save_files(out)
        written += [out / "vocab.json", out / "merges.txt"]
    return written
