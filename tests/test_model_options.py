"""The architecture options of gpt.model (ModelOptions): each new piece gradient-checked in
float64, the options' checkpoints round-trip, and RoPE's sliding KV cache (greedy decoding with
it equals decoding without it, far past the window). Parity of every option with the PyTorch
reference is in tests/test_gpt_torch.py."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import tinytensor as tt
from gpt.model import GPT, Block, GPTConfig, rms_norm, rope_tables, rotate
from tinytensor.testing import check_grad

CONFIG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
MODERN = dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_head=False, zero_init_proj=True)


def float64(module):
    for p in module.parameters():
        p.data = p.data.astype(np.float64)
    return module


def test_rms_norm_and_rotate_gradients():
    rng = np.random.default_rng(0)
    check_grad(rms_norm, rng.standard_normal((2, 3, 8)))
    cos, sin = rope_tables(np.arange(5, 10), 8, np, np.float64)
    check_grad(lambda x: rotate(x, cos, sin), rng.standard_normal((2, 5, 3, 8)))


def test_rotate_keeps_norms_and_makes_scores_relative():
    """A rotation: norms are kept, and q.k depends on the positions' distance only."""
    rng = np.random.default_rng(1)
    q, k = (tt.Tensor(rng.standard_normal((1, 1, 1, 8))) for _ in range(2))
    def score(m, n):
        return float((rotate(q, *rope_tables([m], 8, np, np.float64)) *
                      rotate(k, *rope_tables([n], 8, np, np.float64))).sum().item())
    np.testing.assert_allclose(score(3, 1), score(1003, 1001), rtol=1e-9)
    assert abs(score(3, 1) - score(3, 2)) > 1e-3
    r = rotate(q, *rope_tables([777], 8, np, np.float64)).numpy()
    np.testing.assert_allclose(np.linalg.norm(r), np.linalg.norm(q.numpy()), rtol=1e-12)


@pytest.mark.parametrize("options", [dict(pos="rope"), dict(norm="rmsnorm"), dict(norm_gain=False),
                                     dict(mlp="relu2"), dict(mlp="swiglu"), dict(qk_norm=True), MODERN],
                         ids=str)
