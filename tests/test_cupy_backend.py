"""What the CuPy backend needs beyond the shared engine tests: the bugs the stand-in found
(each test names its bug), the start-up kernel check, and host syncs counted per op.

Every backend test here runs on NumPy too (the same behaviour on both); the sync counts and the
injected toolkit failure need the stand-in and skip on a real GPU.
"""
import json
import warnings

import numpy as np
import pytest

import cupy_standin
import tinytensor as tt
import tinytensor.functional as F
from engine_strategies import leaf, normal, to_np

standin_only = pytest.mark.skipif(not cupy_standin.installed(), reason="counts need the CuPy stand-in")


# -- bugs the stand-in found ------------------------------------------------------------------------------
def test_python_numbers_become_float32_on_every_backend(backend_name):
    """Was: tt.tensor(2.0, backend="cupy") was float64 (moved to the device before the float32 rule)."""
    for data in (2.0, [1.0, 2.5], [[0.5]]):
        t = tt.tensor(data, backend=backend_name)
        assert t.dtype == np.float32 and t.backend == backend_name, data
    assert tt.tensor(3, backend=backend_name).dtype == np.int64
    assert tt.tensor([True, False], backend=backend_name).dtype == np.bool_
    assert tt.tensor(2.0, dtype=np.float64, backend=backend_name).dtype == np.float64
    assert tt.tensor(normal(0, (2,)), backend=backend_name).dtype == np.float64  # arrays keep theirs


def test_an_array_on_the_left_hands_over_to_the_tensor(backend_name, xp):
    """Was: cupy_array + Tensor raised TypeError (the Tensor's __array_priority__ only ties CuPy's)."""
    x = leaf(backend_name, 3)
    a = xp.asarray(np.array([1.0, 2.0, 4.0]))
    results = {"+": a + x, "-": a - x, "*": a * x, "/": a / x, "@": a @ x, "**": a ** (x * 0.0 + 1.0)}
    for op, y in results.items():
        assert isinstance(y, tt.Tensor) and y.backend == backend_name, op
    np.testing.assert_allclose(to_np(results["-"].data), [1, 2, 4] - to_np(x.data))
    (a * x).sum().backward()
    np.testing.assert_allclose(to_np(x.grad), [1.0, 2.0, 4.0])
    for cmp in (a < x, a == x):
        assert isinstance(cmp, tt.Tensor) and cmp.dtype == np.bool_
    y = np.float32(2) * tt.ones(3, backend=backend_name)  # a NumPy scalar on the left keeps float32
    assert isinstance(y, tt.Tensor) and y.dtype == np.float32


def test_comparisons_lift_host_arrays_like_arithmetic(backend_name):
    """Was: a CuPy tensor compared with a NumPy array (or a list) raised TypeError."""
    x = tt.tensor(np.array([0.0, 1.0, 2.0]), backend=backend_name)
    assert (x > np.array([1.0, 1.0, 1.0])).tolist() == [False, False, True]
    assert (x == [0.0, 5.0, 2.0]).tolist() == [True, False, True]
    assert (np.array([1.0, 1.0, 1.0]) <= x).tolist() == [False, True, True]
    assert (x < 1.5).backend == backend_name


