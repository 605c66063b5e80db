"""The batch-1 decoding kernels (tinytensor/kernels/decode.py, through gpt.generate.FusedDecoder)
against the model's own forward: the same logits at every position for every model option, the
same greedy tokens, the sliding RoPE cache past the window, the cases that must fall back to the
model's forward, and a warm-up that leaves nothing to compile for the first token."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba")

import tinytensor as tt  # noqa: E402
from gpt import generate as G  # noqa: E402
from gpt.model import GPT, GPTConfig  # noqa: E402
from tinytensor import kernels  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

OPTIONS = [
    {},
    {"bias": False},
    {"norm": "rmsnorm", "mlp": "relu2", "norm_eps": 1e-4},
    {"pos": "rope", "qk_norm": True, "mlp": "swiglu", "tie_head": False, "norm_gain": False},
    {"pos": "rope", "norm": "rmsnorm", "zero_init_proj": True, "tie_head": False},
]


def _model(seed=0, block_size=16, **options):
    tt.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=23, block_size=block_size, n_layer=2, n_head=4, n_embd=32, **options))
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters():  # no zero-initialised matrices or unit gains: every weight matters
        p.data[...] += rng.normal(0.0, 0.1, p.shape).astype(np.float32)
    return model.eval()


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "gpt2")
def test_fused_step_logits_equal_the_full_forward_at_every_position(options):
    model = _model(**options)
    ids = np.random.default_rng(2).integers(0, 23, (1, 16))
    with tt.no_grad():
        cache = model.new_cache(1)
        model(ids[:, :3], cache=cache, last_only=True)  # the prompt takes the model's forward
        fused = G.FusedDecoder.for_model(model, cache)
        assert fused is not None
        for t in range(3, 16):
            got = fused.step(int(ids[0, t])).data[0, 0].copy()
            want = model(ids[:, :t + 1])[0].data[0, -1]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"position {t}")
    assert cache.length == cache.position == 16


@pytest.mark.parametrize("options", [{}, {"pos": "rope", "qk_norm": True}], ids=["learned", "rope"])
def test_greedy_decoding_equals_recompute_and_the_unfused_cache(options, monkeypatch):
    """Through GPT.generate (the fused path runs by itself); learned positions past the window
    rebuild the cache, which the fused decoder must follow."""
    model = _model(**options, block_size=8 if options else 16)
    prompt = np.array([[1, 2, 3]])
    ran = []
    real = G.FusedDecoder.step
    monkeypatch.setattr(G.FusedDecoder, "step", lambda self, t: ran.append(t) or real(self, t))
    fused = model.generate(prompt, 12, temperature=0)
    assert len(ran) >= 8
    monkeypatch.setattr(G.FusedDecoder, "for_model", classmethod(lambda cls, m, c: None))
    unfused = model.generate(prompt, 12, temperature=0)
    np.testing.assert_array_equal(fused, unfused)
    if not options:  # inside the window, and rebuilt past it, the cache is exact: = recompute
        np.testing.assert_array_equal(fused, model.generate(prompt, 12, temperature=0, kv_cache=False))


def test_sliding_rope_cache_past_the_window_matches_the_unfused_cache():
    """RoPE slides the cache past block_size (positions keep counting): the fused step's logits
    follow the model's cached forward token for token, three windows deep."""
    model = _model(pos="rope", block_size=6)
    ids = np.random.default_rng(3).integers(0, 23, (1, 20))
    with tt.no_grad():
        a, b = model.new_cache(1), model.new_cache(1)
        model(ids[:, :2], cache=a)
        model(ids[:, :2], cache=b)
        fused = G.FusedDecoder.for_model(model, a)
        for t in range(2, 20):
            got = fused.step(int(ids[0, t])).data[0, 0].copy()
            want = model(ids[:, t:t + 1], cache=b)[0].data[0, -1]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5, err_msg=f"token {t}")
    assert a.length == b.length == 6 and a.position == b.position == 20


def test_the_fused_path_is_refused_where_it_does_not_apply():
    from gpt.quantize import quantize_int8
    model = _model()
    with tt.no_grad():
        assert G.FusedDecoder.for_model(model, model.new_cache(1)) is not None
        assert G.FusedDecoder.for_model(model, model.new_cache(2)) is None  # batch 2: BLAS products pay
        with kernels.numpy_only():
            assert G.FusedDecoder.for_model(model, model.new_cache(1)) is None
        quantized = quantize_int8(_model())
        assert G.FusedDecoder.for_model(quantized, quantized.new_cache(1)) is None
        with pytest.raises(ValueError, match="outside the vocabulary"):
            G.FusedDecoder.for_model(model, model.new_cache(1)).step(23)


def _float64(model):
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    return model


def test_float64_weights_take_the_model_forward():
    model = _float64(_model())
    with tt.no_grad():
        assert G.FusedDecoder.for_model(model, model.new_cache(1)) is None


def test_warm_up_leaves_nothing_to_compile_for_the_first_token():
    """kernels.warm_up() (gpt.sample's start-up) must load the decoding kernels with the very
    types the decoder passes; otherwise the first decoded token pays a compilation (the cold
    figure of bench.sample). In a fresh process, so nothing earlier has loaded them."""
    code = (
        "import numpy as np, tinytensor as tt\n"
        "from tinytensor.kernels import decode\n"
        "from tests.test_decode import _model, OPTIONS\n"
        "tt.kernels.warm_up()\n"
        "before = {k: list(getattr(decode, k).signatures) for k in ('block_step', 'head_step')}\n"
        "for o in OPTIONS:\n"
        "    _model(**o).generate(np.array([[1]]), 4, temperature=0)\n"
        "after = {k: list(getattr(decode, k).signatures) for k in ('block_step', 'head_step')}\n"
        "assert before == after, (before, after)\n"
        "assert before['block_step'] and before['head_step']\n"
        "print('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_parallel_products_give_the_same_logits(monkeypatch):
    """The 2-thread copy of the block (rows of each product split over the cores) is the same sum
    per output as the serial one."""
    model = _model(pos="rope", mlp="swiglu")
    ids = np.random.default_rng(4).integers(0, 23, (1, 10))
    logits = []
    for parallel in (False, True):
        monkeypatch.setattr(G.FusedDecoder, "parallel_products", parallel)
        with tt.no_grad():
            cache = model.new_cache(1)
            model(ids[:, :1], cache=cache)
            fused = G.FusedDecoder.for_model(model, cache)
            assert (fused.block_step is kernels.decode_module().block_step_parallel) == parallel
            logits.append([fused.step(int(t)).data.copy() for t in ids[0, 1:]])
    np.testing.assert_allclose(np.array(logits[0]), np.array(logits[1]), rtol=1e-6, atol=1e-6)


def test_a_model_above_the_size_limit_keeps_the_models_forward(monkeypatch):
    """Large models are bound by memory bandwidth: BLAS on every core beats the one-thread fused
    token there, so for_model declines them (unless the parallel copy is asked for)."""
    model = _model()
    with tt.no_grad():
        cache = model.new_cache(1)
        assert G.FusedDecoder.for_model(model, cache) is not None
        nbytes = sum(p.data.nbytes for p in model.parameters())
        monkeypatch.setattr(G.FusedDecoder, "max_weight_bytes", nbytes - 1)
        assert G.FusedDecoder.for_model(model, cache) is None
        monkeypatch.setattr(G.FusedDecoder, "parallel_products", True)
        assert G.FusedDecoder.for_model(model, cache) is not None
