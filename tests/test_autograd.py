"""Engine semantics: accumulation, graph freeing, deep graphs, no_grad, dtypes, errors, Tensor API."""
import builtins
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.functional as F

from engine_strategies import leaf, to_np

REPO = Path(__file__).resolve().parents[1]


# -- accumulation and graph lifetime ------------------------------------------------------------
def test_grads_accumulate_over_two_backward_calls(backend_name):
    x = leaf(backend_name, 3, 2)
    w = leaf(backend_name, 2, seed=1)
    (x * w).sum().backward()
    np.testing.assert_allclose(to_np(x.grad), np.broadcast_to(w.numpy(), (3, 2)))
    np.testing.assert_allclose(to_np(w.grad), x.numpy().sum(axis=0))
    (x * x).sum().backward()  # a second, separate graph into the same leaves
    np.testing.assert_allclose(to_np(x.grad), w.numpy() + 2 * x.numpy())
    np.testing.assert_allclose(to_np(w.grad), x.numpy().sum(axis=0))
    x.zero_grad()
    assert x.grad is None


def test_leaf_used_twice_in_one_graph_gets_the_summed_gradient(backend_name):
    x = leaf(backend_name, 4)
    y = x * 3.0 + x.exp() + x
    y.sum().backward()
    np.testing.assert_allclose(to_np(x.grad), 4.0 + np.exp(x.numpy()))


def test_backward_twice_through_the_same_graph_raises(backend_name):
    x = leaf(backend_name, 3)
    loss = (x * 2.0).exp().sum()
    loss.backward()
    first = to_np(x.grad).copy()
    with pytest.raises(RuntimeError, match="freed"):
        loss.backward()
    np.testing.assert_array_equal(to_np(x.grad), first)  # the failed call added nothing


def test_backward_needs_a_tensor_that_requires_grad(backend_name):
    x = tt.tensor(np.ones(3), backend=backend_name)
    with pytest.raises(RuntimeError, match="does not require grad"):
        x.sum().backward()


def test_deep_graph_of_100k_ops_backprops_iteratively():
    x = tt.tensor(np.array([1.5, -2.0]), requires_grad=True)
    one = tt.tensor(np.array(1.0))
    zero = tt.tensor(np.array(0.0))
    y = x
    for _ in range(50_000):  # 2 primitives each: 100,000 nodes deep (a recursive sort would overflow the stack)
        y = y * one + zero
    y = y * 3.0
    y.sum().backward()  # (no wall-clock bound: timings belong in bench/, this machine is shared)
    np.testing.assert_allclose(to_np(x.grad), [3.0, 3.0])
    np.testing.assert_allclose(y.numpy(), [4.5, -6.0])


def test_deep_graph_frees_without_recursion_error():
    # dropping a 100k-long chain must not recurse in the garbage collector either
    x = tt.tensor(np.array([2.0]), requires_grad=True)
    y = x
    for _ in range(100_000):
        y = y * 1.0
    del y
    gc.collect()
    assert x.grad is None


def test_intermediates_are_freed_after_backward(backend_name):
    x = leaf(backend_name, 4, 3)
    h = x * 3.0                      # an intermediate Tensor
    y = h * h                        # Mul keeps h's array for its backward
    loss = y.tanh().sum()
    h_ref, y_ref, h_data_ref = weakref.ref(h), weakref.ref(y), weakref.ref(h.data)
    del h, y
    gc.collect()
    assert h_ref() is not None and h_data_ref() is not None, "before backward the graph keeps them alive"
    loss.backward()
    gc.collect()
    assert h_ref() is None, "the intermediate Tensor outlived backward"
    assert y_ref() is None, "the intermediate Tensor outlived backward"
    assert h_data_ref() is None, "an array saved for backward outlived backward"
    assert loss._ctx is not None and loss._ctx.parents is None  # only the 'freed' marker is left
    assert x.grad is not None and x.grad.shape == (4, 3)


