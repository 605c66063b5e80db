"""Every registered primitive, gradient-checked in float64 on shapes drawn by hypothesis.

``CASES`` maps each primitive name to the test(s) that check it; adding a
primitive to ``tt.PRIMITIVES`` without adding a case here fails
``test_every_primitive_has_a_gradcheck_case``.
"""
import re

import numpy as np
import pytest
from hypothesis import example, given, strategies as st
from hypothesis.extra import numpy as hnp

import tinytensor as tt
import tinytensor.functional as F
from tinytensor.ops.basic import Cast
from tinytensor.tensor import Function
from tinytensor.testing import check_grad

from engine_strategies import (BROADCAST2, BROADCAST3, NONEMPTY, SEEDS, SETTINGS, SHAPES, away_from_zero, distinct,
                               normal, positive, to_np)

BS = hnp.BroadcastableShapes


@st.composite
def axis_args(draw, ndim):
    """(axis, keepdims) for a reduction: None, one int or a tuple of distinct ints (negatives too)."""
    keepdims = draw(st.booleans())
    if ndim == 0:
        return draw(st.sampled_from([None, ()])), keepdims
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return None, keepdims
    if kind == "int":
        return draw(st.integers(-ndim, ndim - 1)), keepdims
    axes = draw(st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim))
    return tuple(ax - ndim if draw(st.booleans()) else ax for ax in axes), keepdims


# -- elementwise binary ---------------------------------------------------------------
@SETTINGS
@given(shapes=BROADCAST2, seed=SEEDS)
@example(shapes=BS(((), (2, 3)), (2, 3)), seed=0)
@example(shapes=BS(((2, 1, 3), (4, 1)), (2, 4, 3)), seed=1)
@example(shapes=BS(((0, 3), (1, 3)), (0, 3)), seed=2)
def test_add(backend_name, shapes, seed):
    a, b = (normal(seed + i, s) for i, s in enumerate(shapes.input_shapes))
    check_grad(lambda x, y: x + y, a, b, backend_name=backend_name)


@SETTINGS
@given(shapes=BROADCAST2, seed=SEEDS)
@example(shapes=BS(((), ()), ()), seed=0)
@example(shapes=BS(((3, 1), (1, 4)), (3, 4)), seed=1)
@example(shapes=BS(((2, 0, 1), (5,)), (2, 0, 5)), seed=2)
def test_mul(backend_name, shapes, seed):
    a, b = (normal(seed + i, s) for i, s in enumerate(shapes.input_shapes))
    check_grad(lambda x, y: x * y, a, b, backend_name=backend_name)


def test_mul_same_tensor_twice(backend_name):
    check_grad(lambda x: x * x, normal(0, (3, 2)), backend_name=backend_name)


@SETTINGS
@given(shapes=BROADCAST3, seed=SEEDS)
@example(shapes=BS(((2, 3), (), (3,)), (2, 3)), seed=0)
@example(shapes=BS(((4, 1), (1, 3), (4, 3)), (4, 3)), seed=1)
def test_where(backend_name, shapes, seed):
    cs, sa, sb = shapes.input_shapes
    cond = np.random.default_rng(seed).random(cs) < 0.5
    check_grad(lambda c, x, y: tt.where(c, x, y), cond, normal(seed + 1, sa), normal(seed + 2, sb),
               backend_name=backend_name)


# -- elementwise unary -------------------------------------------------------------------
def _unary(name, op, make=normal):
    @SETTINGS
    @given(shape=SHAPES, seed=SEEDS)
    @example(shape=(), seed=0)
    def test(backend_name, shape, seed):
        check_grad(op, make(seed, shape), backend_name=backend_name)
    test.__name__ = test.__qualname__ = name
    return test


test_neg = _unary("test_neg", lambda x: -x)
test_exp = _unary("test_exp", lambda x: x.exp())
test_log = _unary("test_log", lambda x: x.log(), make=lambda s, sh: positive(s, sh, low=0.1))
test_tanh = _unary("test_tanh", lambda x: x.tanh(), make=lambda s, sh: normal(s, sh, 2.0))
test_sigmoid = _unary("test_sigmoid", lambda x: x.sigmoid(), make=lambda s, sh: normal(s, sh, 3.0))
test_relu = _unary("test_relu", lambda x: x.relu(), make=away_from_zero)
test_gelu = _unary("test_gelu", F.gelu, make=lambda s, sh: normal(s, sh, 3.0))
test_sqrt = _unary("test_sqrt", lambda x: x.sqrt(), make=lambda s, sh: positive(s, sh, low=0.2))


