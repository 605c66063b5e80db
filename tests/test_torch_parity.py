"""Every primitive against PyTorch: same inputs, same upstream gradient, same outputs and input grads.

Each case gives the inputs (as NumPy arrays), a tinytensor function and the PyTorch
function that should compute the same thing. The test runs both forward, backpropagates
the same random upstream gradient through both, and compares the output and the
gradient of every floating-point input, in float64 (rtol 1e-6, atol 1e-9) and float32
(rtol 1e-4, atol 1e-5). ``test_every_primitive_has_a_case`` fails when a primitive is
registered without a case here (or an explicit reason why torch has no equivalent),
and each case checks that its graph really goes through the primitive it is listed under.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.functional as F

from engine_strategies import normal

torch = pytest.importorskip("torch")
TF = torch.nn.functional

TOL = {np.float64: dict(rtol=1e-6, atol=1e-9), np.float32: dict(rtol=1e-4, atol=1e-5)}


@dataclass
class Case:
    id: str
    make: Callable  # rng -> list of float64 / int / bool arrays
    tt_fn: Callable  # tinytensor Tensors -> Tensor
    torch_fn: Callable  # torch tensors -> torch tensor
    in_graph: bool = True  # the primitive shows up in the recorded graph (not for ops on non-grad inputs)


def normal_inputs(*shapes):
    """A Case's ``make``: one standard-normal array per shape, drawn from the case's generator."""
    return lambda r: [normal(r, s) for s in shapes]


def positive_inputs(*shapes):
    """A Case's ``make``: one array per shape, uniform in [0.2, 3)."""
    return lambda r: [r.uniform(0.2, 3.0, s) for s in shapes]


def _ties(r):
    x = r.integers(0, 3, size=(3, 4, 5)).astype(np.float64)  # many ties within every slice
    x[0, 0, :] = 2.0  # a whole slice tied
    return [x]


def _relu_input(r):
    x = r.standard_normal((3, 5))
    x[0, :2] = 0.0  # torch: relu'(0) = 0
    return [x]


def _extreme(r):
    x = r.standard_normal((4, 6)) * 3
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = 60.0, -60.0, 30.0, -30.0
    return [x]


def _cond(shape):
    return lambda r: [r.random(shape) > 0.5]


def _where_case(cshape, ashape, bshape):
    return lambda r: _cond(cshape)(r) + [r.standard_normal(ashape), r.standard_normal(bshape)]


def _ce_targets(shape, C, ignore=True):
    def make(r):
        logits = r.standard_normal(shape + (C,)) * 2
        t = r.integers(0, C, size=shape)
        if ignore:
            t.reshape(-1)[::3] = -1
        return [logits, t.astype(np.int64)]
    return make


def _causal_mask_lower_right(tq, tk):
    return torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)