def test_saved_arrays_are_released_mid_graph(backend_name):
    # a Function in the middle of the graph drops what it saved once its backward ran
    x = leaf(backend_name, 5)
    mid = (x * 2.0).exp()
    fn = mid._ctx
    out = (mid * mid).sum()
    saved = weakref.ref(fn)
    del fn
    out.backward()
    assert mid._ctx is not None and mid._ctx.parents is None
    gc.collect()
    assert saved() is None


def test_no_grad_records_nothing(backend_name):
    x = leaf(backend_name, 3)
    with tt.no_grad():
        assert not tt.is_grad_enabled()
        y = (x * 2.0).exp().sum()
        with tt.enable_grad():
            z = x * 2.0
    assert tt.is_grad_enabled()
    assert y.requires_grad is False and y._ctx is None
    assert z.requires_grad is True and z._ctx is not None
    with pytest.raises(RuntimeError):
        y.backward()


def test_no_grad_restores_state_after_an_exception():
    with pytest.raises(ValueError):
        with tt.no_grad():
            raise ValueError("boom")
    assert tt.is_grad_enabled()


def test_ops_on_constants_record_nothing(backend_name):
    a = tt.tensor(np.ones(3), backend=backend_name)
    y = a * 2.0 + a
    assert not y.requires_grad and y._ctx is None


# -- dtypes -------------------------------------------------------------------------------------------
def test_dtype_rules():
    assert tt.tensor(np.ones(3, np.float32)).dtype == np.float32
    assert tt.tensor(np.ones(3, np.float64)).dtype == np.float64
    assert tt.tensor(np.arange(3)).dtype == np.int64
    assert tt.tensor(np.arange(3, dtype=np.int32)).dtype == np.int32
    assert tt.tensor(1.5).dtype == np.float32
    assert tt.tensor([1.0, 2.0]).dtype == np.float32
    assert tt.tensor([1, 2]).dtype == np.int64
    assert tt.tensor([True, False]).dtype == np.bool_
    assert tt.randn(2, 3).dtype == np.float32
    assert tt.rand(2, 3).dtype == np.float32
    assert tt.zeros(2).dtype == tt.ones(2).dtype == tt.full((2,), 3.0).dtype == np.float32
    assert tt.arange(4).dtype == np.int64
    assert tt.tensor(np.ones(2), dtype=np.float32).dtype == np.float32


def test_float32_stays_float32_through_arithmetic(backend_name):
    x = tt.randn(3, 4, requires_grad=True, backend=backend_name)
    assert x.dtype == np.float32
    for y in (x * 0.5, 0.5 * x, x + 1, 2 - x, x / 3.0, 1.0 / (x * x + 1.0), x ** 2, (x * x + 1.0).sqrt(), x.exp(),
              x.mean(), x.mean(axis=0), x.var(), x.sum(), x.max(), x.tanh(), x.sigmoid(), x.relu(),
              x @ x.T, tt.where(x > 0, x, 0.0), F.masked_fill(x, x > 0, -1e9)):
        assert y.dtype == np.float32, y
    x.mean().backward()
    assert x.grad.dtype == np.float32


def test_float64_stays_float64(backend_name):
    x = leaf(backend_name, 3)
    for y in (x * 0.5, x + 1, x.mean(), x / 2.0, tt.where(x > 0, x, 0.0)):
        assert y.dtype == np.float64


def test_int_stays_int(backend_name):
    i = tt.tensor(np.arange(6).reshape(2, 3), backend=backend_name)
    for y in (i * 2, i + 1, i.sum(), i.reshape(3, 2), i[0], i.max()):
        assert np.issubdtype(y.dtype, np.integer), y.dtype


def test_cast_to_int_carries_no_gradient(backend_name):
    x = leaf(backend_name, 3)
    i = x.astype(np.int64)
    assert i.dtype == np.int64 and not i.requires_grad and i._ctx is None
    f = x.astype(np.float32)
    assert f.dtype == np.float32 and f.requires_grad