@SETTINGS
@given(shape=SHAPES, seed=SEEDS, exponent=st.sampled_from([0, 1, 2, 3, -1, -2, 0.5, 1.5, -0.5, -2.5, 2.0, 3.7]))
def test_pow(backend_name, shape, seed, exponent):
    integral = float(exponent).is_integer()
    x = away_from_zero(seed, shape, gap=0.3) if integral else positive(seed, shape, low=0.3)
    check_grad(lambda t: t ** exponent, x, backend_name=backend_name)


@SETTINGS
@given(shape=SHAPES, seed=SEEDS)
def test_cast(backend_name, shape, seed):
    x = normal(seed, shape)
    # float64 -> float64 is exact
    check_grad(lambda t: Cast.apply(t, dtype=np.dtype(np.float64)) * 2.0, x, backend_name=backend_name)
    # float64 -> float32 -> float64: the round trip loses precision, so the finite
    # difference needs a larger step and a looser tolerance
    check_grad(lambda t: t.astype(np.float32).astype(np.float64) * 2.0, x, eps=1e-2, rtol=1e-3, atol=1e-4,
               backend_name=backend_name)


def test_cast_grad_dtype_is_the_input_dtype(backend_name):
    x = tt.tensor(np.ones((2, 3)), requires_grad=True, backend=backend_name)
    y = x.astype(np.float32)
    assert y.dtype == np.float32
    # the Function's own backward must hand back the input's dtype (the leaf would hide a float32 gradient)
    raw = y._ctx.backward(y.xp.ones(y.shape, np.float32))
    assert raw.dtype == np.float64
    (y * y).sum().backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(to_np(x.grad), 2.0)


# -- reductions ---------------------------------------------------------------------------
@SETTINGS
@given(shape=SHAPES, seed=SEEDS, data=st.data())
@example(shape=(), seed=0, data=None)
def test_sum(backend_name, shape, seed, data):
    axis, keepdims = data.draw(axis_args(len(shape))) if data is not None else (None, False)
    check_grad(lambda t: t.sum(axis=axis, keepdims=keepdims), normal(seed, shape), backend_name=backend_name)


@SETTINGS
@given(shape=NONEMPTY, seed=SEEDS, data=st.data())
@example(shape=(3, 4), seed=0, data=None)
def test_max(backend_name, shape, seed, data):
    axis, keepdims = data.draw(axis_args(len(shape))) if data is not None else ((0, -1), True)
    check_grad(lambda t: t.max(axis=axis, keepdims=keepdims), distinct(seed, shape), backend_name=backend_name)


def test_max_ties_share_the_gradient(backend_name):
    x = tt.tensor(np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]), requires_grad=True, backend=backend_name)
    x.max(axis=1).sum().backward()
    np.testing.assert_allclose(to_np(x.grad), [[0, 0.5, 0.5], [1 / 3, 1 / 3, 1 / 3]])


# -- shapes and indexing ---------------------------------------------------------------------------
@st.composite
def reshape_targets(draw, shape):
    """A new shape with the same number of elements: shuffled sides, merged runs, extra 1s, maybe a -1."""
    sides = list(draw(st.permutations(list(shape))))
    merged = []
    for s in sides:
        if merged and draw(st.booleans()):
            merged[-1] *= s
        else:
            merged.append(s)
    for _ in range(draw(st.integers(0, 2))):
        merged.insert(draw(st.integers(0, len(merged))), 1)
    if merged and 0 not in merged and draw(st.booleans()):
        merged[draw(st.integers(0, len(merged) - 1))] = -1
    return tuple(merged)