def _torch_mha(n_head, causal=True):
    def fn(qkv):
        B, T, C3 = qkv.shape
        q, k, v = (t.reshape(B, T, n_head, C3 // 3 // n_head).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
        y = TF.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return y.transpose(1, 2).reshape(B, T, C3 // 3)
    return fn


def _quantized(bits):
    from tinytensor.ops.quant import quantize_blockwise
    return quantize_blockwise(np.random.default_rng(bits).standard_normal((5, 8)).astype(np.float32), bits, 4)


def _dequantized(qs, bits, block, like):
    from tinytensor.ops.quant import dequantize_blockwise
    return torch.from_numpy(dequantize_blockwise(*qs, bits, block, np.float64)).to(like.dtype)


_Q8, _Q4 = _quantized(8), _quantized(4)


def _rope_angles(T, hs):
    """RoPE's (T, 1, hs/2) angles in float64 (gpt.model.rope_tables' formula, positions from 3)."""
    inv_freq = 10000.0 ** (-np.arange(0, hs, 2) / hs)
    return (np.arange(3, 3 + T)[:, None, None] * inv_freq)


def _rope_tt(a):
    """cos, sin tensors for a packed (B, T, 3C) input with hs 4, in its dtype (constants: no gradient)."""
    angles = _rope_angles(a.shape[1], 4)
    return tt.tensor(np.cos(angles).astype(a.dtype)), tt.tensor(np.sin(angles).astype(a.dtype))


def _torch_qk_norm_rope(qkv, n_head, qk_norm, rope):
    """QK-norm and RoPE composed in torch on the packed projection, as bench/torch_gpt.py does."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = qkv.split(C, dim=-1)
    q, k = (t.reshape(B, T, n_head, hs) for t in (q, k))
    if qk_norm:
        q, k = (TF.rms_norm(t, (hs,), eps=1e-5) for t in (q, k))
    if rope:
        angles = torch.from_numpy(_rope_angles(T, hs)).to(qkv.dtype)
        cos, sin = angles.cos(), angles.sin()

        def rotate(x):
            x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        q, k = rotate(q), rotate(k)
    return torch.cat([q.reshape(B, T, C), k.reshape(B, T, C), v], dim=-1)


def _sdpa(causal, **kw):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal, **kw)


CASES: dict[str, list[Case]] = {
    "add": [
        Case("same", normal_inputs((3, 4), (3, 4)), lambda a, b: a + b, lambda a, b: a + b),
        Case("broadcast", normal_inputs((2, 1, 4), (3, 1)), lambda a, b: a + b, lambda a, b: a + b),
        Case("size1", normal_inputs((1, 5), (1, 1)), lambda a, b: a + b, lambda a, b: a + b),
        Case("scalar", normal_inputs((3, 4), ()), lambda a, b: a + b, lambda a, b: a + b),
    ],
    "mul": [
        Case("same", normal_inputs((3, 4), (3, 4)), lambda a, b: a * b, lambda a, b: a * b),
        Case("broadcast", normal_inputs((2, 3, 1), (1, 4)), lambda a, b: a * b, lambda a, b: a * b),
        Case("self", normal_inputs((4,)), lambda a: a * a, lambda a: a * a),
        Case("python_number", normal_inputs((2, 3)), lambda a: a * 0.5, lambda a: a * 0.5),
    ],
    "neg": [
        Case("2d", normal_inputs((3, 4)), lambda a: -a, lambda a: -a),
        Case("size1", normal_inputs((1, 4, 1)), lambda a: -a, lambda a: -a),
    ],
    "pow": [
        Case("square", normal_inputs((3, 4)), lambda a: a ** 2, lambda a: a ** 2),
        Case("cube_size1", normal_inputs((1, 5)), lambda a: a ** 3, lambda a: a ** 3),
        Case("sqrt", positive_inputs((4, 3)), lambda a: a ** 0.5, lambda a: a ** 0.5),
        Case("neg_frac", positive_inputs((2, 3)), lambda a: a ** -1.5, lambda a: a ** -1.5),
    ],
    "exp": [
        Case("2d", normal_inputs((3, 4)), F.exp, torch.exp),
        Case("size1", normal_inputs((1, 3, 1)), F.exp, torch.exp),
    ],
    "log": [
        Case("2d", positive_inputs((3, 4)), F.log, torch.log),
        Case("size1", positive_inputs((1, 6)), F.log, torch.log),
    ],
    "tanh": [
        Case("2d", normal_inputs((3, 4)), F.tanh, torch.tanh),
        Case("extreme", _extreme, F.tanh, torch.tanh),
    ],
    "sigmoid": [
        Case("2d", normal_inputs((3, 4)), F.sigmoid, torch.sigmoid),
        Case("extreme", _extreme, F.sigmoid, torch.sigmoid),
    ],
    "relu": [
        Case("with_zeros", _relu_input, F.relu, torch.relu),
        Case("size1", normal_inputs((1, 1, 4)), F.relu, torch.relu),
    ],
    "sum": [
        Case("all", normal_inputs((3, 4)), lambda a: a.sum(), lambda a: a.sum()),
        Case("axis1", normal_inputs((2, 3, 4)), lambda a: a.sum(axis=1), lambda a: a.sum(dim=1)),
        Case("axes_keepdims", normal_inputs((2, 3, 4)), lambda a: a.sum(axis=(0, 2), keepdims=True),
             lambda a: a.sum(dim=(0, 2), keepdim=True)),
        Case("neg_axis_size1", normal_inputs((3, 1)), lambda a: a.sum(axis=-1), lambda a: a.sum(dim=-1)),
    ],
    "max": [
        Case("all", normal_inputs((3, 4)), lambda a: a.max(), lambda a: torch.amax(a)),
        Case("axis", normal_inputs((2, 3, 4)), lambda a: a.max(axis=1), lambda a: torch.amax(a, dim=1)),
        Case("ties_axis", _ties, lambda a: a.max(axis=-1), lambda a: torch.amax(a, dim=-1)),
        Case("ties_axes_keepdims", _ties, lambda a: a.max(axis=(0, 2), keepdims=True),
             lambda a: torch.amax(a, dim=(0, 2), keepdim=True)),
        Case("ties_all", _ties, lambda a: a.max(), lambda a: torch.amax(a)),
        Case("size1", normal_inputs((1, 5)), lambda a: a.max(axis=0), lambda a: torch.amax(a, dim=0)),
    ],
    "reshape": [
        Case("merge", normal_inputs((2, 3, 4)), lambda a: a.reshape(6, 4), lambda a: a.reshape(6, 4)),
        Case("infer", normal_inputs((2, 3, 4)), lambda a: a.reshape(-1, 2), lambda a: a.reshape(-1, 2)),
        Case("size1", normal_inputs((4, 1)), lambda a: a.reshape(1, 2, 2), lambda a: a.reshape(1, 2, 2)),
        Case("to_scalar", normal_inputs((1, 1)), lambda a: a.reshape(()), lambda a: a.reshape(())),
        Case("of_transpose", normal_inputs((3, 4)), lambda a: a.T.reshape(12), lambda a: a.T.reshape(12)),
    ],
    "permute": [
        Case("3d", normal_inputs((2, 3, 4)), lambda a: a.permute(2, 0, 1), lambda a: a.permute(2, 0, 1)),
        Case("neg_axes", normal_inputs((2, 3, 4)), lambda a: a.permute(-1, -3, -2), lambda a: a.permute(-1, -3, -2)),
        Case("transpose_size1", normal_inputs((1, 3, 5)), lambda a: a.transpose(0, 2), lambda a: a.transpose(0, 2)),
        Case("T", normal_inputs((3, 4)), lambda a: a.T, lambda a: a.T),
    ],
    "get_item": [
        Case("int", normal_inputs((3, 4)), lambda a: a[1], lambda a: a[1]),
        Case("slices", normal_inputs((4, 5, 3)), lambda a: a[1:, ::2, -1], lambda a: a[1:, ::2, -1]),
        Case("none_ellipsis", normal_inputs((2, 3, 4)), lambda a: a[None, ..., 1:3], lambda a: a[None, ..., 1:3]),
        Case("int_array_repeats", normal_inputs((4, 3)), lambda a: a[np.array([0, 2, 0, 0])],
             lambda a: a[torch.tensor([0, 2, 0, 0])]),
        Case("bool_mask", normal_inputs((4, 3)), lambda a: a[np.array([True, False, True, True])],
             lambda a: a[torch.tensor([True, False, True, True])]),
        Case("mixed", normal_inputs((4, 5)), lambda a: a[np.array([3, 1, 3]), 1:4],
             lambda a: a[torch.tensor([3, 1, 3]), 1:4]),
        Case("two_arrays", normal_inputs((4, 5)), lambda a: a[np.array([0, 0, 2]), np.array([1, 1, 4])],
             lambda a: a[torch.tensor([0, 0, 2]), torch.tensor([1, 1, 4])]),
        Case("reverse", normal_inputs((4, 2)), lambda a: a[::-1], lambda a: a.flip(0)),
    ],
    "cat": [
        Case("axis0", normal_inputs((2, 3), (4, 3)), lambda a, b: tt.cat([a, b]), lambda a, b: torch.cat([a, b])),
        Case("axis_neg_three", normal_inputs((2, 1), (2, 3), (2, 2)), lambda a, b, c: tt.cat([a, b, c], axis=-1),
             lambda a, b, c: torch.cat([a, b, c], dim=-1)),
        Case("same_twice", normal_inputs((2, 3)), lambda a: tt.cat([a, a], axis=1), lambda a: torch.cat([a, a], dim=1)),
    ],
    "mat_mul": [
        Case("2d", normal_inputs((3, 4), (4, 5)), lambda a, b: a @ b, lambda a, b: a @ b),
        Case("size1", normal_inputs((1, 4), (4, 1)), lambda a, b: a @ b, lambda a, b: a @ b),
        Case("batched", normal_inputs((2, 3, 4), (2, 4, 5)), lambda a, b: a @ b, lambda a, b: a @ b),
        Case("batched_broadcast", normal_inputs((2, 1, 3, 4), (5, 4, 2)), lambda a, b: a @ b, lambda a, b: a @ b),
        Case("matrix_times_batch", normal_inputs((3, 4), (2, 4, 5)), lambda a, b: a @ b, lambda a, b: a @ b),
        Case("vec_mat", normal_inputs((4,), (2, 4, 5)), lambda a, b: a @ b, lambda a, b: a @ b),
        Case("mat_vec", normal_inputs((2, 3, 4), (4,)), lambda a, b: a @ b, lambda a, b: a @ b),
        Case("vec_vec", normal_inputs((4,), (4,)), lambda a, b: a @ b, lambda a, b: a @ b),
    ],
    "where": [
        Case("same", _where_case((3, 4), (3, 4), (3, 4)), tt.where, torch.where),
        Case("broadcast", _where_case((3, 4), (3, 1), (1, 4)), tt.where, torch.where),
        Case("cond_broadcast", _where_case((1, 4), (3, 4), (3, 4)), tt.where, torch.where),
        Case("scalar_other", _where_case((2, 5), (2, 5), ()), tt.where, torch.where),
        Case("python_number", lambda r: _cond((3, 4))(r) + [r.standard_normal((3, 4))],
             lambda c, a: tt.where(c, a, 0.0), lambda c, a: torch.where(c, a, 0.0)),
    ],
    "cast": [
        Case("to_other_float", normal_inputs((3, 4)),
             lambda a: a.astype(np.float32 if a.dtype == np.float64 else np.float64),
             lambda a: a.to(torch.float32 if a.dtype == torch.float64 else torch.float64)),
        Case("to_same", normal_inputs((2, 3)), lambda a: a.astype(a.dtype), lambda a: a.to(a.dtype)),
        Case("to_int", lambda r: [r.standard_normal((3, 4)) * 5], lambda a: a.astype(np.int64),
             lambda a: a.to(torch.int64), in_graph=False),  # an int result records nothing, as in torch
        Case("to_int_and_back", lambda r: [r.standard_normal((3, 4)) * 5],
             lambda a: a.astype(np.int64).astype(a.dtype) * a, lambda a: a.to(torch.int64).to(a.dtype) * a,
             in_graph=False),
        Case("from_int", lambda r: [r.integers(-5, 5, (3, 4)), r.standard_normal((3, 4))],
             lambda i, a: i.astype(a.dtype) * a, lambda i, a: i.to(a.dtype) * a, in_graph=False),
    ],
    "softmax": [
        Case("last", normal_inputs((3, 5)), F.softmax, lambda a: torch.softmax(a, dim=-1)),
        Case("axis0", normal_inputs((4, 3, 2)), lambda a: F.softmax(a, axis=0), lambda a: torch.softmax(a, dim=0)),
        Case("size1", normal_inputs((3, 1)), F.softmax, lambda a: torch.softmax(a, dim=-1)),
        Case("extreme", _extreme, F.softmax, lambda a: torch.softmax(a, dim=-1)),
    ],
    "log_softmax": [
        Case("last", normal_inputs((3, 5)), F.log_softmax, lambda a: torch.log_softmax(a, dim=-1)),
        Case("axis1", normal_inputs((2, 4, 3)), lambda a: F.log_softmax(a, axis=1),
             lambda a: torch.log_softmax(a, dim=1)),
        Case("size1", normal_inputs((1, 4)), F.log_softmax, lambda a: torch.log_softmax(a, dim=-1)),
        Case("extreme", _extreme, F.log_softmax, lambda a: torch.log_softmax(a, dim=-1)),
    ],
    "layer_norm": [
        Case("affine", lambda r: [r.standard_normal((2, 3, 8)) * 3 + 1, 1 + 0.3 * r.standard_normal(8),
                                  r.standard_normal(8)],
             lambda x, w, b: F.layer_norm(x, w, b), lambda x, w, b: TF.layer_norm(x, (8,), w, b)),
        Case("plain", normal_inputs((4, 6)), F.layer_norm, lambda x: TF.layer_norm(x, (6,))),
        Case("weight_only", normal_inputs((3, 5), (5,)), lambda x, w: F.layer_norm(x, w),
             lambda x, w: TF.layer_norm(x, (5,), w)),
        Case("bias_only", normal_inputs((3, 5), (5,)), lambda x, b: F.layer_norm(x, bias=b),
             lambda x, b: TF.layer_norm(x, (5,), None, b)),
        Case("size1_eps", normal_inputs((1, 7), (7,), (7,)), lambda x, w, b: F.layer_norm(x, w, b, eps=1e-3),
             lambda x, w, b: TF.layer_norm(x, (7,), w, b, eps=1e-3)),
        Case("vector", normal_inputs((6,), (6,), (6,)), lambda x, w, b: F.layer_norm(x, w, b),
             lambda x, w, b: TF.layer_norm(x, (6,), w, b)),
    ],
    "cross_entropy": [
        Case("2d_ignore", _ce_targets((7,), 5), F.cross_entropy,
             lambda x, t: TF.cross_entropy(x, t, ignore_index=-1)),
        Case("2d_all_valid", _ce_targets((6,), 4, ignore=False), F.cross_entropy,
             lambda x, t: TF.cross_entropy(x, t, ignore_index=-1)),
        Case("3d_ignore", _ce_targets((2, 5), 3), F.cross_entropy,
             lambda x, t: TF.cross_entropy(x.reshape(-1, 3), t.reshape(-1), ignore_index=-1)),
        Case("one_row", _ce_targets((1,), 6, ignore=False), F.cross_entropy,
             lambda x, t: TF.cross_entropy(x, t, ignore_index=-1)),
    ],
    "rms_norm": [
        Case("weight", normal_inputs((2, 3, 8), (8,)), lambda x, w: F.rms_norm(x, w),
             lambda x, w: TF.rms_norm(x, (8,), w, eps=1e-5)),
        Case("plain_eps", normal_inputs((4, 6)), lambda x: F.rms_norm(x, eps=1e-3),
             lambda x: TF.rms_norm(x, (6,), eps=1e-3)),
    ],
    "relu_squared": [
        Case("2d", _relu_input, F.relu_squared, lambda a: TF.relu(a) ** 2),
    ],
    "swiglu": [
        Case("3d", normal_inputs((2, 3, 10)), F.swiglu, lambda h: TF.silu(h[..., :5]) * h[..., 5:]),
    ],
    "qk_norm_rope": [
        Case("norm_rope", normal_inputs((2, 5, 24)), lambda a: F.qk_norm_rope(a, 2, _rope_tt(a), True),
             lambda a: _torch_qk_norm_rope(a, 2, True, True)),
        Case("rope", normal_inputs((2, 5, 24)), lambda a: F.qk_norm_rope(a, 2, _rope_tt(a), False),
             lambda a: _torch_qk_norm_rope(a, 2, False, True)),
        Case("norm", normal_inputs((1, 3, 12)), lambda a: F.qk_norm_rope(a, 1, None, True),
             lambda a: _torch_qk_norm_rope(a, 1, True, False)),
    ],
    "gelu": [
        Case("2d", normal_inputs((3, 4)), F.gelu, lambda a: TF.gelu(a, approximate="tanh")),
        Case("extreme", _extreme, F.gelu, lambda a: TF.gelu(a, approximate="tanh")),
        Case("size1", normal_inputs((1, 5)), F.gelu, lambda a: TF.gelu(a, approximate="tanh")),
    ],
    "embedding": [
        Case("2d_idx_repeats", lambda r: [np.array([[0, 2, 2], [4, 0, 2]]), r.standard_normal((5, 3))],
             F.embedding, TF.embedding),
        Case("1d_idx", lambda r: [np.array([1, 1, 1, 3]), r.standard_normal((4, 6))], F.embedding, TF.embedding),
        Case("size1", lambda r: [np.array([[0]]), r.standard_normal((1, 2))], F.embedding, TF.embedding),
    ],
    "linear": [
        Case("bias_3d", normal_inputs((2, 3, 4), (5, 4), (5,)), F.linear, TF.linear),
        Case("no_bias", normal_inputs((6, 4), (3, 4)), F.linear, TF.linear),
        Case("vector_in", normal_inputs((4,), (2, 4), (2,)), F.linear, TF.linear),
        Case("size1", normal_inputs((1, 1, 3), (1, 3), (1,)), F.linear, TF.linear),
    ],
    "quantized_linear": [  # against torch's linear with the weight dequantized (the frozen constant)
        Case("int8_bias", normal_inputs((2, 3, 8), (5,)), lambda x, b: F.quantized_linear(x, *_Q8, 8, 4, b),
             lambda x, b: TF.linear(x, _dequantized(_Q8, 8, 4, x), b)),
        Case("int4", normal_inputs((6, 8)), lambda x: F.quantized_linear(x, *_Q4, 4, 4),
             lambda x: TF.linear(x, _dequantized(_Q4, 4, 4, x))),
    ],
    "lora_linear": [  # against torch's linear plus the two thin products (the composed LoRA layer)
        Case("float_bias", normal_inputs((2, 3, 8), (5, 8), (2, 8), (5, 2), (5,)),
             lambda x, w, a, b, c: F.lora_linear(x, w, a, b, c, scaling=1.5),
             lambda x, w, a, b, c: TF.linear(x, w, c) + 1.5 * TF.linear(TF.linear(x, a), b)),
        Case("int4", normal_inputs((6, 8), (3, 8), (5, 3)),
             lambda x, a, b: F.lora_linear(x, None, a, b, scaling=0.5, quant=(*_Q4, 4, 4)),
             lambda x, a, b: TF.linear(x, _dequantized(_Q4, 4, 4, x)) + 0.5 * TF.linear(TF.linear(x, a), b)),
    ],
    "scaled_dot_product_attention": [
        Case("causal", normal_inputs((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 4)), _sdpa(True),
             lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True)),
        Case("full", normal_inputs((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 6)), _sdpa(False),
             lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=False)),
        Case("full_tq_ne_tk", normal_inputs((2, 3, 4), (2, 6, 4), (2, 6, 5)), _sdpa(False),
             lambda q, k, v: TF.scaled_dot_product_attention(q, k, v)),
        # our causal mask aligns the queries with the last keys (KV-cache decoding); torch's
        # is_causal aligns them with the first, so compare against the explicit lower-right mask
        Case("causal_tq_lt_tk", normal_inputs((1, 2, 3, 4), (1, 2, 6, 4), (1, 2, 6, 4)), _sdpa(True),
             lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask_lower_right(3, 6))),
        Case("causal_scale", normal_inputs((1, 4, 8), (1, 4, 8), (1, 4, 8)), _sdpa(True, scale=0.3),
             lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)),
        Case("broadcast_kv", normal_inputs((2, 3, 4, 4), (1, 3, 4, 4), (1, 3, 4, 4)), _sdpa(True),
             lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True)),
        Case("single_query", normal_inputs((2, 1, 4), (2, 1, 4), (2, 1, 4)), _sdpa(True),
             lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, is_causal=True)),
    ],
    "multi_head_attention": [
        Case("causal_4_heads", normal_inputs((2, 5, 24)), lambda x: F.multi_head_attention(x, 4), _torch_mha(4)),
        Case("full_1_head", normal_inputs((3, 4, 6)), lambda x: F.multi_head_attention(x, 1, causal=False),
             _torch_mha(1, causal=False)),
        Case("one_token", normal_inputs((2, 1, 12)), lambda x: F.multi_head_attention(x, 2), _torch_mha(2)),
    ],
    # composites (no primitive of their own), compared all the same
    "var": [
        Case("all", normal_inputs((3, 4)), lambda a: a.var(), lambda a: a.var()),
        Case("axis", normal_inputs((3, 4, 2)), lambda a: a.var(axis=1), lambda a: a.var(dim=1)),
        Case("keepdims_correction0", normal_inputs((3, 4)), lambda a: F.var(a, axis=-1, keepdims=True, correction=0),
             lambda a: torch.var(a, dim=-1, keepdim=True, correction=0)),
        Case("axes", normal_inputs((2, 3, 4)), lambda a: a.var(axis=(0, 2)), lambda a: a.var(dim=(0, 2))),
    ],
    "mean": [
        Case("axis", normal_inputs((3, 4)), lambda a: a.mean(axis=0), lambda a: a.mean(dim=0)),
        Case("all", normal_inputs((2, 1, 3)), lambda a: a.mean(), lambda a: a.mean()),
    ],
    "sub_div": [
        Case("broadcast", lambda r: [r.standard_normal((2, 3)), r.uniform(0.5, 2, (3,))],
             lambda a, b: (a - b) / b - 1.0 / a.exp() + 2 - a, lambda a, b: (a - b) / b - 1.0 / a.exp() + 2 - a),
    ],
    "sqrt": [
        Case("2d", positive_inputs((3, 4)), lambda a: a.sqrt(), torch.sqrt),
    ],
}

# primitives that torch has no deterministic equivalent for, and why; each is checked another way below
NO_TORCH_EQUIVALENT = {
    "dropout": "the mask is random and drawn from tinytensor's own generator; test_dropout checks the "
               "statistics and compares against torch using the very mask tinytensor drew",
}

PARAMS = [pytest.param(name, case, id=f"{name}-{case.id}") for name, cases in CASES.items() for case in cases]
DTYPES = [pytest.param(np.float64, id="f64"), pytest.param(np.float32, id="f32")]
TORCH_DTYPE = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32,
               np.dtype(np.int64): torch.int64, np.dtype(np.bool_): torch.bool}


def test_every_primitive_has_a_case():
    missing = sorted(set(tt.PRIMITIVES) - set(CASES) - set(NO_TORCH_EQUIVALENT))
    assert not missing, f"primitives with no torch parity case: {missing}"
    assert not set(CASES) & set(NO_TORCH_EQUIVALENT)
    assert set(NO_TORCH_EQUIVALENT) <= set(tt.PRIMITIVES)


def _primitives_in_graph(out):
    seen, names, stack = set(), set(), [out]
    while stack:
        node = stack.pop()
        if id(node) in seen or node._ctx is None:
            continue
        seen.add(id(node))
        names.add(node._ctx.name)
        stack.extend(node._ctx.parents)
    return names


def _inputs(case, dtype, seed):
    arrays = case.make(np.random.default_rng(seed))
    return [a.astype(dtype) if np.issubdtype(a.dtype, np.floating) else a for a in arrays]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,case", PARAMS)
def test_parity(name, case, dtype):
    arrays = _inputs(case, dtype, seed=zlib.crc32(f"{name}-{case.id}".encode()))
    is_float = [np.issubdtype(a.dtype, np.floating) for a in arrays]

    ours = [tt.tensor(a.copy(), requires_grad=f) for a, f in zip(arrays, is_float)]
    theirs = [torch.from_numpy(a.copy()).requires_grad_(f) for a, f in zip(arrays, is_float)]
    out = case.tt_fn(*ours)
    ref = case.torch_fn(*theirs)

    if name in tt.PRIMITIVES and case.in_graph:
        used = _primitives_in_graph(out)
        assert name in used, f"case {case.id} never calls primitive {name!r} (graph has {sorted(used)})"

    tol = TOL[np.dtype(dtype).type]
    ref_np = ref.detach().numpy()
    assert out.shape == tuple(ref.shape), f"shape {out.shape} vs torch {tuple(ref.shape)}"
    assert TORCH_DTYPE[np.dtype(out.dtype)] == ref.dtype, f"dtype {out.dtype} vs torch {ref.dtype}"
    np.testing.assert_allclose(out.numpy(), ref_np, **tol, err_msg="forward output differs")
    assert out.requires_grad == ref.requires_grad, (
        f"output requires_grad {out.requires_grad} vs torch {ref.requires_grad}")
    if not ref.requires_grad:
        return

    upstream = np.random.default_rng(1).standard_normal(ref.shape).astype(ref_np.dtype)
    out.backward(upstream.copy())
    ref.backward(torch.from_numpy(upstream.copy()))
    for i, (o, t) in enumerate(zip(ours, theirs)):
        if not is_float[i]:
            assert o.grad is None
            continue
        g_ours = np.zeros(o.shape, o.dtype) if o.grad is None else o.grad
        g_ref = np.zeros(o.shape, o.dtype) if t.grad is None else t.grad.numpy()
        assert g_ours.shape == o.shape and g_ours.dtype == o.dtype, (
            f"grad of input {i}: {g_ours.shape} {g_ours.dtype} for an input {o.shape} {o.dtype}")
        np.testing.assert_allclose(g_ours, g_ref, **tol, err_msg=f"gradient of input {i} differs")


# -- dropout: no torch equivalent with the same random mask ------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout(p, dtype):
    rng = np.random.default_rng(3)
    x_np = rng.uniform(0.5, 1.5, (200, 100)).astype(dtype)  # never zero: out == 0 iff dropped
    x = tt.tensor(x_np.copy(), requires_grad=True)
    out = F.dropout(x, p=p)
    assert "dropout" in _primitives_in_graph(out)
    y = out.numpy()
    assert y.dtype == dtype
    kept = y != 0
    # statistics: about p of the elements dropped, the others scaled by exactly 1/(1-p)
    assert abs((1 - kept.mean()) - p) < 4 * np.sqrt(p * (1 - p) / kept.size)
    np.testing.assert_allclose(y[kept], x_np[kept] / dtype(1 - p), **TOL[np.dtype(dtype).type])

    # torch with the very same mask: same output, same input gradient
    mask = torch.from_numpy(kept.astype(dtype))
    xt = torch.from_numpy(x_np.copy()).requires_grad_(True)
    ref = xt * mask / (1 - p)
    upstream = rng.standard_normal(x_np.shape).astype(dtype)
    out.backward(upstream.copy())
    ref.backward(torch.from_numpy(upstream))
    np.testing.assert_allclose(y, ref.detach().numpy(), **TOL[np.dtype(dtype).type])
    np.testing.assert_allclose(x.grad, xt.grad.numpy(), **TOL[np.dtype(dtype).type])


def test_dropout_in_attention_keeps_rows_consistent():
    """SDPA dropout has no torch twin either; with p > 0 the mean over many draws approaches p = 0."""
    rng = np.random.default_rng(4)
    q, k, v = (tt.tensor(rng.standard_normal((1, 4, 3))) for _ in range(3))
    plain = F.scaled_dot_product_attention(q, k, v, causal=True).numpy()
    runs = np.mean([F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.3).numpy()
                    for _ in range(4000)], axis=0)
    np.testing.assert_allclose(runs, plain, atol=0.08)
