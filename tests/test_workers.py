"""tinytensor.workers: the opt-in split of small batched work (the attention) over threads."""
import numpy as np
import pytest

import tinytensor as tt
import tinytensor.functional as F
from tinytensor import kernels, workers

pytest.importorskip("numba")


@pytest.fixture
def split_on(monkeypatch):
    import numba
    monkeypatch.setitem(workers._state, "off", False)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 numba threads")
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    calls = []
    real = workers.split

    def counting(fn, n):
        calls.append(n)
        return real(fn, n)
    monkeypatch.setattr(workers, "split", counting)
    yield calls
    numba.set_num_threads(old)


def test_split_covers_every_index_once_and_raises(split_on):
    seen = []
    workers.split(lambda lo, hi: seen.extend(range(lo, hi)), 7)
    assert sorted(seen) == list(range(7))

    def boom(lo, hi):
        if lo > 0:
            raise RuntimeError("part failed")
    with pytest.raises(RuntimeError, match="part failed"):
        workers.split(boom, 4)


def test_off_by_default_and_off_the_main_thread(monkeypatch):
    monkeypatch.setitem(workers._state, "off", None)
    monkeypatch.delenv(workers.ENV, raising=False)
    assert workers.parts(8) == 1
    monkeypatch.setitem(workers._state, "off", False)
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append(workers.parts(8)))
    t.start()
    t.join()
    assert out == [1]


def _sdpa(arrays, g, causal):
    q, k, v = (tt.tensor(a, requires_grad=True) for a in arrays)
    y = F.scaled_dot_product_attention(q, k, v, causal=causal)
    y.backward(g)
    return [y.data, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("shape,causal", [((4, 3, 16, 8), True), ((3, 2, 5, 4), False)])
def test_split_attention_is_bit_identical(split_on, monkeypatch, shape, causal):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    g = rng.standard_normal(shape).astype(np.float32)
    split = _sdpa(arrays, g, causal)
    assert len(split_on) == 2  # forward and backward both ran in parts
    monkeypatch.setitem(workers._state, "off", True)
    whole = _sdpa(arrays, g, causal)
    assert len(split_on) == 2
    for a, b in zip(split, whole):
        np.testing.assert_array_equal(a, b)
    with kernels.numpy_only():
        reference = _sdpa(arrays, g, causal)
    for a, b in zip(split, reference):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_split_multi_head_attention_matches(split_on, monkeypatch):
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((3, 10, 3 * 16)).astype(np.float32)
    g = rng.standard_normal((3, 10, 16)).astype(np.float32)

    def run():
        x = tt.tensor(qkv, requires_grad=True)
        y = F.multi_head_attention(x, n_head=4)
        y.backward(g)
        return y.data, x.grad
    y1, g1 = run()
    assert len(split_on) == 2
    monkeypatch.setitem(workers._state, "off", True)
    y2, g2 = run()
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(g1, g2)