@SETTINGS
@given(shape=SHAPES, seed=SEEDS, data=st.data())
def test_reshape(backend_name, shape, seed, data):
    target = data.draw(reshape_targets(shape))
    check_grad(lambda t: t.reshape(target), normal(seed, shape), backend_name=backend_name)
    check_grad(lambda t: t.view(*target), normal(seed, shape), backend_name=backend_name)


@SETTINGS
@given(shape=SHAPES, seed=SEEDS, data=st.data())
def test_permute(backend_name, shape, seed, data):
    nd = len(shape)
    axes = tuple(ax - nd if data.draw(st.booleans()) else ax for ax in data.draw(st.permutations(range(nd))))
    check_grad(lambda t: t.permute(axes), normal(seed, shape), backend_name=backend_name)


@st.composite
def basic_index(draw, shape):
    """Ints (negative too), slices (negative steps too), None and Ellipsis, for a prefix or suffix of the dims."""
    m = draw(st.integers(0, len(shape)))
    suffix = draw(st.booleans())
    dims = shape[len(shape) - m:] if suffix else shape[:m]
    items = []
    for n in dims:
        kind = draw(st.sampled_from(["slice", "none"] + (["int"] if n > 0 else [])))
        if kind == "int":
            items.append(draw(st.integers(-n, n - 1)))
        elif kind == "slice":
            items.append(draw(st.slices(n)))
        else:
            items += [None, draw(st.slices(n))]
    if suffix and m < len(shape):
        items.insert(0, Ellipsis)  # the indexed dims are the last m
    elif draw(st.booleans()):
        items.append(Ellipsis)
    return tuple(items) if len(items) != 1 or draw(st.booleans()) else items[0]


@st.composite
def get_item_case(draw):
    kind = draw(st.sampled_from(["basic", "int_array", "bool", "mixed"]))
    shape = draw(hnp.array_shapes(min_dims=0 if kind == "basic" else 1, max_dims=3, min_side=1, max_side=4))
    seed = draw(SEEDS)
    rng = np.random.default_rng(seed)
    if kind == "basic":
        index = draw(basic_index(shape))
    elif kind == "int_array":  # repeated (and negative) indices: their gradients must add up
        n = shape[0]
        index = np.array(draw(st.lists(st.integers(-n, n - 1), min_size=0, max_size=7)), dtype=np.int64)
        if draw(st.booleans()) and len(shape) > 1:
            index = (index, np.array(draw(st.lists(st.integers(0, shape[1] - 1), min_size=len(index),
                                                   max_size=len(index))), dtype=np.int64))
    elif kind == "bool":
        ndim = draw(st.integers(1, len(shape)))
        index = rng.random(shape[:ndim]) < 0.5
    else:  # an integer array with a negative-step slice on the next axis
        n = shape[0]
        index = np.array(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=5)), dtype=np.int64)
        if len(shape) > 1:
            index = (slice(None, None, -1), index) if shape[0] == shape[1] else (index, slice(None, None, -2))
    return shape, seed, index


@SETTINGS
@given(case=get_item_case())
@example(case=((5,), 0, np.array([0, 0, 4, -1, 2, 2, 2])))
@example(case=((4, 3), 1, (slice(None, None, -1), 1)))
@example(case=((4, 3), 2, np.array([True, False, True, True])))
@example(case=((), 3, ()))
def test_get_item(backend_name, case):
    shape, seed, index = case
    xp = tt.backend.get_xp(backend_name)
    if backend_name != "numpy":  # index arrays must live where the tensor does
        index = tuple(xp.asarray(i) if isinstance(i, np.ndarray) else i for i in index) \
            if isinstance(index, tuple) else (xp.asarray(index) if isinstance(index, np.ndarray) else index)
    check_grad(lambda t: t[index], normal(seed, shape), backend_name=backend_name)


@SETTINGS
@given(shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=3), seed=SEEDS, data=st.data())
def test_cat(backend_name, shape, seed, data):
    nd = len(shape)
    axis = data.draw(st.integers(-nd, nd - 1))
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=4))
    arrays = []
    for i, n in enumerate(sizes):
        s = list(shape)
        s[axis] = n
        arrays.append(normal(seed + i, tuple(s)))
    check_grad(lambda *ts: tt.cat(ts, axis=axis), *arrays, backend_name=backend_name)


