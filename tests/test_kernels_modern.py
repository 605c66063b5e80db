"""The modern options' kernels (tinytensor/kernels/modern.py) against the NumPy path of their
primitives (tinytensor/ops/modern.py), on both compiled copies, as tests/test_kernels.py does for
the others (its helpers and its serial/parallel fixture are used here)."""
from __future__ import annotations

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.functional as F
from tinytensor import kernels

pytest.importorskip("numba", reason="numba is not installed: the NumPy path is the only one")
from test_kernels import CALLED, _kernels_on, assert_same, normal, run_both, variant  # noqa: E402,F401  (variant: autouse fixture)

from gpt.model import rope_tables  # noqa: E402


@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm(weight):
    x, w = normal(3, 5, 48, scale=3.0), normal(48, seed=1) + 1
    uses = ("rms_norm_forward", "rms_norm_backward")
    if weight:
        assert_same(run_both(lambda x, w: F.rms_norm(x, w), x, w, uses=uses))
    else:
        assert_same(run_both(F.rms_norm, x, uses=uses))


def test_rms_norm_of_a_non_contiguous_input():
    assert_same(run_both(lambda x: F.rms_norm(x.T), normal(40, 6), uses=("rms_norm_forward", "rms_norm_backward")))


def test_relu_squared():
    x = normal(7, 300, scale=2.0)
    x[0, :3] = 0.0
    assert_same(run_both(F.relu_squared, x, uses=("relu_squared_forward", "relu_squared_backward")))


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_swiglu(scale):
    """Large gates too: sigmoid's exp saturates to 0 or 1 as NumPy's does, no NaN."""
    assert_same(run_both(F.swiglu, normal(2, 9, 64, scale=scale), uses=("swiglu_forward", "swiglu_backward")))


@pytest.mark.parametrize("qk_norm,rope", [(True, True), (False, True), (True, False)])
def test_qk_norm_rope(qk_norm, rope):
    B, T, nh, hs = 2, 7, 3, 8
    tables = tuple(rope_tables(np.arange(4, 4 + T), hs, np, np.float32)) if rope else None
    assert_same(run_both(lambda a: F.qk_norm_rope(a, nh, tables, qk_norm), normal(B, T, 3 * nh * hs, scale=2.0),
                         uses=("qk_norm_rope_forward", "qk_norm_rope_backward")))


def test_qk_norm_rope_of_a_slice():
    """A non-contiguous input (a slice of a wider array) and (T, hs/2) tables."""
    wide = normal(2, 5, 40)
    cos, sin = (tt.tensor(t.numpy().reshape(5, 2)) for t in rope_tables(np.arange(5), 4, np, np.float32))
    assert_same(run_both(lambda a: F.qk_norm_rope(a[..., :24], 2, (cos, sin)), wide,
                         uses=("qk_norm_rope_forward", "qk_norm_rope_backward")))


def test_half_precision_and_float64_take_the_numpy_path():
    assert kernels.modern_for_arrays(np.zeros(3, np.float16)) is None
    assert kernels.modern_for_arrays(np.zeros(3, np.float64)) is None
    assert kernels.modern_for_arrays(np.zeros(3, np.float32)) is kernels.modern_module()
    x = tt.tensor(normal(4, 8).astype(np.float16), requires_grad=True)
    y = F.rms_norm(x)
    y.backward(np.ones(y.shape, np.float16))
    assert y.dtype == np.float16 and x.grad.dtype == np.float16
    np.testing.assert_allclose(y.numpy().astype(np.float32), F.rms_norm(tt.tensor(x.numpy().astype(np.float32))).numpy(),
                               rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_steps_match_the_numpy_path(nesterov):
    """Muon's momentum and update kernels (tall matrices go through transposed slots of the stack)
    against its NumPy path: 3 steps of two layers of tall, wide and square matrices, weight decay on."""
    shapes = [(48, 16), (16, 48), (16, 16)] * 2
    init = [normal(*s, seed=i) for i, s in enumerate(shapes)]
    runs = []
    for ctx in (kernels.numpy_only, _kernels_on):
        with ctx():
            params = [tt.nn.Parameter(a.copy()) for a in init]
            opt = tt.optim.Muon(params, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
            for step in range(3):
                for i, p in enumerate(params):
                    p.grad = normal(*p.shape, seed=100 * step + i)
                opt.step()
            runs.append([(p.data.copy(), opt.state[id(p)]["momentum_buffer"].copy()) for p in params])
    assert {"muon_momentum", "muon_apply"} <= set(CALLED)
    for (p_ref, m_ref), (p, m) in zip(*runs):
        np.testing.assert_allclose(p, p_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(m, m_ref, rtol=1e-6, atol=1e-7)
    assert not np.allclose(runs[1][0][0], init[0])

