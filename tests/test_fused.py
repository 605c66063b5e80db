"""Each fused op equals its composition from basic primitives (values and gradients),
is numerically stable where the composition is not, and keeps float32 as float32."""
import math
import warnings

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.functional as F

from engine_strategies import leaf, normal, to_np

RTOL, ATOL = 1e-10, 1e-12


def compare(fused, composed, inputs, backend_name, seed=0, rtol=RTOL, atol=ATOL):
    """fused(*tensors) and composed(*tensors) agree in value and in every float input's gradient.

    ``inputs`` are NumPy arrays: float ones become float64 leaves that require grad,
    others (index arrays, masks) pass through as plain tensors.
    """
    rng = np.random.default_rng(seed)

    def leaves():
        return [tt.tensor(a, requires_grad=np.issubdtype(a.dtype, np.floating), backend=backend_name)
                for a in inputs]

    a_in, b_in = leaves(), leaves()
    out_a, out_b = fused(*a_in), composed(*b_in)
    assert out_a.shape == out_b.shape
    assert out_a.dtype == out_b.dtype == np.float64
    np.testing.assert_allclose(to_np(out_a.data), to_np(out_b.data), rtol=rtol, atol=atol)
    upstream = rng.standard_normal(out_a.shape)
    out_a.backward(upstream)
    out_b.backward(upstream)
    checked = 0
    for i, (x, y) in enumerate(zip(a_in, b_in)):
        if not x.requires_grad:
            continue
        assert x.grad is not None and y.grad is not None, f"input {i} got no gradient"
        np.testing.assert_allclose(to_np(x.grad), to_np(y.grad), rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i}")
        checked += 1
    assert checked, "nothing to compare"


# -- compositions from basic primitives only ------------------------------------------------
def softmax_composed(x, axis=-1):
    e = (x - x.max(axis=axis, keepdims=True)).exp()
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_composed(x, axis=-1):
    return x - x.exp().sum(axis=axis, keepdims=True).log()


def layer_norm_composed(x, weight=None, bias=None, eps=1e-5):
    xc = x - x.mean(axis=-1, keepdims=True)
    y = xc / ((xc * xc).mean(axis=-1, keepdims=True) + eps).sqrt()
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def cross_entropy_composed(logits, targets, ignore_index=-1):
    C = logits.shape[-1]
    t = targets.numpy().reshape(-1)
    valid = t != ignore_index
    one_hot = np.zeros((t.size, C))
    one_hot[np.nonzero(valid)[0], t[valid]] = 1.0  # ignored rows stay all zero
    one_hot = tt.tensor(one_hot, backend=logits.backend)
    picked = (log_softmax_composed(logits.reshape(-1, C)) * one_hot).sum(axis=-1)
    return -(picked.sum() / float(valid.sum()))


def gelu_composed(x):
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + (c * (x + 0.044715 * x ** 3)).tanh())