def test_split_outputs_share_one_input(backend_name):
    # tuple outputs that share a graph: check_grad backprops them together
    check_grad(lambda t: (t * 2.0).split([1, 3, 0, 2], axis=1), normal(0, (2, 6)), backend_name=backend_name)
    check_grad(lambda t: tt.stack([t, t * t], axis=-1), normal(1, (3, 2)), backend_name=backend_name)


# -- matmul -------------------------------------------------------------------------------------
@SETTINGS
@given(shapes=hnp.mutually_broadcastable_shapes(signature=np.matmul.signature, max_dims=3, min_side=0, max_side=4),
       seed=SEEDS)
@example(shapes=BS(((2, 1, 3, 4), (5, 4, 2)), (2, 5, 3, 2)), seed=0)
@example(shapes=BS(((3,), (3,)), ()), seed=1)
@example(shapes=BS(((4,), (2, 4, 3)), (2, 3)), seed=2)
@example(shapes=BS(((2, 3, 4), (4,)), (2, 3)), seed=3)
@example(shapes=BS(((3, 4), (4, 5)), (3, 5)), seed=4)
def test_mat_mul(backend_name, shapes, seed):
    a, b = (normal(seed + i, s) for i, s in enumerate(shapes.input_shapes))
    check_grad(lambda x, y: x @ y, a, b, backend_name=backend_name)


# -- fused neural-network primitives ----------------------------------------------------------------
ND = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4)


@SETTINGS
@given(shape=ND, seed=SEEDS, data=st.data())
def test_softmax(backend_name, shape, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    check_grad(lambda t: F.softmax(t, axis=axis), normal(seed, shape, 2.0), backend_name=backend_name)


@SETTINGS
@given(shape=ND, seed=SEEDS, data=st.data())
def test_log_softmax(backend_name, shape, seed, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    check_grad(lambda t: F.log_softmax(t, axis=axis), normal(seed, shape, 2.0), backend_name=backend_name)


@SETTINGS
@given(shape=ND, seed=SEEDS, has_weight=st.booleans(), has_bias=st.booleans())
@example(shape=(2, 3, 5), seed=0, has_weight=True, has_bias=True)
@example(shape=(4,), seed=1, has_weight=False, has_bias=True)
def test_layer_norm(backend_name, shape, seed, has_weight, has_bias):
    C = shape[-1]
    x = normal(seed, shape, 3.0) + 1.0
    params = [normal(seed + 1, (C,)) + 1.0] if has_weight else []
    params += [normal(seed + 2, (C,))] if has_bias else []

    def fn(t, *p):
        w = p[0] if has_weight else None
        b = p[-1] if has_bias else None
        return F.layer_norm(t, w, b)
    check_grad(fn, x, *params, backend_name=backend_name)


@SETTINGS
@given(lead=hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5), C=st.integers(1, 6), seed=SEEDS,
       ignore_index=st.sampled_from([-1, -100]), data=st.data())
def test_cross_entropy(backend_name, lead, C, seed, ignore_index, data):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, C, size=lead)
    ignored = rng.random(lead) < 0.3
    ignored.reshape(-1)[data.draw(st.integers(0, ignored.size - 1))] = False  # keep at least one row
    targets[ignored] = ignore_index
    check_grad(lambda t, y: F.cross_entropy(t, y, ignore_index=ignore_index), normal(seed, lead + (C,), 2.0),
               targets, backend_name=backend_name)


@SETTINGS
@given(V=st.integers(1, 6), C=st.integers(1, 4), idx_shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0,
                                                                               max_side=5), seed=SEEDS)
@example(V=3, C=2, idx_shape=(8,), seed=0)
def test_embedding(backend_name, V, C, idx_shape, seed):
    idx = np.random.default_rng(seed).integers(0, V, size=idx_shape)  # few rows: plenty of repeats
    check_grad(lambda i, w: F.embedding(i, w), idx, normal(seed, (V, C)), backend_name=backend_name)


def test_embedding_repeated_rows_add_up(backend_name):
    w = tt.tensor(np.zeros((4, 2)), requires_grad=True, backend=backend_name)
    F.embedding(np.array([[1, 1], [3, 1]]), w).sum().backward()
    np.testing.assert_allclose(to_np(w.grad), [[0, 0], [3, 3], [0, 0], [1, 1]])


