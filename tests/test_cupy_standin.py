"""The CuPy stand-in (tests/cupy_standin.py) catches the classic mistakes of GPU code, as CuPy
does, and counts host syncs. These test the stand-in itself, so they run whether or not it is
the suite's "cupy" backend."""
import numpy as np
import pytest

import cupy_standin as cs
import tinytensor as tt

cp, cupyx = cs.cupy, cs.cupyx


def test_no_implicit_conversion_to_numpy():
    a = cp.arange(3.0)
    for convert in (np.asarray, np.array, lambda x: np.zeros(3) + x, lambda x: np.float64(0.5) + np.asarray(x)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed|cupy array"):
            convert(a)
    with cs.count_syncs() as syncs:
        host = a.get()
    assert isinstance(host, np.ndarray) and host.tolist() == [0.0, 1.0, 2.0] and syncs.n == 1


def test_no_host_array_in_an_operator_or_a_function():
    a, host = cp.arange(3.0), np.ones(3)
    for mistake in (lambda: a + host, lambda: host + a, lambda: a * host, lambda: a < host, lambda: a @ host,
                    lambda: cp.where(host > 0, a, 0.0), lambda: cp.concatenate([a, host]),
                    lambda: a.__iadd__(host)):
        with pytest.raises(TypeError):
            mistake()
    with pytest.raises(TypeError, match="host array"):
        a[...] = host
    # scalars, NumPy scalars on either side, and explicit transfers are fine, as in CuPy
    assert (a + 1).get().tolist() == (1 + a).get().tolist() == (np.float32(1) + a).get().tolist() == [1, 2, 3]
    assert (a + cp.asarray(host)).get().tolist() == [1, 2, 3]
    assert a[np.array([2, 0])].get().tolist() == [2.0, 0.0]  # a host index array is copied over


def test_no_numpy_function_on_a_device_array():
    a = cp.zeros(3)
    with pytest.raises(TypeError, match="add.at"):
        np.add.at(a, np.array([0, 0]), 1.0)
    for mistake in (lambda: np.exp(a), lambda: np.concatenate([a, a]), lambda: np.isfinite(a).all()):
        with pytest.raises(TypeError, match="NumPy functions do not run on the GPU"):
            mistake()
    cupyx.scatter_add(a, np.array([0, 0, 2]), 1.0)  # the CuPy way
    assert a.get().tolist() == [2.0, 0.0, 1.0]


def test_only_functions_cupy_has():
    assert cp.__name__ == "cupy" and callable(cp.einsum) and callable(cp.random.RandomState)
    for missing in ("asfortranarray_standin", "add_at", "lib", "ufunc_at"):
        assert not hasattr(cp, missing)
    rs = cp.random.RandomState(0, method=cp.cuda.curand.CURAND_RNG_PSEUDO_PHILOX4_32_10)
    for reading in ("get_state", "state", "bit_generator"):
        assert not hasattr(rs, reading)  # cuRAND's state is not readable in CuPy either
    first = rs.random_sample((3,), np.float32)
    rs.seed(0)
    assert isinstance(first, cp.ndarray) and (rs.random_sample((3,), np.float32) == first).all()


def test_results_are_device_arrays_like_cupys():
    a = cp.asarray(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))
    for result in (a.sum(), a[0, 1], a.max(), cp.vdot(a.ravel(), a.ravel())):
        assert isinstance(result, cp.ndarray) and result.ndim == 0
    view = a[0, 1]
    view += 10  # a full integer index is a 0-d view, as in CuPy
    assert a.get()[0, 1] == 12.0
    assert a.astype(np.float32, copy=False) is a and a.T.shape == (2, 2)
    # integer index arrays wrap around (CuPy checks no bounds), scalar indices are checked
    assert cp.arange(3)[np.array([3, -1])].get().tolist() == [0, 2]
    with pytest.raises(IndexError):
        cp.arange(3)[3]


def test_syncs_are_counted_where_they_happen():
    a = cp.arange(4.0)
    with cs.count_syncs() as syncs:
        float(a.sum()), int(a[1]), bool(a[1] > 0), a[2].item(), a.tolist(), repr(a), cp.asnumpy(a)
        a[a > 1]  # the result's size is read back
    kinds = [kind for kind, _ in syncs.events]
    assert kinds == ["float()", "int()", "bool()", "item()", "tolist()", "repr()", "get()", "boolean-mask index"]
    assert all("test_cupy_standin.py" in where for _, where in syncs.events), syncs
    with cs.count_syncs() as none:
        b = (a * 2 + 1).sum() / a.size
        b = cp.where(a > 1, a, b)[np.array([0, 1])]
    assert none.n == 0


def test_injected_kernel_failure():
    a = cp.zeros(2)
    with cs.failing_kernels(RuntimeError("CuPy failed to load libnvrtc.so.12")):
        with pytest.raises(RuntimeError, match="nvrtc"):
            a + 1
        cp.zeros(3)  # a memset, no kernel
    assert (a + 1).get().tolist() == [1.0, 1.0]


class Operand:
    """Like a Tensor: defines __radd__ and __array_priority__ = 100 (CuPy's own)."""

    __array_priority__ = 100

    def __radd__(self, other):
        return "radd"


class OptsOut(Operand):
    __array_ufunc__ = None


def test_hands_operators_over_exactly_when_cupy_does():
    a = cp.zeros(2)
    with pytest.raises(TypeError):
        a + Operand()  # equal priority and no __array_ufunc__: CuPy tries the ufunc and fails
    assert a + OptsOut() == "radd"


@pytest.mark.skipif(cs.installed() or not tt.cupy_available(), reason="needs a real CuPy with a GPU")
def test_every_name_the_standin_offers_exists_in_real_cupy():
    real = tt.backend.get_xp("cupy")
    missing = [name for name in vars(cs.cupy) if not name.startswith("__") and not hasattr(real, name)]
    assert not missing
    assert hasattr(real.random.RandomState, "random_sample") and hasattr(real.cuda.curand,
                                                                       "CURAND_RNG_PSEUDO_PHILOX4_32_10")
    assert callable(real.cuda.runtime.getDeviceCount) and callable(__import__("cupyx").scatter_add)
    for method in ("swapaxes", "ravel", "copy", "sum", "max", "astype", "view", "nonzero", "get", "item", "tolist"):
        assert hasattr(real.ndarray, method), method