def test_the_rng_state_resumes_dropout_exactly(backend_name):
    """Was: on CuPy the dropout generator's state was not saved (a resume re-seeded it afresh)."""
    tt.manual_seed(3)
    x = tt.ones(4, 64, backend=backend_name)
    F.dropout(x, 0.5)  # draws before the checkpoint
    state = json.loads(json.dumps(tt.get_rng_state()))  # as a checkpoint's JSON stores it
    assert state["bit_generator"] == "PCG64"  # the format gpt checkpoints validate
    after = [F.dropout(x, 0.5).numpy() for _ in range(3)]
    tt.get_rng_state()  # reading the state changes nothing
    F.dropout(x, 0.5)
    tt.set_rng_state(state)
    again = [F.dropout(x, 0.5).numpy() for _ in range(3)]
    for a, b in zip(after, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(after[0], after[1])
    # the same masks whether or not the state was read on the way
    tt.set_rng_state(state)
    F.dropout(x, 0.5)
    tt.get_rng_state()
    np.testing.assert_array_equal(F.dropout(x, 0.5).numpy(), after[1])


# -- a broken CUDA toolkit fails at start-up, in one line ----------------------------------------------------------
@standin_only
def test_a_kernel_that_cannot_compile_is_one_backend_error_at_start_up(monkeypatch):
    monkeypatch.setattr(tt.backend, "_cupy", None)  # as in a fresh process
    nvrtc = RuntimeError("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open shared object "
                         "file: No such file or directory\n(and more lines)")
    with cupy_standin.failing_kernels(nvrtc), pytest.raises(tt.BackendError) as info:
        tt.backend.get_xp("cupy")
    msg = str(info.value)
    assert "\n" not in msg and "libnvrtc.so.12" in msg and "NVRTC" in msg and "--backend numpy" in msg
    assert tt.backend._cupy is None and tt.backend.get_xp("cupy") is cupy_standin.cupy  # fine once it is


# -- host syncs: none per op, where the indices come from the host ---------------------------------------------------
@standin_only
def test_cross_entropy_reads_nothing_back_for_host_targets():
    logits_np, targets = normal(0, (6, 5)).astype(np.float32), np.array([0, 4, -1, 2, 2, 1])
    ref = tt.tensor(logits_np, requires_grad=True)
    F.cross_entropy(ref, targets).backward()
    x = tt.tensor(logits_np, requires_grad=True, backend="cupy")
    with cupy_standin.count_syncs() as syncs:
        loss = F.cross_entropy(x, targets)
        loss.backward()
    assert syncs.n == 0, syncs
    assert loss.dtype == np.float32 and loss.item() == pytest.approx(F.cross_entropy(ref, targets).item(), rel=1e-6)
    np.testing.assert_allclose(to_np(x.grad), ref.grad, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 warning when every target is ignored
        assert np.isnan(F.cross_entropy(x, np.array([-1] * 6)).item())


@standin_only
def test_device_indices_cost_one_read_and_are_still_checked():
    w = leaf("cupy", 5, 3)
    with cupy_standin.count_syncs() as host:
        F.embedding(np.array([[0, 4], [1, 1]]), w)
    assert host.n == 0, host
    idx = tt.tensor(np.array([0, 4, 2]), backend="cupy")
    with cupy_standin.count_syncs() as device:
        F.embedding(idx, w)
    assert device.n == 1, device
    # CuPy would wrap index 5 around to row 0 silently: the check must catch it on the device too
    with pytest.raises(IndexError, match=r"\b5\b"):
        F.embedding(tt.tensor(np.array([0, 5]), backend="cupy"), w)
    with pytest.raises(IndexError, match="-2"):
        F.cross_entropy(leaf("cupy", 2, 5), tt.tensor(np.array([-2, -1]), backend="cupy"))


@standin_only
def test_clip_grad_norm_reads_the_norm_once():
    params = [leaf(b, *shape, seed=i, dtype=np.float32) for i, shape in enumerate([(4, 3), (3,), (2, 2, 2)])
              for b in ("numpy", "cupy")]
    for p in params:
        p.grad = p.xp.asarray(p.numpy() * 3)
    host, device = params[0::2], params[1::2]
    expected = tt.nn.utils.clip_grad_norm_(host, 1.0)
    with cupy_standin.count_syncs() as syncs:
        total = tt.nn.utils.clip_grad_norm_(device, 1.0)
    assert syncs.n == 1, syncs
    assert isinstance(total, float) and total == pytest.approx(expected, rel=1e-12) and total > 1.0
    for h, d in zip(host, device):
        np.testing.assert_array_equal(to_np(d.grad), h.grad)