@SETTINGS
@given(shape=SHAPES, seed=SEEDS, p=st.sampled_from([0.1, 0.5, 0.9]), mask_seed=st.integers(0, 1000))
def test_dropout(backend_name, shape, seed, p, mask_seed):
    def fn(t):
        tt.manual_seed(mask_seed)  # the same mask for every evaluation
        return F.dropout(t, p=p)
    check_grad(fn, normal(seed, shape), backend_name=backend_name)


@SETTINGS
@given(lead=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=4), n_in=st.integers(1, 5),
       n_out=st.integers(1, 5), has_bias=st.booleans(), seed=SEEDS)
@example(lead=(2, 3), n_in=4, n_out=5, has_bias=True, seed=0)
@example(lead=(2, 3), n_in=4, n_out=5, has_bias=False, seed=1)
@example(lead=(), n_in=3, n_out=2, has_bias=True, seed=2)
def test_linear(backend_name, lead, n_in, n_out, has_bias, seed):
    x, w = normal(seed, lead + (n_in,)), normal(seed + 1, (n_out, n_in))
    params = [normal(seed + 2, (n_out,))] if has_bias else []
    check_grad(lambda a, b, *c: F.linear(a, b, *c), x, w, *params, backend_name=backend_name)


@SETTINGS
@given(lead=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3), blocks=st.integers(1, 3),
       block=st.sampled_from([2, 4]), n_out=st.integers(1, 4), bits=st.sampled_from([8, 4]),
       has_bias=st.booleans(), seed=SEEDS)
@example(lead=(2, 3), blocks=2, block=4, n_out=3, bits=4, has_bias=True, seed=0)
def test_quantized_linear(backend_name, lead, blocks, block, n_out, bits, has_bias, seed):
    """The weight is a frozen constant (no gradient): x's and the bias's are checked."""
    from tinytensor.ops.quant import quantize_blockwise
    xp = tt.backend.get_xp(backend_name)
    n_in = blocks * block
    q, scale = quantize_blockwise(xp.asarray(normal(seed + 1, (n_out, n_in)).astype(np.float32)), bits, block)
    params = [normal(seed + 2, (n_out,))] if has_bias else []
    check_grad(lambda a, *c: F.quantized_linear(a, q, scale, bits, block, *c), normal(seed, lead + (n_in,)), *params,
               backend_name=backend_name)


@SETTINGS
@given(lead=hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=3), n_in=st.sampled_from([2, 4]),
       n_out=st.integers(1, 4), rank=st.integers(1, 3), base=st.sampled_from(["float", "int8", "int4"]),
       has_bias=st.booleans(), p=st.sampled_from([0.0, 0.5]), seed=SEEDS)
@example(lead=(2, 3), n_in=4, n_out=3, rank=2, base="float", has_bias=True, p=0.0, seed=0)
@example(lead=(2, 3), n_in=4, n_out=3, rank=2, base="int4", has_bias=False, p=0.5, seed=1)
def test_lora_linear(backend_name, lead, n_in, n_out, rank, base, has_bias, p, seed):
    """x, lora_A, lora_B, a float weight (when there is one) and the bias are all checked; a
    quantized weight is a constant."""
    from tinytensor.ops.quant import quantize_blockwise
    xp = tt.backend.get_xp(backend_name)
    w = normal(seed + 1, (n_out, n_in))
    quant = None if base == "float" else (*quantize_blockwise(xp.asarray(w.astype(np.float32)), 8 if base == "int8" else 4, 2),
                                          8 if base == "int8" else 4, 2)
    weights = [w] if quant is None else []
    bias = [normal(seed + 4, (n_out,))] if has_bias else []

    def fn(x, a, b, *rest):
        tt.manual_seed(seed)  # the same dropout mask for every evaluation
        return F.lora_linear(x, rest[0] if quant is None else None, a, b, rest[-1] if has_bias else None,
                             scaling=1.5, dropout=p, quant=quant)
    check_grad(fn, normal(seed, lead + (n_in,)), normal(seed + 2, (rank, n_in)), normal(seed + 3, (n_out, rank)),
               *weights, *bias, backend_name=backend_name)