def test_grad_dtype_and_shape_equal_data(backend_name):
    for dtype in (np.float32, np.float64):
        x = leaf(backend_name, 2, 3, dtype=dtype)
        b = leaf(backend_name, 3, seed=1, dtype=dtype)
        ((x + b) * (x + b)).sum().backward()
        for t in (x, b):
            assert t.grad.dtype == t.data.dtype and t.grad.shape == t.data.shape
            assert type(t.grad) is type(t.data)


# -- errors -------------------------------------------------------------------------------------------
def test_int_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="int64"):
        tt.tensor(np.arange(3), requires_grad=True)
    with pytest.raises(TypeError, match="int32"):
        tt.tensor(np.arange(3, dtype=np.int32)).requires_grad_()


def test_backward_on_non_scalar_needs_a_gradient(backend_name):
    y = leaf(backend_name, 2, 3) * 2.0
    with pytest.raises(RuntimeError, match=r"shape \(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"\(3,\)"):
        y.backward(np.ones(3))


def test_matmul_shape_mismatch_names_op_and_shapes(backend_name):
    a, b = leaf(backend_name, 2, 3), leaf(backend_name, 4, 5)
    with pytest.raises(ValueError) as info:
        a @ b
    msg = str(info.value)
    assert "mat_mul" in msg and "(2, 3)" in msg and "(4, 5)" in msg
    with pytest.raises(ValueError, match="mat_mul"):
        leaf(backend_name, 2, 3, 4) @ leaf(backend_name, 5, 4, 2)  # batch dims do not broadcast
    with pytest.raises(ValueError, match="mat_mul"):
        leaf(backend_name, 3) @ tt.tensor(np.array(2.0), backend=backend_name)


def test_add_broadcast_failure_names_both_shapes(backend_name):
    with pytest.raises(ValueError) as info:
        leaf(backend_name, 2, 3) + leaf(backend_name, 4)
    msg = str(info.value)
    assert "(2, 3)" in msg and "(4,)" in msg
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2,\)"):
        leaf(backend_name, 2, 3) * leaf(backend_name, 2)


def test_cross_entropy_out_of_range_target_names_the_index(backend_name):
    logits = leaf(backend_name, 3, 4)
    with pytest.raises(IndexError, match=r"\b7\b"):
        F.cross_entropy(logits, np.array([0, 7, 1]))
    with pytest.raises(IndexError, match="-3"):
        F.cross_entropy(logits, np.array([0, -3, 1]))
    F.cross_entropy(logits, np.array([0, -1, 3]))  # -1 is the ignore_index: fine


def test_cross_entropy_float_nan_targets_raise_type_error(backend_name):
    logits = leaf(backend_name, 3, 4)
    with pytest.raises(TypeError, match="NaN"):
        F.cross_entropy(logits, np.array([0.0, np.nan, 1.0]))
    with pytest.raises(TypeError, match="float"):
        F.cross_entropy(logits, np.array([0.0, 2.0, 1.0]))


def test_embedding_index_out_of_range(backend_name):
    w = leaf(backend_name, 5, 2)
    with pytest.raises(IndexError, match=r"\b5\b"):
        F.embedding(np.array([0, 5]), w)
    with pytest.raises(IndexError):
        F.embedding(np.array([[-1]]), w)


def test_mixing_numpy_and_cupy_raises_backend_error():
    if not tt.cupy_available():
        pytest.skip("CuPy with a GPU is not available")
    a = tt.tensor(np.ones(3), backend="numpy")
    b = tt.tensor(np.ones(3), backend="cupy")
    with pytest.raises(tt.BackendError, match="different backends"):
        a + b
    with pytest.raises(tt.BackendError):
        b @ a