def linear_composed(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def attention_composed(q, k, v, causal=True, scale=None, dropout_p=0.0, seed=0):
    t_q, t_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    att = (q @ k.transpose(-1, -2)) * scale
    if causal:  # query i is position t_k - t_q + i: it sees keys j <= that
        mask = np.arange(t_k)[None, :] > np.arange(t_k - t_q, t_k)[:, None]
        att = F.masked_fill(att, tt.tensor(mask, backend=q.backend), float("-inf"))
    att = softmax_composed(att)
    if dropout_p:
        tt.manual_seed(seed)
        att = F.dropout(att, dropout_p)
    return att @ v


def embedding_composed(idx, weight):
    V = weight.shape[0]
    one_hot = (idx.numpy()[..., None] == np.arange(V)).astype(weight.dtype)
    return tt.tensor(one_hot, backend=weight.backend) @ weight


def rms_norm_composed(x, weight=None, eps=1e-5):
    y = x / ((x * x).mean(axis=-1, keepdims=True) + eps).sqrt()
    return y if weight is None else y * weight


def rotate_composed(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return F.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def qk_norm_rope_composed(qkv, n_head, rope=None, qk_norm=True):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    q, k = (t.reshape(B, T, n_head, C // n_head) for t in (q, k))
    if qk_norm:
        q, k = rms_norm_composed(q), rms_norm_composed(k)
    if rope is not None:
        q, k = rotate_composed(q, *rope), rotate_composed(k, *rope)
    return F.cat([q.reshape(B, T, C), k.reshape(B, T, C), v], axis=-1)


# -- fused == composed ---------------------------------------------------------------------------
SHAPES_AXES = [((5,), -1), ((3, 4), -1), ((3, 4), 0), ((2, 3, 4), 1), ((2, 1, 3), -2), ((1,), 0)]


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_softmax_matches_composition(backend_name, shape, axis):
    compare(lambda x: F.softmax(x, axis=axis), lambda x: softmax_composed(x, axis=axis),
            [normal(0, shape, 3.0)], backend_name)


@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
def test_log_softmax_matches_composition(backend_name, shape, axis):
    compare(lambda x: F.log_softmax(x, axis=axis), lambda x: log_softmax_composed(x, axis=axis),
            [normal(1, shape, 3.0)], backend_name)


@pytest.mark.parametrize("shape", [(6,), (4, 5), (2, 3, 8), (3, 1)])
@pytest.mark.parametrize("has_weight,has_bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_layer_norm_matches_composition(backend_name, shape, has_weight, has_bias, eps):
    C = shape[-1]
    inputs = [normal(2, shape, 2.0) + 0.5]
    inputs += [normal(3, (C,)) + 1.0] if has_weight else []
    inputs += [normal(4, (C,))] if has_bias else []

    def split(params):
        return (params[0] if has_weight else None), (params[-1] if has_bias else None)
    compare(lambda x, *p: F.layer_norm(x, *split(p), eps=eps),
            lambda x, *p: layer_norm_composed(x, *split(p), eps=eps), inputs, backend_name, rtol=1e-9)


@pytest.mark.parametrize("lead,C", [((6,), 5), ((2, 3), 4), ((1,), 1), ((4,), 7)])
@pytest.mark.parametrize("ignore_index", [-1, -100, None])
def test_cross_entropy_matches_composition(backend_name, lead, C, ignore_index):
    rng = np.random.default_rng(5)
    targets = rng.integers(0, C, size=lead)
    if ignore_index is not None and targets.size > 1:
        targets.reshape(-1)[::2] = ignore_index  # every other row ignored; at least one kept
    kwargs = {} if ignore_index is None else {"ignore_index": ignore_index}
    compare(lambda x, t: F.cross_entropy(x, t, **kwargs),
            lambda x, t: cross_entropy_composed(x, t, **kwargs),
            [normal(6, (*lead, C), 2.0), targets], backend_name)


def test_cross_entropy_ignored_rows_get_no_gradient(backend_name):
    x = tt.tensor(normal(7, (4, 3)), requires_grad=True, backend=backend_name)
    loss = F.cross_entropy(x, np.array([0, -1, 2, -1]))
    loss.backward()
    g = to_np(x.grad)
    assert np.all(g[[1, 3]] == 0) and np.all(np.abs(g[[0, 2]]).sum(axis=1) > 0)
    expected = -(F.log_softmax(tt.tensor(normal(7, (4, 3)))).numpy()[[0, 2], [0, 2]]).mean()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 3.0, 6.0])
def test_gelu_matches_composition(backend_name, scale):
    compare(F.gelu, gelu_composed, [normal(8, (4, 5), scale)], backend_name)


@pytest.mark.parametrize("x_shape,out_features", [((3, 4), 5), ((2, 3, 4), 6), ((4,), 2), ((2, 2, 3, 4), 1),
                                                  ((0, 4), 3)])
@pytest.mark.parametrize("has_bias", [True, False])
def test_linear_matches_composition(backend_name, x_shape, out_features, has_bias):
    n_in = x_shape[-1]
    inputs = [normal(9, x_shape), normal(10, (out_features, n_in))]
    inputs += [normal(11, (out_features,))] if has_bias else []
    compare(F.linear, linear_composed, inputs, backend_name)


@pytest.mark.parametrize("sq,sk,sv", [
    ((2, 4, 3), (2, 4, 3), (2, 4, 5)),
    ((1, 2, 3, 4), (1, 2, 6, 4), (1, 2, 6, 2)),   # Tq < Tk (KV-cache style)
    ((2, 1, 3, 4), (3, 3, 4), (1, 3, 2)),          # broadcast batch dims
    ((1, 4), (5, 4), (5, 3)),                      # no batch dims
])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("scale", [None, 0.7])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention_matches_composition(backend_name, sq, sk, sv, causal, scale, dropout_p):
    def fused(q, k, v):
        tt.manual_seed(42)
        return F.scaled_dot_product_attention(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p)

    def composed(q, k, v):
        return attention_composed(q, k, v, causal=causal, scale=scale, dropout_p=dropout_p, seed=42)
    compare(fused, composed, [normal(12, sq), normal(13, sk), normal(14, sv)], backend_name)


@pytest.mark.parametrize("B,T,n_head,hs", [(2, 5, 2, 3), (1, 1, 1, 4), (3, 4, 3, 2)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_multi_head_attention_matches_composition(backend_name, B, T, n_head, hs, causal, dropout_p):
    def fused(qkv):
        tt.manual_seed(42)
        return F.multi_head_attention(qkv, n_head, causal=causal, dropout_p=dropout_p)

    def composed(qkv):
        heads = qkv.reshape(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hs)
        y = attention_composed(heads[0], heads[1], heads[2], causal=causal, dropout_p=dropout_p, seed=42)
        return y.permute(0, 2, 1, 3).reshape(B, T, n_head * hs)
    compare(fused, composed, [normal(18, (B, T, 3 * n_head * hs))], backend_name)


def test_causal_attention_ignores_future_keys(backend_name):
    q, k, v = (tt.tensor(normal(s, (1, 4, 3)), backend=backend_name) for s in (15, 16, 17))
    out = F.scaled_dot_product_attention(q, k, v, causal=True)
    v2 = v.numpy().copy()
    v2[:, 2:] += 100.0  # the first two queries cannot see keys 2 and 3
    k2 = k.numpy().copy()
    k2[:, 3] -= 50.0
    out2 = F.scaled_dot_product_attention(q, tt.tensor(k2, backend=backend_name), tt.tensor(v2, backend=backend_name))
    np.testing.assert_allclose(out.numpy()[:, :2], out2.numpy()[:, :2], rtol=1e-12)
    assert not np.allclose(out.numpy()[:, 2:], out2.numpy()[:, 2:])


@pytest.mark.parametrize("idx", [np.array([0, 2, 2, 1, 0]), np.array([[3, 3], [0, 3]]), np.array(1),
                                 np.zeros((0, 2), np.int64)])
def test_embedding_matches_composition(backend_name, idx):
    compare(F.embedding, embedding_composed, [idx, normal(18, (4, 3))], backend_name)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(4, 5), (3,), (2, 3, 4)])
def test_dropout_matches_composition(backend_name, p, shape):
    def fused(x):
        tt.manual_seed(3)
        return F.dropout(x, p)

    def composed(x):  # the same draw: keep where uniform >= p, scale the kept by 1 / (1 - p)
        tt.manual_seed(3)
        u = tt.backend.uniform(x.xp, x.shape)
        keep = tt.tensor((u >= p).astype(np.float64), backend=x.backend)
        return x * keep * (1.0 / (1.0 - p))
    compare(fused, composed, [normal(20, shape)], backend_name)


def test_dropout_keeps_about_one_minus_p_and_is_identity_when_off(backend_name):
    x = tt.tensor(np.ones((200, 100)), backend=backend_name)
    y = F.dropout(x, 0.25).numpy()
    assert set(np.unique(y)) <= {0.0, 1 / 0.75}
    assert abs((y == 0).mean() - 0.25) < 0.02
    assert F.dropout(x, 0.25, training=False) is x and F.dropout(x, 0.0) is x
    with pytest.raises(ValueError):
        F.dropout(x, 1.0)


# -- numerical stability -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_family_is_stable_for_huge_logits(backend_name, dtype):
    raw = normal(19, (4, 6), 1e4).astype(dtype)
    raw[0] = 1e4  # ties at the top, too
    targets = np.array([0, 1, 5, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (lambda x: F.softmax(x), lambda x: F.log_softmax(x),
                   lambda x: F.cross_entropy(x, targets), lambda x: F.softmax(x, axis=0)):
            x = tt.tensor(raw, requires_grad=True, backend=backend_name)
            y = fn(x)
            assert np.all(np.isfinite(y.numpy())), y
            y.backward(np.ones(y.shape, dtype))
            assert np.all(np.isfinite(to_np(x.grad)))
    p = F.softmax(tt.tensor(raw, backend=backend_name)).numpy()
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p[0], 1 / 6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gelu_is_stable_for_huge_inputs(backend_name, dtype):
    x = tt.tensor(np.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=dtype), requires_grad=True, backend=backend_name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = F.gelu(x)
        y.sum().backward()
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(to_np(x.grad)))
    np.testing.assert_allclose(y.numpy(), [0, 0, 0, 50, 1e4], atol=1e-6)
    np.testing.assert_allclose(to_np(x.grad), [0, 0, 0.5, 1, 1], atol=1e-6)


@pytest.mark.parametrize("shape", [(6,), (4, 5), (2, 3, 8)])
@pytest.mark.parametrize("has_weight", [True, False])
def test_rms_norm_matches_composition(backend_name, shape, has_weight):
    inputs = [normal(2, shape, 2.0)] + ([normal(3, shape[-1:]) + 1.0] if has_weight else [])
    compare(lambda x, *w: F.rms_norm(x, *w), lambda x, *w: rms_norm_composed(x, *w), inputs, backend_name,
            rtol=1e-9)


def test_relu_squared_and_swiglu_match_composition(backend_name):
    compare(F.relu_squared, lambda x: x.relu() * x.relu(), [normal(4, (3, 5), 2.0)], backend_name)
    compare(F.swiglu, lambda h: h[..., :3] * h[..., :3].sigmoid() * h[..., 3:], [normal(5, (2, 4, 6), 2.0)],
            backend_name)


@pytest.mark.parametrize("qk_norm,rope", [(True, True), (False, True), (True, False), (False, False)])
def test_qk_norm_rope_matches_composition(backend_name, qk_norm, rope):
    from gpt.model import rope_tables
    tables = rope_tables(np.arange(2, 6), 6, np, np.float64) if rope else None
    tables = tables and tuple(t.to(backend_name) for t in tables)
    compare(lambda a: F.qk_norm_rope(a, 2, tables, qk_norm), lambda a: qk_norm_rope_composed(a, 2, tables, qk_norm),
            [normal(6, (3, 4, 36), 2.0)], backend_name, rtol=1e-9)


# -- float32 stays float32 -----------------------------------------------------------------------------
def _rope_f32(backend_name, T=3, hs=4):
    from gpt.model import rope_tables
    return tuple(t.to(backend_name) for t in rope_tables(np.arange(T), hs, np, np.float32))


def _fused_float32_cases(backend_name):
    def f32(*shape):
        return leaf(backend_name, *shape, dtype=np.float32)

    idx = np.array([[0, 2], [3, 3]])
    targets = np.array([1, -1, 0])
    return {
        "softmax": (F.softmax, [f32(3, 4)]),
        "log_softmax": (F.log_softmax, [f32(3, 4)]),
        "layer_norm": (F.layer_norm, [f32(2, 3, 4), f32(4), f32(4)]),
        "layer_norm_plain": (F.layer_norm, [f32(2, 4)]),
        "cross_entropy": (lambda x: F.cross_entropy(x, targets), [f32(3, 5)]),
        "gelu": (F.gelu, [f32(3, 4)]),
        "embedding": (lambda w: F.embedding(idx, w), [f32(4, 3)]),
        "dropout": (lambda x: F.dropout(x, 0.3), [f32(3, 4)]),
        "linear": (F.linear, [f32(2, 3, 4), f32(5, 4), f32(5)]),
        "linear_no_bias": (F.linear, [f32(3, 4), f32(5, 4)]),
        "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.2),
                      [f32(2, 3, 4), f32(2, 5, 4), f32(2, 5, 2)]),
        "multi_head_attention": (lambda x: F.multi_head_attention(x, 2, dropout_p=0.2),
                                 [f32(2, 3, 12)]),
        "attention_scaled": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=False, scale=0.3),
                             [f32(3, 4), f32(5, 4), f32(5, 2)]),
        "rms_norm": (F.rms_norm, [f32(2, 3, 4), f32(4)]),
        "rms_norm_plain": (F.rms_norm, [f32(3, 4)]),
        "relu_squared": (F.relu_squared, [f32(3, 4)]),
        "swiglu": (F.swiglu, [f32(3, 4)]),
        "qk_norm_rope": (lambda a: F.qk_norm_rope(a, 2, _rope_f32(backend_name), True), [f32(2, 3, 24)]),
    }


def test_fused_float32_cases_cover_every_fused_primitive():
    from tinytensor.ops import attention, fused as fused_ops, modern
    fused = {name for name, cls in tt.PRIMITIVES.items()
             if cls.__module__ in (fused_ops.__name__, attention.__name__, modern.__name__)}
    covered = {"softmax", "log_softmax", "layer_norm", "cross_entropy", "gelu", "embedding", "dropout", "linear",
               "scaled_dot_product_attention", "multi_head_attention", "rms_norm", "relu_squared", "swiglu",
               "qk_norm_rope"}
    assert fused <= covered, f"fused primitives without a float32 case: {sorted(fused - covered)}"


@pytest.mark.parametrize("name", list(_fused_float32_cases("numpy")))
def test_fused_ops_keep_float32(backend_name, name):
    fn, inputs = _fused_float32_cases(backend_name)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(*inputs)
        assert out.dtype == np.float32, f"{name} forward gave {out.dtype}"
        g = out.xp.asarray(normal(1, out.shape).astype(np.float32))
        # the Function's own backward, before the leaves cast anything back
        raw = out._ctx.backward(g)
        raw = raw if isinstance(raw, tuple) else (raw,)
        for i, r in enumerate(raw):
            assert r is None or r.dtype == np.float32, f"{name} backward gave {r.dtype} for input {i}"
        assert any(r is not None for r in raw)
        out = fn(*inputs)
        out.backward(g)
    for x in inputs:
        assert x.grad is not None and x.grad.dtype == np.float32 and x.grad.shape == x.shape
        assert np.all(np.isfinite(to_np(x.grad)))
