"""The fused CPU kernels (tinytensor/kernels, Numba) against the NumPy path they sit under,
which stays the reference: each kernel-backed primitive gives the same outputs and gradients
(to float32 rounding) with the kernels on and off (``kernels.numpy_only``). The ops are also
compared with PyTorch in float32 by tests/test_torch_parity.py and the whole GPT by
tests/test_gpt_torch.py, which run on the kernels when numba is installed."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.functional as F
from tinytensor import kernels

pytest.importorskip("numba", reason="numba is not installed: the NumPy path is the only one")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, params=["serial", "parallel"])
def variant(request, monkeypatch):
    """Every test runs on both copies of each kernel: the one on the calling thread (small
    arrays) and the one split over the cores (here forced for any size)."""
    if request.param == "parallel":
        monkeypatch.setattr(kernels.module(), "PARALLEL_MIN", 0)
    return request.param
TOL = dict(rtol=1e-4, atol=1e-5)  # float32 rounding, as tests/test_torch_parity.py


def run_both(fn, *arrays, uses, grad_seed=0):
    """fn(*tensors) with the kernels and with NumPy only: (outputs, input grads) of each.
    ``uses``: the kernels the first must have run."""
    results = []
    for ctx in (kernels.numpy_only, _kernels_on):
        with ctx():
            leaves = [tt.tensor(a.copy(), requires_grad=a.dtype.kind == "f") for a in arrays]
            tt.manual_seed(0)  # the same dropout masks on both paths
            out = fn(*leaves)
            g = np.random.default_rng(grad_seed).standard_normal(out.shape).astype(out.dtype)
            out.backward(g)
            results.append((out.numpy(), [t.grad for t in leaves if t.requires_grad]))
    assert set(uses) <= set(CALLED), f"kernels {set(uses) - set(CALLED)} did not run"
    return results


CALLED = []  # the kernels that ran inside the last _kernels_on block


class _kernels_on:
    """The kernels on, recording which ran (a test proves its primitive took the kernel path)."""

    def __enter__(self):
        assert kernels.for_arrays(np.zeros(2, np.float32)) is not None, kernels.reason()
        cls = type(kernels.module().gelu_forward)
        self.call, CALLED[:] = cls.__call__, []

        def recording(kernel, *args):
            CALLED.append(kernel.__name__)
            return self.call(kernel, *args)
        cls.__call__ = recording

    def __exit__(self, *exc):
        type(kernels.module().gelu_forward).__call__ = self.call
        return False


def assert_same(results, **tol):
    (ref_out, ref_grads), (out, grads) = results
    assert out.dtype == ref_out.dtype
    np.testing.assert_allclose(out, ref_out, **(tol or TOL))
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == ref.dtype and g.shape == ref.shape
        np.testing.assert_allclose(g, ref, **(tol or TOL))


def normal(*shape, scale=1.0, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_layer_norm(affine):
    x, w, b = normal(3, 5, 48, scale=3.0), normal(48, seed=1) + 1, normal(48, seed=2)
    if affine == "weight+bias":
        assert_same(run_both(lambda x, w, b: F.layer_norm(x, w, b), x, w, b, uses=("layer_norm_forward", "layer_norm_backward")))
    elif affine == "weight":
        assert_same(run_both(lambda x, w: F.layer_norm(x, w, None), x, w, uses=("layer_norm_forward", "layer_norm_backward")))
    else:
        assert_same(run_both(lambda x: F.layer_norm(x, None, None), x, uses=("layer_norm_forward", "layer_norm_backward")))


def test_layer_norm_of_a_non_contiguous_input():
    x = normal(40, 6)
    assert_same(run_both(lambda x: F.layer_norm(x.T), x, uses=("layer_norm_forward", "layer_norm_backward")))


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_gelu(scale):
    assert_same(run_both(F.gelu, normal(7, 300, scale=scale), uses=("gelu_forward", "gelu_backward")))


def test_gelu_tails_and_nan():
    x = np.array([-1e4, -30.0, -8.0, -1e-5, 0.0, 1e-5, 8.0, 30.0, 1e4, np.nan], np.float32)
    (ref, ref_g), (out, g) = run_both(F.gelu, x, uses=("gelu_forward", "gelu_backward"))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert np.isnan(out[-1]) and np.isnan(g[0][-1])


@pytest.mark.parametrize("ignore", [False, True])
def test_cross_entropy(ignore):
    targets = np.random.default_rng(3).integers(0, 65, 50)
    if ignore:
        targets[::4] = -1
    assert_same(run_both(lambda x: F.cross_entropy(x, targets), normal(50, 65, scale=4.0),
                         uses=("cross_entropy_forward", "cross_entropy_backward")))


def test_cross_entropy_with_every_target_ignored_is_nan():
    out = F.cross_entropy(tt.tensor(normal(3, 5)), np.full(3, -1))
    assert np.isnan(out.item())


def test_embedding_backward():
    idx = np.random.default_rng(4).integers(0, 11, (6, 9))
    idx[0, :5] = 3  # repeated rows add up
    assert_same(run_both(lambda w: F.embedding(idx, w), normal(11, 40), uses=("embedding_backward",)))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_multi_head_attention(dropout):
    uses = ("softmax_rows", "dropout_forward", "softmax_dropout_backward_rows") if dropout else (
        "softmax_rows", "softmax_backward_rows")
    assert_same(run_both(lambda qkv: F.multi_head_attention(qkv, 4, dropout_p=dropout), normal(2, 17, 96),
                         uses=uses))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_is_the_numpy_path_bit_for_bit(p):
    x = normal(5, 7, 33)
    x[0, 0, :3] = [np.nan, -0.0, np.inf]
    (ref, ref_g), (out, g) = run_both(lambda x: F.dropout(x, p), x, uses=("dropout_forward", "dropout_backward"))
    assert 0.05 < np.mean(out == 0) < 0.95  # some dropped, some kept
    np.testing.assert_array_equal(out, ref)  # the same draws, the same mask, the same rounding
    np.testing.assert_array_equal(g[0], ref_g[0])


def test_dropout_of_a_non_contiguous_input():
    assert_same(run_both(lambda x: F.dropout(x.T, 0.3), normal(40, 6), uses=("dropout_forward", "dropout_backward")))


@pytest.mark.parametrize("causal, tq, tk", [(True, 5, 12), (False, 7, 12), (True, 1, 9)])
def test_scaled_dot_product_attention(causal, tq, tk):
    q, k, v = normal(2, 3, tq, 8), normal(2, 3, tk, 8, seed=1), normal(2, 3, tk, 8, seed=2)
    assert_same(run_both(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=causal), q, k, v,
                         uses=("softmax_rows", "softmax_backward_rows")))


@pytest.mark.parametrize("axis", [-1, 2])
def test_softmax_over_the_last_axis(axis):
    x = normal(3, 4, 37, scale=5.0)
    assert_same(run_both(lambda x: F.softmax(x, axis=axis), x, uses=("softmax_rows_to", "softmax_backward_rows_to")))


def test_softmax_over_another_axis_and_of_a_view():
    assert_same(run_both(lambda x: F.softmax(x, axis=0), normal(6, 9), uses=()))
    assert_same(run_both(lambda x: F.softmax(x.T, axis=-1), normal(6, 9), uses=("softmax_rows_to",)))


def test_softmax_rows_masks_exactly():
    a = normal(2 * 4, 6, scale=10.0)
    kernels.module().softmax_rows(a, 4, True)  # queries are the last 4 of 6 positions
    visible = np.arange(6)[None, :] <= (np.arange(4)[:, None] + 2)
    assert np.all(a.reshape(2, 4, 6)[:, ~visible] == 0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=1e-6)


def test_exp_and_tanh_polynomials_against_numpy():
    from numba import njit
    cpu = kernels.module()

    @njit
    def both(x, e, t):
        for i in range(x.size):
            e[i], t[i] = cpu._exp(x[i]), cpu._tanh(x[i])

    x = np.concatenate([np.linspace(-87, 80, 200_001), np.linspace(-1e-3, 1e-3, 1001)]).astype(np.float32)
    e, t = np.empty_like(x), np.empty_like(x)
    both(x, e, t)
    np.testing.assert_allclose(e, np.exp(x.astype(np.float64)), rtol=5e-7)
    np.testing.assert_allclose(t, np.tanh(x.astype(np.float64)), rtol=2e-6, atol=5e-7)
    special = np.array([-np.inf, -200.0, np.nan], np.float32)
    both(special, e[:3], t[:3])
    assert e[0] == 0 and e[1] == 0 and np.isnan(e[2]) and t[0] == -1 and np.isnan(t[2])


def test_adamw_steps_match_the_numpy_path():
    def train(ctx):
        with ctx():
            tt.manual_seed(0)
            model = tt.nn.Sequential(tt.nn.Linear(6, 16), tt.nn.GELU(), tt.nn.Linear(16, 3))
            opt = tt.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
            x = tt.tensor(normal(10, 6))
            for _ in range(5):
                opt.zero_grad()
                (model(x) ** 2).mean().backward()
                opt.step()
            return [p.data.copy() for p in model.parameters()], opt.state_dict()

    (ref, ref_state), (ours, state) = train(kernels.numpy_only), train(_kernels_on)
    assert "adamw_step" in CALLED
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for i, s in ref_state["state"].items():
        assert state["state"][i]["step"] == s["step"] == 5
        np.testing.assert_allclose(state["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-4, atol=1e-12)


def test_other_arrays_take_the_numpy_path():
    assert kernels.for_arrays(np.zeros(3, np.float64)) is None
    assert kernels.for_arrays(np.zeros((3, 4), np.float32).T) is None
    assert kernels.for_arrays(np.zeros(3, np.float16)) is None
    with kernels.numpy_only():
        assert kernels.for_arrays(np.zeros(3, np.float32)) is None


def test_the_environment_variable_turns_them_off():
    code = "import tinytensor.kernels as k, numpy as np; print(k.for_arrays(np.zeros(1, np.float32)) is None); print(k.describe())"
    env = {**os.environ, "PYTHONPATH": str(REPO), kernels.ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["True", f"kernels: NumPy only, off ({kernels.ENV}=0)"]


def test_threads_other_than_the_main_one_run_the_serial_copies():
    """Numba's workqueue layer aborts on parallel kernels launched from two threads at once."""
    import threading
    x = normal(1024, 1024)
    assert x.size >= kernels.module().PARALLEL_MIN or kernels.module().PARALLEL_MIN == 0
    want = F.gelu(tt.tensor(x)).numpy()
    results = [None] * 4

    def work(i):
        results[i] = F.gelu(tt.tensor(x)).numpy()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_allclose(r, want, rtol=1e-6, atol=1e-7)