def test_get_xp_cupy_without_cupy_explains_the_fix(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError("No module named 'cupy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(tt.backend, "_cupy", None)
    with pytest.raises(tt.BackendError) as info:
        tt.backend.get_xp("cupy")
    msg = str(info.value)
    assert "pip install" in msg and "numpy" in msg
    assert tt.cupy_available() is False
    with pytest.raises(tt.BackendError):
        tt.zeros(2, backend="cupy")


def test_unknown_backend_name():
    with pytest.raises(tt.BackendError, match="torch"):
        tt.backend.get_xp("torch")
    with pytest.raises(tt.BackendError):
        tt.tensor(np.ones(2), backend="jax")
    assert issubclass(tt.BackendError, RuntimeError)


# -- allocator tuning (tinytensor.memory): programs and the first backward, never an import ---------------------
def test_importing_tinytensor_leaves_the_allocator_alone():
    code = ("import ctypes\n"
            "loaded = []\n"
            "real_cdll = ctypes.CDLL\n"
            "ctypes.CDLL = lambda name, *a, **k: loaded.append(name) or real_cdll(name, *a, **k)\n"
            "import numpy as np, tinytensor, tinytensor.nn, tinytensor.optim, tinytensor.ops\n"
            "with tinytensor.no_grad():\n"
            "    tinytensor.nn.Linear(3, 2)(tinytensor.ones(4, 3))  # forward passes leave it alone too\n"
            "assert not [n for n in loaded if 'libc' in str(n)], loaded\n"
            "assert tinytensor.memory._state['applied'] is False\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(REPO)})


class _FakeLibc:
    """Stands in for glibc: records mallopt calls, accepts them as glibc does (returns 1)."""

    def __init__(self):
        self.calls = []
        self.mallopt = lambda param, value: self.calls.append((param, value)) or 1

    def gnu_get_libc_version(self):
        return b"2.99"

    @staticmethod
    def real_glibc() -> bool:
        return tt.memory._mallopt() is not None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_freed_memory_applies_once_and_can_be_switched_off(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(tt.memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(tt.memory, "_state", {"applied": False, "reason": None})
    monkeypatch.setenv("TINYTENSOR_MALLOC_TUNING", "0")
    assert tt.backend.keep_freed_memory() is False and libc.calls == []
    assert "TINYTENSOR_MALLOC_TUNING=0" in tt.memory.describe()
    monkeypatch.delenv("TINYTENSOR_MALLOC_TUNING")
    monkeypatch.setattr(tt.memory, "_state", {"applied": False, "reason": None})
    assert tt.backend.keep_freed_memory() is True
    assert tt.backend.keep_freed_memory() is True
    assert libc.calls == list(tt.memory.SETTINGS)  # applied once
    assert (tt.memory.M_MMAP_MAX, 0) in libc.calls  # every block from the heap: no mmap, no page faults
    assert (tt.memory.M_TRIM_THRESHOLD, -1) in libc.calls  # -1 = never trim (mallopt(3))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
@pytest.mark.parametrize("switch", ["", "0"])
def test_the_first_numpy_backward_tunes_the_allocator_unless_switched_off(monkeypatch, switch):
    libc = _FakeLibc()
    monkeypatch.setattr(tt.memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(tt.memory, "_state", {"applied": False, "reason": None})
    monkeypatch.setenv("TINYTENSOR_MALLOC_TUNING", switch or "1")
    x = tt.tensor(np.ones(3, np.float32), requires_grad=True)
    with tt.no_grad():
        x * 2  # a forward alone leaves it
    assert libc.calls == []
    (x * x).sum().backward()
    (x * x).sum().backward()
    assert libc.calls == ([] if switch == "0" else list(tt.memory.SETTINGS))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_after_tuning_a_big_temporary_reuses_mapped_memory():
    """In fresh processes: after the first backward, a new 64 MB array lands in the memory a freed
    one left mapped (no page faults); with TINYTENSOR_MALLOC_TUNING=0 glibc maps it anew and every
    page (or huge page) faults in again."""
    code = ("import resource, numpy as np, tinytensor as tt\n"
            "x = tt.tensor(np.ones(3, np.float32), requires_grad=True); (x * x).sum().backward()\n"
            "a = np.ones(16 << 20, np.float32); del a\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "b = np.ones(16 << 20, np.float32)\n"
            "print(tt.memory._state['applied'], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")
    out = {}
    for switch in ("1", "0"):
        env = {**os.environ, "PYTHONPATH": str(REPO), "TINYTENSOR_MALLOC_TUNING": switch}
        applied, faults = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True,
                                         text=True).stdout.split()
        out[switch] = (applied, int(faults))
    if not _FakeLibc.real_glibc():
        pytest.skip("not glibc: nothing is tuned")
    assert out["1"][0] == "True" and out["0"][0] == "False", out
    # 64 MB is 32 huge pages or 16384 small ones: untuned it faults at least 32 times, tuned (almost) never
    assert out["0"][1] >= 32 and out["1"][1] < 8, out


# -- Tensor API -------------------------------------------------------------------------------------------
def test_transpose_view_permute(backend_name):
    a = np.arange(24.0).reshape(2, 3, 4)
    x = tt.tensor(a, requires_grad=True, backend=backend_name)
    np.testing.assert_array_equal(x.T.numpy(), a.swapaxes(-1, -2))
    np.testing.assert_array_equal(x.transpose(0, 2).numpy(), a.transpose(2, 1, 0))
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), a.transpose(1, 2, 0))
    np.testing.assert_array_equal(x.permute((2, 0, 1)).numpy(), a.transpose(2, 0, 1))
    np.testing.assert_array_equal(x.view(6, 4).numpy(), a.reshape(6, 4))
    np.testing.assert_array_equal(x.view(-1).numpy(), a.reshape(-1))
    np.testing.assert_array_equal(x.reshape((4, -1)).numpy(), a.reshape(4, 6))
    v = tt.tensor(np.arange(3.0), backend=backend_name)
    assert v.T is v
    y = (x.T * tt.tensor(np.arange(3.0), backend=backend_name)).sum()
    y.backward()
    np.testing.assert_array_equal(to_np(x.grad), np.broadcast_to(np.arange(3.0)[:, None], (2, 3, 4)))
    with pytest.raises(ValueError, match="reshape"):
        x.view(5, 5)
    with pytest.raises(ValueError, match="permute"):
        x.permute(0, 1)


def test_split(backend_name):
    a = np.arange(14.0).reshape(2, 7)
    x = tt.tensor(a, requires_grad=True, backend=backend_name)
    parts = x.split(3, axis=1)
    assert [p.shape for p in parts] == [(2, 3), (2, 3), (2, 1)]
    for p, r in zip(parts, np.split(a, [3, 6], axis=1)):
        np.testing.assert_array_equal(p.numpy(), r)
    parts = F.split(x, [2, 0, 5], axis=-1)
    assert [p.shape for p in parts] == [(2, 2), (2, 0), (2, 5)]
    (parts[0].sum() * 2.0 + parts[2].sum()).backward()
    np.testing.assert_array_equal(to_np(x.grad), np.array([[2, 2, 1, 1, 1, 1, 1]] * 2, dtype=float))
    assert len(x.split(1, axis=0)) == 2
    with pytest.raises(ValueError, match="add up"):
        x.split([3, 3], axis=1)
    with pytest.raises(ValueError):
        x.split(0)


def test_cat_and_stack(backend_name):
    a, b = leaf(backend_name, 2, 3), leaf(backend_name, 1, 3, seed=1)
    c = tt.cat([a, b], axis=0)
    np.testing.assert_array_equal(c.numpy(), np.concatenate([a.numpy(), b.numpy()]))
    (c * tt.tensor(np.arange(9.0).reshape(3, 3), backend=backend_name)).sum().backward()
    np.testing.assert_array_equal(to_np(a.grad), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(to_np(b.grad), np.arange(6.0, 9.0).reshape(1, 3))
    assert tt.cat([a, a], axis=-1).shape == (2, 6)
    s = tt.stack([a, a * 2.0, a * 3.0], axis=1)
    assert s.shape == (2, 3, 3)
    np.testing.assert_allclose(s.numpy(), np.stack([a.numpy(), 2 * a.numpy(), 3 * a.numpy()], axis=1))
    assert tt.stack([a, a], axis=-1).shape == (2, 3, 2)
    with pytest.raises(ValueError, match="same shape"):
        tt.stack([a, b])
    with pytest.raises(ValueError):
        tt.cat([])


def test_masked_fill_and_where_with_scalars(backend_name):
    a = np.array([[1.0, -2.0], [3.0, -4.0]])
    x = tt.tensor(a, requires_grad=True, backend=backend_name)
    mask = x < 0
    y = F.masked_fill(x, mask, -1e9)
    np.testing.assert_array_equal(y.numpy(), np.where(a < 0, -1e9, a))
    y.sum().backward()
    np.testing.assert_array_equal(to_np(x.grad), (a >= 0).astype(float))
    z = tt.where(x > 0, x, 0.0)
    np.testing.assert_array_equal(z.numpy(), np.maximum(a, 0))
    z2 = tt.where(x > 0, 1.0, x)
    np.testing.assert_array_equal(z2.numpy(), np.where(a > 0, 1.0, a))
    with pytest.raises(TypeError, match="bool"):
        tt.where(tt.tensor(np.ones(2), backend=backend_name), x[0], x[1])


def test_comparisons_return_bool_tensors_without_grad(backend_name):
    x = leaf(backend_name, 3)
    y = leaf(backend_name, 3, seed=1)
    for c in (x < y, x <= y, x > 0, x >= 0.5, x == y, x != y, x > y.detach()):
        assert isinstance(c, tt.Tensor)
        assert c.dtype == np.bool_ and not c.requires_grad and c._ctx is None and c.shape == (3,)
    np.testing.assert_array_equal((x < y).numpy(), x.numpy() < y.numpy())
    assert {x: 1}[x] == 1  # still hashable


def test_item_numpy_detach_backend(backend_name):
    x = tt.tensor(np.array([[2.5]]), requires_grad=True, backend=backend_name)
    assert x.item() == 2.5 and isinstance(x.item(), float)
    assert tt.tensor(np.array(3), backend=backend_name).item() == 3
    with pytest.raises(ValueError, match="one element"):
        leaf(backend_name, 2).item()
    n = x.numpy()
    assert isinstance(n, np.ndarray) and n.shape == (1, 1)
    d = (x * 2.0).detach()
    assert not d.requires_grad and d._ctx is None and d.item() == 5.0
    assert x.backend == backend_name and d.backend == backend_name
    assert x.shape == (1, 1) and x.ndim == 2 and x.size == 1 and len(x) == 1
    assert x.is_leaf and not (x * 2.0).is_leaf
    assert "requires_grad=True" in repr(x)


def test_getitem_with_tensor_and_list_indices(backend_name):
    a = np.arange(12.0).reshape(4, 3)
    x = tt.tensor(a, requires_grad=True, backend=backend_name)
    idx = tt.tensor(np.array([3, 0, 3]), backend=backend_name)
    np.testing.assert_array_equal(x[idx].numpy(), a[[3, 0, 3]])
    np.testing.assert_array_equal(x[[1, 1]].numpy(), a[[1, 1]])
    np.testing.assert_array_equal(x[x > 5].numpy(), a[a > 5])
    x[idx].sum().backward()
    np.testing.assert_array_equal(to_np(x.grad)[:, 0], [1, 0, 0, 2])