@st.composite
def attention_case(draw):
    batch = draw(hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=2, min_side=1, max_side=3))
    causal = draw(st.booleans())
    t_k = draw(st.integers(1, 5))
    t_q = draw(st.integers(1, t_k)) if causal else draw(st.integers(1, 5))
    hs, hv = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    scale = draw(st.sampled_from([None, 0.3]))
    dropout_p = draw(st.sampled_from([0.0, 0.0, 0.2, 0.5]))
    bq, bk, bv = batch.input_shapes
    return (bq + (t_q, hs), bk + (t_k, hs), bv + (t_k, hv)), causal, scale, dropout_p


@SETTINGS
@given(case=attention_case(), seed=SEEDS)
@example(case=(((2, 3, 4), (2, 3, 4), (2, 3, 2)), True, None, 0.0), seed=0)
@example(case=(((1, 2, 3), (1, 5, 3), (1, 5, 2)), True, None, 0.0), seed=1)  # Tq < Tk, causal
@example(case=(((2, 1, 3, 4), (3, 5, 4), (1, 5, 2)), False, 0.5, 0.0), seed=2)  # broadcast batch dims
@example(case=(((2, 4, 3), (2, 4, 3), (2, 4, 3)), True, None, 0.3), seed=3)  # dropout
def test_scaled_dot_product_attention(backend_name, case, seed):
    (sq, sk, sv), causal, scale, dropout_p = case

    def fn(q, k, v):
        tt.manual_seed(seed % 1000)  # the same dropout mask for every evaluation
        return F.scaled_dot_product_attention(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p)
    check_grad(fn, normal(seed, sq), normal(seed + 1, sk), normal(seed + 2, sv), backend_name=backend_name)


@SETTINGS
@given(B=st.integers(1, 2), T=st.integers(1, 5), n_head=st.integers(1, 3), hs=st.integers(1, 3),
       causal=st.booleans(), dropout_p=st.sampled_from([0.0, 0.0, 0.3]), seed=SEEDS)
def test_multi_head_attention(backend_name, B, T, n_head, hs, causal, dropout_p, seed):
    def fn(qkv):
        tt.manual_seed(seed % 1000)  # the same dropout mask for every evaluation
        return F.multi_head_attention(qkv, n_head, causal=causal, dropout_p=dropout_p)
    check_grad(fn, normal(seed, (B, T, 3 * n_head * hs)), backend_name=backend_name)


# -- the modern model options' fused ops (tinytensor/ops/modern.py) -----------------------------------------
@SETTINGS
@given(shape=ND, seed=SEEDS, has_weight=st.booleans())
@example(shape=(2, 3, 5), seed=0, has_weight=True)
def test_rms_norm(backend_name, shape, seed, has_weight):
    params = [normal(seed + 1, (shape[-1],)) + 1.0] if has_weight else []
    check_grad(lambda t, *w: F.rms_norm(t, *w), normal(seed, shape, 3.0), *params, backend_name=backend_name)


test_relu_squared = _unary("test_relu_squared", F.relu_squared, make=away_from_zero)


@SETTINGS
@given(lead=hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4), H=st.integers(1, 4), seed=SEEDS)
def test_swiglu(backend_name, lead, H, seed):
    check_grad(F.swiglu, normal(seed, lead + (2 * H,), 2.0), backend_name=backend_name)


@pytest.mark.parametrize("qk_norm,rope", [(True, True), (False, True), (True, False)])
def test_qk_norm_rope(backend_name, qk_norm, rope):
    from gpt.model import rope_tables
    B, T, nh, hs = 2, 3, 2, 4
    tables = rope_tables(np.arange(5, 5 + T), hs, np, np.float64) if rope else None
    tables = tables and tuple(t.to(backend_name) for t in tables)
    check_grad(lambda t: F.qk_norm_rope(t, nh, tables, qk_norm), normal(0, (B, T, 3 * nh * hs), 2.0),
               backend_name=backend_name)


