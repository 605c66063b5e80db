"""Int8 weight-only quantization for sampling: ``python -m gpt.sample --quantize int8``.

Every matrix of the blocks (c_attn, c_proj, c_fc) and the token embedding / LM head is stored
as int8 with one float32 scale per output row (``scale = max|row| / 127``, symmetric, so zero
stays exactly zero); norms, biases and the position table stay float32. Weights take a
quarter of the memory, and decoding, which reads every weight once per token, reads a quarter
of the bytes.

The products go through :func:`int8_matmul`: for a few rows of activations (decoding) the
Numba kernel ``tinytensor.kernels.quant`` that converts int8 to float32 inside the dot products
(both cores, no float copy of the matrix; Numba, a core dependency, may still be missing or
disabled with TINYTENSOR_KERNELS=0); otherwise (a prompt, no
Numba, CuPy) the matrix is dequantized by blocks of rows into a small float32 buffer and
multiplied with BLAS, so no full float32 copy exists at any time.

>>> model, tokenizer, meta = load_model("gpt2/")   # doctest: +SKIP
>>> quantize_int8(model)                           # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np

import tinytensor as tt
from tinytensor import kernels, nn
from tinytensor.ops.quant import dequantize_blockwise, quantize_blockwise

__all__ = ["QUANTIZATIONS", "quantize_rows", "dequantize_rows", "int8_matmul", "Int8Linear", "Int8Embedding",
           "quantize_int8", "load_int8", "float32_bytes", "weight_bytes", "numba_available"]

QUANTIZATIONS = ("none", "int8")  # gpt.sample's --quantize choices
BLOCK_ROWS = 512  # rows dequantized at a time on the BLAS path: 512 x 3072 float32 = 6 MB at most


QUANTIZE_CHUNK = 4096  # rows quantized at a time: the quantizer's float temporaries stay ~10 MB


def quantize_rows(w):
    """(int8 q, float32 scale) with w ~= q * scale[:, None], one scale per row of w (out, in):
    the QLoRA bases' blockwise int8 (tinytensor.ops.quant) with one block per row, by chunks of
    rows (rows are independent: the same arrays as in one go, without a few float copies of a
    154 MB head at once)."""
    xp = tt.backend.xp_of(w)
    q, scale = xp.empty(w.shape, np.int8), xp.empty(w.shape[0], np.float32)
    for start in range(0, w.shape[0], QUANTIZE_CHUNK):
        rows = slice(start, start + QUANTIZE_CHUNK)
        q[rows], s = quantize_blockwise(w[rows], bits=8, block=w.shape[1])
        scale[rows] = s[:, 0]
    return q, scale


def dequantize_rows(q, scale):
    return dequantize_blockwise(q, scale[:, None], 8, q.shape[1])


# -- the products ---------------------------------------------------------------------------------------------
def numba_available() -> bool:
    """Whether the Numba int8 kernel (tinytensor.kernels.quant) is in use."""
    return kernels.quant_module() is not None


def int8_matmul(x, q, scale):
    """x (..., K) float32 @ (q * scale[:, None]).T -> (..., N) float32, never building the float matrix.
    A few rows (decoding): the int8 kernel; more (a prompt), no Numba, or CuPy: dequantized blocks
    of rows and BLAS."""
    xp = tt.backend.xp_of(x)
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.dtype != np.float32:
        x2 = x2.astype(np.float32)
    out = xp.empty((x2.shape[0], q.shape[0]), np.float32)
    quant = kernels.quant_module() if xp is np else None
    if quant is not None and x2.shape[0] <= quant.MAX_ROWS:
        quant.int8_matmul(np.ascontiguousarray(x2), q, scale.reshape(-1, 1), out)
    else:
        for start in range(0, q.shape[0], BLOCK_ROWS):
            stop = min(start + BLOCK_ROWS, q.shape[0])
            xp.matmul(x2, q[start:stop].astype(np.float32).T, out=out[:, start:stop])
        out *= scale
    return out.reshape(*lead, q.shape[0])


# -- the modules --------------------------------------------------------------------------------------------------
class Int8Linear(nn.Module):
    """nn.Linear for inference with int8 weights; its output records no graph."""

    def __init__(self, q, scale, bias=None):
        super().__init__()
        self.q, self.scale, self.bias_data = q, scale, bias

    @classmethod
    def from_weight(cls, weight, bias=None):
        return cls(*quantize_rows(weight), bias)

    def forward(self, x):
        y = int8_matmul(x.data, self.q, self.scale)
        if self.bias_data is not None:
            y += self.bias_data
        return tt.Tensor(y)


class Int8Embedding(nn.Module):
    """nn.Embedding with int8 rows (the same q and scale serve a tied head)."""

    def __init__(self, q, scale):
        super().__init__()
        self.q, self.scale = q, scale
        # what KVCache takes its backend and dtype from (GPT.new_cache): an empty float32 tensor
        self.weight = tt.Tensor(tt.backend.xp_of(q).empty((0,), np.float32))

    def forward(self, idx):
        idx = idx.data if isinstance(idx, tt.Tensor) else idx
        xp = tt.backend.xp_of(self.q)
        # checked where the ids are (on the host when they come from there: no read back from a GPU)
        lo, hi = int(idx.min(initial=0)), int(idx.max(initial=0))
        if lo < 0 or hi >= self.q.shape[0]:
            raise ValueError(f"token ids must be in [0, {self.q.shape[0]}), got {lo}..{hi}")
        ids = xp.asarray(idx)
        return tt.Tensor(self.q[ids].astype(np.float32) * self.scale[ids][..., None])


def load_int8(src, backend: str = "numpy"):
    """The int8 model of a gpt.pretrained.Pretrained, quantized while it is read: each matrix is
    turned into int8 rows as soon as it comes off the file, so the float model never exists
    (peak memory: the int8 model plus one float matrix). Same arrays as quantize_int8(src.build()).

    >>> model = load_int8(open_pretrained("gpt2/"))   # doctest: +SKIP
    """
    from .model import GPT

    if src.model_type != "gpt" or backend != "numpy":  # (int8 layers move to a GPU only as they are built)
        return quantize_int8(src.build(backend))
    names = set(_matrix_names(src.config))
    rows = {}

    def convert(name, array):
        if name not in names:
            return array
        rows[name] = quantize_rows(array)
        return np.broadcast_to(np.float32(0), array.shape)  # the layer's shape, no memory: replaced below
    model = src.build("numpy", convert)
    assert isinstance(model, GPT)
    return quantize_int8(model, rows)


def _matrix_names(config):
    """The state-dict names of the matrices quantize_int8 turns into int8."""
    names = [f"transformer.h.{i}.{m}.weight" for i in range(config.n_layer)
             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    return names + ["transformer.wte.weight"] + ([] if config.tie_head else ["lm_head.weight"])


def quantize_int8(model, rows=None):
    """Replace a GPT's block matrices and token embedding / head by int8 ones, in place; returns it.
    Only for sampling (no gradients); a bigram model is left as it is. Each float matrix is dropped
    as soon as its int8 copy exists, and the freed memory goes back to the system at the end, so a
    sampling process never holds both models. ``rows``: name -> (q, scale) already quantized
    (load_int8), used instead of the layer's float weight."""
    from .model import GPT

    if not isinstance(model, GPT) or isinstance(model.transformer.wte, Int8Embedding):
        return model  # (a bigram model, or already int8)
    rows = rows or {}

    def int8(name, weight):
        return rows.pop(name) if name in rows else quantize_rows(weight.data)
    model.eval()
    for i, block in enumerate(model.transformer.h):
        for owner, name, path in ((block.attn, "c_attn", "attn.c_attn"), (block.attn, "c_proj", "attn.c_proj"),
                                  (block.mlp, "c_fc", "mlp.c_fc"), (block.mlp, "c_proj", "mlp.c_proj")):
            linear = getattr(owner, name)
            setattr(owner, name, Int8Linear(*int8(f"transformer.h.{i}.{path}.weight", linear.weight),
                                            None if linear.bias is None else linear.bias.data))
    q, scale = int8("transformer.wte.weight", model.transformer.wte.weight)
    model.transformer.wte = Int8Embedding(q, scale)
    if model.config.tie_head:
        model.head = Int8Linear(q, scale)  # shadows GPT.head: the tied head reads the same int8 rows
    else:
        model.head = Int8Linear(*int8("lm_head.weight", model.lm_head.weight))
        del model._modules["lm_head"]
        object.__delattr__(model, "lm_head")
    tt.memory.release_freed_memory()
    quant = kernels.quant_module() if tt.backend.xp_of(q) is np else None
    if quant is not None:
        quant.warm_up()  # loaded (or compiled) now, not inside the first token
    return model


def weight_bytes(model) -> int:
    """Bytes of the model's weights as stored: float parameters plus int8 matrices and their scales."""
    seen, total = set(), 0
    for _, module in model.named_modules():
        arrays = [p.data for p in module._parameters.values()]
        if isinstance(module, (Int8Linear, Int8Embedding)):
            arrays += [module.q, module.scale] + ([module.bias_data] if getattr(module, "bias_data", None)
                                                  is not None else [])
        for a in arrays:
            if id(a) not in seen:
                seen.add(id(a))
                total += a.nbytes
    return total


def float32_bytes(model) -> int:
    """Bytes the model's weights take in float32 (what int8 is measured against)."""
    from .model import GPT
    return 4 * model.config.num_parameters("gpt" if isinstance(model, GPT) else "bigram")