def test_block_gradient_check(options):
    """A whole block in float64 (norm, QK-norm, RoPE, fused attention, MLP): backprop against
    central differences, for its input."""
    config = dataclasses.replace(CONFIG, **{**options, "zero_init_proj": False})  # zero proj: no signal through
    tt.manual_seed(3)
    block = float64(Block(config))
    rope = rope_tables(np.arange(2, 8), config.n_embd // config.n_head, np, np.float64) \
        if config.pos == "rope" else None
    x = np.random.default_rng(4).standard_normal((2, 6, config.n_embd))
    check_grad(lambda x: block(x, rope=rope), x, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", [dict(pos="rope"), MODERN], ids=["rope", "modern"])
def test_options_state_dict_round_trip_and_defaults_unchanged(options):
    config = dataclasses.replace(CONFIG, **options)
    tt.manual_seed(5)
    a = GPT(config)
    b = GPT(GPTConfig(**config.to_dict()))
    b.load_state_dict(a.state_dict())
    idx = np.random.default_rng(6).integers(0, 50, (2, 10))
    np.testing.assert_array_equal(a(idx)[0].numpy(), b(idx)[0].numpy())
    # the defaults build today's GPT: same names, same draws
    tt.manual_seed(5)
    default = GPT(CONFIG).state_dict()
    assert "transformer.wpe.weight" in default and "lm_head.weight" not in default


# -- the sliding KV cache --------------------------------------------------------------------------------------------
def sharp_rope_model(n_layer, seed=7, factor=8.0):
    """A float64 RoPE model with scaled-up weights: logits far from uniform, so greedy decoding
    has no near-ties (float64: absolute rotations at positions 0..3T and at 0..T agree to ~1e-13)."""
    tt.manual_seed(seed)
    model = float64(GPT(dataclasses.replace(CONFIG, pos="rope", n_layer=n_layer)))
    for p in model.parameters():
        if p.ndim == 2:
            p.data *= factor
    return model


@pytest.mark.parametrize("batch,prompt_len", [(1, 5), (2, 1), (2, 16), (2, 21)])
def test_sliding_cache_greedy_equals_recompute_for_three_windows(batch, prompt_len):
    """One layer: a new token's keys depend on it alone, so the sliding cache and recomputing the
    cropped context see the same keys at the same distances: equal tokens for 3x block_size."""
    model = sharp_rope_model(n_layer=1)
    new = 3 * CONFIG.block_size
    idx = np.random.default_rng(prompt_len).integers(0, 50, (batch, prompt_len))
    builds = []
    new_cache = model.new_cache
    model.new_cache = lambda b: builds.append(b) or new_cache(b)
    with_cache = model.generate(idx, new, temperature=0, kv_cache=True)
    assert len(builds) == 1  # never rebuilt: it slides
    without = model.generate(idx, new, temperature=0, kv_cache=False)
    np.testing.assert_array_equal(with_cache, without)
    assert len(np.unique(with_cache[:, prompt_len:])) >= 3  # really generating


def test_sliding_cache_keeps_the_last_window_and_matches_inside_it():
    """Two layers: inside the window the cache gives the full forward's logits; past it, it holds
    block_size tokens, its positions keep counting, and the keys it keeps are those it computed
    (sliding-window attention), which recompute over the cropped context only approximates."""
    model = sharp_rope_model(n_layer=2, factor=1.0)
    model.eval()
    T = CONFIG.block_size
    idx = np.random.default_rng(9).integers(0, 50, (2, 3 * T))
    with tt.no_grad():
        full = model(idx[:, :T])[0].numpy()
        cache = model.new_cache(2)
        got = [model(idx[:, t:t + 1], cache=cache)[0].numpy()[:, -1] for t in range(3 * T)]
        assert cache.length == T and cache.position == 3 * T
        np.testing.assert_allclose(np.stack(got[:T], axis=1), full, rtol=1e-10, atol=1e-10)
        recomputed = model(idx[:, -T:])[0].numpy()[:, -1]
        np.testing.assert_allclose(got[-1], recomputed, rtol=0.2, atol=0.2)
        with pytest.raises(ValueError, match="block_size"):
            model(idx[:, :T + 1], cache=cache)  # one call never holds more than a window


def test_modern_options_on_each_backend(backend_name):
    """Every option at once on NumPy and on CuPy (or its strict stand-in): the same loss, the
    same gradients, and the sliding cache's greedy decoding past the window."""
    config = dataclasses.replace(CONFIG, **{**MODERN, "zero_init_proj": False, "tie_head": True})
    idx = np.random.default_rng(10).integers(0, 50, (2, 12))
    tt.manual_seed(11)
    ref = GPT(config)
    _, ref_loss = ref(idx, idx)
    ref_loss.backward()
    tt.manual_seed(11)
    model = GPT(config).to(backend_name)
    _, loss = model(idx, idx)
    loss.backward()
    np.testing.assert_allclose(loss.item(), ref_loss.item(), rtol=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(tt.backend.to_numpy(p.grad), q.grad, rtol=1e-4, atol=1e-6, err_msg=name)
    out = model.generate(idx[:, :3], 2 * CONFIG.block_size, temperature=0)
    np.testing.assert_array_equal(out, ref.generate(idx[:, :3], 2 * CONFIG.block_size, temperature=0))


def test_a_checkpoint_from_before_the_options_loads_as_todays_gpt(tmp_path):
    import json

    import safetensors.numpy

    from gpt.generate import load_model
    from gpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.train("hello world, the options are new")
    config = dataclasses.replace(CONFIG, vocab_size=tokenizer.vocab_size)
    tt.manual_seed(12)
    model = GPT(config)
    old_fields = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")
    meta = {"model_type": "gpt", "step": 0, "tokenizer": tokenizer.to_json(),
            "model_config": {k: v for k, v in config.to_dict().items() if k in old_fields}}
    path = tmp_path / "old.safetensors"
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in model.state_dict().items()}, str(path),
                                metadata={"format": "tinytensor-ckpt-v1", "tinytensor": json.dumps(meta)})
    loaded, _, _ = load_model(path)
    assert loaded.config == config
    idx = np.random.default_rng(13).integers(0, tokenizer.vocab_size, (1, 8))
    np.testing.assert_array_equal(loaded(idx)[0].numpy(), model(idx)[0].numpy())