# -- the registry must be covered ----------------------------------------------------------------------
CASES = {
    "add": test_add,
    "mul": (test_mul, test_mul_same_tensor_twice),
    "where": test_where,
    "neg": test_neg,
    "pow": (test_pow, test_sqrt),
    "exp": test_exp,
    "log": test_log,
    "tanh": test_tanh,
    "sigmoid": test_sigmoid,
    "relu": test_relu,
    "cast": (test_cast, test_cast_grad_dtype_is_the_input_dtype),
    "sum": test_sum,
    "max": (test_max, test_max_ties_share_the_gradient),
    "reshape": test_reshape,
    "permute": test_permute,
    "get_item": (test_get_item, test_split_outputs_share_one_input),
    "cat": (test_cat, test_split_outputs_share_one_input),
    "mat_mul": test_mat_mul,
    "softmax": test_softmax,
    "log_softmax": test_log_softmax,
    "layer_norm": test_layer_norm,
    "cross_entropy": test_cross_entropy,
    "gelu": test_gelu,
    "embedding": (test_embedding, test_embedding_repeated_rows_add_up),
    "dropout": test_dropout,
    "linear": test_linear,
    "quantized_linear": test_quantized_linear,
    "lora_linear": test_lora_linear,
    "scaled_dot_product_attention": test_scaled_dot_product_attention,
    "multi_head_attention": test_multi_head_attention,
    "rms_norm": test_rms_norm,
    "relu_squared": test_relu_squared,
    "swiglu": test_swiglu,
    "qk_norm_rope": test_qk_norm_rope,
}


def test_every_primitive_has_a_gradcheck_case():
    missing = set(tt.PRIMITIVES) - set(CASES)
    assert not missing, f"primitives without a gradient-check case in tests/test_gradcheck.py: {sorted(missing)}"
    stale = set(CASES) - set(tt.PRIMITIVES)
    assert not stale, f"CASES names primitives that are not registered: {sorted(stale)}"
    for name, case in CASES.items():
        for fn in case if isinstance(case, tuple) else (case,):
            # a module-level test_* function, so pytest collects it
            assert fn.__name__.startswith("test_") and globals().get(fn.__name__) is fn, \
                f"case for {name!r} is not a collected test: {fn!r}"


# -- the checker itself must be able to fail -------------------------------------------------------------
class _WrongSquare(Function):  # deliberately NOT registered
    name = "wrong_square"

    def forward(self, a):
        self.a = a
        return a * a

    def backward(self, g):
        return 4 * self.a * g  # the true derivative is 2a: this is twice it


def _numbers(message):
    analytic = float(re.search(r"backprop .*= (\S+)", message).group(1))
    numeric = float(re.search(r"numerical .*= (\S+)", message).group(1))
    return analytic, numeric


def test_check_grad_fails_on_a_wrong_backward(backend_name):
    assert "wrong_square" not in tt.PRIMITIVES
    with pytest.raises(AssertionError) as info:
        check_grad(lambda t: _WrongSquare.apply(t), positive(0, (3, 4)), backend_name=backend_name)
    message = str(info.value)
    assert "direction" in message
    analytic, numeric = _numbers(message)
    assert analytic == pytest.approx(2 * numeric, rel=1e-4)
    assert abs(numeric) > 1e-3


def test_check_grad_fails_when_a_registered_backward_is_doubled(monkeypatch):
    mul = tt.PRIMITIVES["mul"]
    original = mul.backward
    monkeypatch.setattr(mul, "backward", lambda self, g: tuple(
        None if x is None else 2 * x for x in original(self, g)))
    with pytest.raises(AssertionError) as info:
        check_grad(lambda a, b: a * b, normal(0, (2, 3)), normal(1, (3,)))
    message = str(info.value)
    assert "direction" in message
    analytic, numeric = _numbers(message)
    assert analytic == pytest.approx(2 * numeric, rel=1e-4)


def test_check_grad_fails_on_a_wrong_gradient_shape():
    class _WrongShape(Function):
        name = "wrong_shape"

        def forward(self, a):
            return a.sum()

        def backward(self, g):
            return np.ones(3) * g

    with pytest.raises(AssertionError, match="shape"):
        check_grad(lambda t: _WrongShape.apply(t), normal(0, (2, 3)))