def test_warm_up_runs_every_kernel_both_copies(monkeypatch):
    k = kernels.module()
    ran = []
    for kern in k._KERNELS:
        for copy in ("parallel", "serial"):
            real = getattr(kern, copy)
            monkeypatch.setattr(kern, copy, lambda *a, _real=real, _n=f"{kern.__name__}.{copy}": (ran.append(_n), _real(*a))[1])
    assert kernels.warm_up() > 0
    assert sorted(ran) == sorted(f"{kern.__name__}.{c}" for kern in k._KERNELS for c in ("parallel", "serial"))


def test_softmax_row_max_in_every_lane_and_nan_rows():
    """The row max runs in eight running maxima plus a tail: put the max in each lane and in the
    tail; a NaN anywhere in a row makes the whole row NaN (as the NumPy path), other rows intact."""
    x = normal(21, 19)
    for i in range(19):
        x[i, i] = 200.0  # the max, at column i (every lane and the tail); a missed max: exp(197) = inf
    x[19, 3] = np.nan
    x[20, 17] = np.nan  # in the tail
    with kernels.numpy_only():
        want = F.softmax(tt.tensor(x), axis=-1).numpy()
    got = F.softmax(tt.tensor(x), axis=-1).numpy()
    assert np.isnan(got[19:]).all() and np.isnan(want[19:]).all()
    np.testing.assert_allclose(got[:19], want[:19], **TOL)
    np.testing.assert_allclose(got[:19].max(axis=1), 1.0, rtol=1e-6)


def test_parallel_threshold_from_the_environment(monkeypatch):
    k = kernels.module()
    monkeypatch.delenv("TINYTENSOR_PARALLEL_MIN", raising=False)
    assert k._parallel_min(default=123) == 123
    monkeypatch.setenv("TINYTENSOR_PARALLEL_MIN", "4096")
    assert k._parallel_min(default=123) == 4096
    for bad in ("-1", "1e6", "lots"):
        monkeypatch.setenv("TINYTENSOR_PARALLEL_MIN", bad)
        with pytest.warns(UserWarning, match="TINYTENSOR_PARALLEL_MIN"):
            assert k._parallel_min(default=123) == 123
