"""The GPT model (gpt/model.py) and sampling (gpt/generate.py): config validation, shapes,
nanoGPT parameter names, GPT-2 initialisation, weight tying, optimizer groups, the KV
cache (same tokens and same logits as the full forward), and the sampling rules."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

import tinytensor as tt
from gpt.model import GPT, BigramLM, GPTConfig
from gpt.generate import check_sampling_args, sample_next






def small_config(**kw):
    base = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


def sharpened(model, factor=10.0, wpe_factor=50.0):
    """Scale up the weight matrices (and the position embedding most) so logits are far from
    uniform and depend on position: greedy decoding then has no near-ties and does not just
    repeat one token (random-init GPT-2 logits are all ~0)."""
    for p in model.parameters():
        if p.ndim == 2:
            p.data *= factor
    model.transformer.wpe.weight.data *= wpe_factor / factor
    return model


# -- config -------------------------------------------------------------------------------------------------
def test_config_defaults_and_to_dict():
    cfg = GPTConfig()
    d = cfg.to_dict()
    assert d == dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0, bias=True,
                     pos="learned", norm="layernorm", norm_gain=True, mlp="gelu", qk_norm=False, tie_head=True,
                     zero_init_proj=False, norm_eps=1e-5)
    assert GPTConfig(**d) == cfg


@pytest.mark.parametrize("n_embd,n_head", [(30, 4), (32, 3), (10, 20)])
def test_config_n_embd_must_divide_by_n_head(n_embd, n_head):
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=n_embd, n_head=n_head)


@pytest.mark.parametrize("field", ["vocab_size", "block_size", "n_layer", "n_head", "n_embd"])
@pytest.mark.parametrize("value", [0, -1])
def test_config_sizes_must_be_positive(field, value):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{field: value})


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5])
def test_config_dropout_range(dropout):
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=dropout)


# -- forward ------------------------------------------------------------------------------------------------
def test_forward_shapes_and_initial_loss():
    cfg = small_config()
    model = GPT(cfg)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg.vocab_size, (3, 7))
    logits, loss = model(idx)
    assert loss is None
    assert logits.shape == (3, 7, cfg.vocab_size) and logits.dtype == np.float32
    targets = rng.integers(0, cfg.vocab_size, (3, 7))
    logits, loss = model(idx, targets)
    assert loss.shape == () and np.isfinite(loss.item())
    # small init: the prediction is close to uniform, so the loss is close to ln(V)
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    last, _ = model(idx, last_only=True)
    assert last.shape == (3, 1, cfg.vocab_size)
    np.testing.assert_allclose(last.numpy()[:, 0], logits.numpy()[:, -1], rtol=1e-6, atol=1e-6)
    # a Tensor of ids works the same as an array
    np.testing.assert_array_equal(model(tt.tensor(idx))[0].numpy(), logits.numpy())


def test_forward_full_block_and_too_long():
    cfg = small_config()
    model = GPT(cfg)
    logits, _ = model(np.zeros((1, cfg.block_size), dtype=np.int64))
    assert logits.shape == (1, cfg.block_size, cfg.vocab_size)
    with pytest.raises(ValueError, match="block_size"):
        model(np.zeros((1, cfg.block_size + 1), dtype=np.int64))


def test_forward_is_causal():
    """Changing a later token never changes the logits at earlier positions."""
    model = sharpened(GPT(small_config()))
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 50, (2, 12))
    other = idx.copy()
    other[:, 8:] = (other[:, 8:] + 1) % 50
    a, b = model(idx)[0].numpy(), model(other)[0].numpy()
    np.testing.assert_array_equal(a[:, :8], b[:, :8])
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-3


def test_loss_backward_reaches_every_parameter():
    model = GPT(small_config())
    rng = np.random.default_rng(2)
    _, loss = model(rng.integers(0, 50, (2, 9)), rng.integers(0, 50, (2, 9)))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert np.all(np.isfinite(p.grad)), name
        assert np.abs(p.grad).max() > 0, name


# -- names, shapes, initialisation ---------------------------------------------------------------------------
def nanogpt_names(n_layer):
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        for sub in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                    "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                    "mlp.c_proj.weight", "mlp.c_proj.bias"):
            names.append(f"transformer.h.{i}.{sub}")
    return names + ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def test_state_dict_names_and_shapes_are_nanogpts():
    cfg = small_config(vocab_size=65, block_size=24, n_layer=3, n_head=4, n_embd=48)
    model = GPT(cfg)
    sd = model.state_dict()
    assert list(sd) == nanogpt_names(3)  # exactly these, in nanoGPT's order; no lm_head (tied)
    C, V = cfg.n_embd, cfg.vocab_size
    expected = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (cfg.block_size, C),
                "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(3):
        p = f"transformer.h.{i}."
        expected.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,), p + "ln_2.weight": (C,),
                         p + "ln_2.bias": (C,),
                         p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_attn.bias": (3 * C,),  # (out, in)
                         p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                         p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_fc.bias": (4 * C,),
                         p + "mlp.c_proj.weight": (C, 4 * C), p + "mlp.c_proj.bias": (C,)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == np.float32 for v in sd.values())
    assert [n for n, _ in model.named_parameters()] == list(sd)
    n_params = sum(int(np.prod(s)) for s in expected.values())
    assert model.num_parameters() == n_params


def test_no_bias_config_has_no_biases():
    model = GPT(small_config(bias=False))
    names = list(model.state_dict())
    assert not any(n.endswith(".bias") for n in names)
    logits, loss = model(np.zeros((1, 4), dtype=np.int64), np.zeros((1, 4), dtype=np.int64))
    assert logits.shape == (1, 4, 50) and np.isfinite(loss.item())


def test_state_dict_round_trip():
    cfg = small_config()
    tt.manual_seed(1)
    a = GPT(cfg)
    tt.manual_seed(2)
    b = GPT(cfg)
    idx = np.arange(10)[None] % 50
    assert not np.array_equal(a(idx)[0].numpy(), b(idx)[0].numpy())
    b.load_state_dict({k: v.copy() for k, v in a.state_dict().items()})
    np.testing.assert_array_equal(a(idx)[0].numpy(), b(idx)[0].numpy())


def test_seeded_init_is_reproducible():
    tt.manual_seed(123)
    a = GPT(small_config()).state_dict()
    tt.manual_seed(123)
    b = GPT(small_config()).state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_gpt2_initialisation():
    n_layer = 4
    cfg = GPTConfig(vocab_size=512, block_size=128, n_layer=n_layer, n_head=4, n_embd=128)
    tt.manual_seed(0)
    sd = GPT(cfg).state_dict()
    resid_std = 0.02 / math.sqrt(2 * n_layer)
    checked = set()
    for name, w in sd.items():
        w = np.asarray(w, dtype=np.float64)
        if name.endswith("c_proj.weight"):  # attn.c_proj and mlp.c_proj: scaled for the residual stream
            std = resid_std
        elif w.ndim == 2:  # wte, wpe, c_attn, c_fc
            std = 0.02
        elif ".ln_" in name and name.endswith("weight"):
            np.testing.assert_array_equal(w, 1.0, err_msg=name)
            checked.add(name)
            continue
        else:  # every bias (Linear and LayerNorm) is zero
            assert name.endswith("bias"), name
            np.testing.assert_array_equal(w, 0.0, err_msg=name)
            checked.add(name)
            continue
        assert w.size >= 16000, name  # enough samples to estimate the std within a few %
        assert abs(w.std() / std - 1) < 0.05, (name, w.std(), std)
        assert abs(w.mean()) < 0.05 * std, (name, w.mean())
        checked.add(name)
    assert checked == set(sd)
    assert sum(n.endswith("c_proj.weight") for n in sd) == 2 * n_layer


# -- weight tying ------------------------------------------------------------------------------------------------
def test_lm_head_is_tied_to_wte():
    model = sharpened(GPT(small_config()), 4.0)
    names = [n for n, _ in model.named_parameters()]
    assert not any("lm_head" in n for n in names) and not any("lm_head" in n for n in model.state_dict())
    tr = model.transformer
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 40, (2, 10))  # ids < 40: rows 40..49 of wte are used by the head only
    # logits == ln_f(hidden) @ wte.T, hidden computed by hand through the blocks
    with tt.no_grad():
        x = tr.wte(idx) + tr.wpe(np.arange(10))
        for block in tr.h:
            x = block(x)
        expected = tr.ln_f(x).numpy() @ tr.wte.weight.numpy().T
        logits = model(idx)[0].numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # a wte row no input uses still moves its own logit column, and only that one
    # (a random direction: adding a constant would change nothing, ln_f's output has zero mean)
    tr.wte.weight.data[45] += rng.standard_normal(32).astype(np.float32)
    with tt.no_grad():
        changed = model(idx)[0].numpy()
    assert np.abs(changed[..., 45] - logits[..., 45]).max() > 1e-2
    np.testing.assert_array_equal(np.delete(changed, 45, axis=-1), np.delete(logits, 45, axis=-1))
    # so those rows get a gradient through the head alone: (softmax - onehot)^T @ ln_f(x) / N
    targets = rng.integers(0, 50, (2, 10))
    _, loss = model(idx, targets)
    loss.backward()
    g = tr.wte.weight.grad
    with tt.no_grad():
        x = tr.wte(idx) + tr.wpe(np.arange(10))
        for block in tr.h:
            x = block(x)
        h = tr.ln_f(x).numpy().reshape(-1, 32).astype(np.float64)
        lg = model(idx)[0].numpy().reshape(-1, 50).astype(np.float64)
    dlogits = softmax(lg)
    dlogits[np.arange(20), targets.ravel()] -= 1.0
    head_grad = dlogits.T @ h / 20
    assert np.abs(g[40:]).max() > 1e-4
    np.testing.assert_allclose(g[40:], head_grad[40:], rtol=1e-4, atol=1e-6)


def test_tied_gradient_is_head_plus_embedding():
    """wte.grad equals (grad through the head) + (grad through the embedding lookup)."""
    model = sharpened(GPT(small_config()), 4.0)
    tr = model.transformer
    rng = np.random.default_rng(4)
    idx, targets = rng.integers(0, 50, (2, 10)), rng.integers(0, 50, (2, 10))
    _, loss = model(idx, targets)
    loss.backward()
    tied = tr.wte.weight.grad.copy()
    # the same computation with two separate copies of the matrix
    w_in = tt.tensor(tr.wte.weight.numpy().copy(), requires_grad=True)
    w_out = tt.tensor(tr.wte.weight.numpy().copy(), requires_grad=True)
    import tinytensor.functional as F
    x = F.embedding(idx, w_in) + tr.wpe(np.arange(10))
    for block in tr.h:
        x = block(x)
    loss2 = F.cross_entropy(F.linear(tr.ln_f(x), w_out), targets)
    np.testing.assert_allclose(loss2.item(), loss.item(), rtol=1e-6)
    loss2.backward()
    assert np.abs(w_in.grad).max() > 0 and np.abs(w_out.grad).max() > 0
    np.testing.assert_allclose(tied, w_in.grad + w_out.grad, rtol=1e-5, atol=1e-7)


# -- optimizer groups ----------------------------------------------------------------------------------------------
def test_configure_optimizers_groups():
    model = GPT(small_config())
    opt = model.configure_optimizers(0.1, 3e-4, (0.9, 0.95))
    assert len(opt.param_groups) == 2
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for g in opt.param_groups:
        assert g["lr"] == 3e-4 and tuple(g["betas"]) == (0.9, 0.95)
    assert all(p.ndim == 2 for p in decay["params"])
    assert all(p.ndim == 1 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # each parameter once
    assert set(ids) == {id(p) for p in model.parameters()}  # and every parameter
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n in names.values() if n.endswith("weight") and ".ln_" not in n}
    assert "transformer.wte.weight" in decayed and "transformer.wpe.weight" in decayed
    # a step with grads moves every parameter
    _, loss = model(np.arange(8)[None], np.arange(1, 9)[None])
    loss.backward()
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        assert not np.array_equal(before[n], p.numpy()), n


def test_configure_optimizers_weight_decay_only_on_2d():
    """With zero gradients, AdamW moves only the decayed (2-D) parameters."""
    model = GPT(small_config())
    opt = model.configure_optimizers(0.5, 0.1)
    for p in model.parameters():
        p.grad = np.zeros_like(p.data)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        if p.ndim == 2:
            np.testing.assert_allclose(p.numpy(), before[n] * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=n)
        else:
            np.testing.assert_array_equal(p.numpy(), before[n], err_msg=n)


# -- KV cache ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,prompt_len,new", [(1, 5, 8), (3, 5, 40), (2, 1, 30), (2, 16, 10), (2, 21, 12)])
def test_kv_cache_greedy_matches_full_recompute(batch, prompt_len, new):
    """Prompts shorter than, equal to and longer than block_size 16; generation running far past it."""
    tt.manual_seed(7)
    model = sharpened(GPT(small_config()))
    idx = np.random.default_rng(prompt_len).integers(0, 50, (batch, prompt_len))
    with_cache = model.generate(idx, new, temperature=0, kv_cache=True)
    without = model.generate(idx, new, temperature=0, kv_cache=False)
    assert with_cache.shape == (batch, prompt_len + new) and with_cache.dtype == np.int64
    np.testing.assert_array_equal(with_cache[:, :prompt_len], idx)
    np.testing.assert_array_equal(with_cache, without)
    if prompt_len < 16:  # (from a full window greedy decoding of a random model soon repeats one id)
        assert len(np.unique(with_cache[:, prompt_len:])) >= 3  # really generating, not one repeated id
    # and greedy decoding is what argmax of the full forward over the cropped context gives
    ctx = idx.copy()
    with tt.no_grad():
        for _ in range(new):
            logits, _ = model(ctx[:, -16:])
            ctx = np.concatenate([ctx, logits.numpy()[:, -1].argmax(-1)[:, None]], axis=1)
    np.testing.assert_array_equal(ctx, with_cache)


def test_kv_cache_logits_match_full_forward():
    tt.manual_seed(8)
    model = sharpened(GPT(small_config()))
    model.eval()
    idx = np.random.default_rng(9).integers(0, 50, (3, 16))
    with tt.no_grad():
        full = model(idx)[0].numpy()
        cache = model.new_cache(3)
        first, _ = model(idx[:, :1], cache=cache)
        assert cache.length == 1
        got = [first.numpy()[:, -1]]
        for t in range(1, 16):
            logits, _ = model(idx[:, t:t + 1], cache=cache)
            assert logits.shape == (3, 1, 50) and cache.length == t + 1
            got.append(logits.numpy()[:, -1])
        got = np.stack(got, axis=1)
        np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
        # a prefill of several tokens then one at a time gives the same, too
        cache = model.new_cache(3)
        pre, _ = model(idx[:, :6], cache=cache)
        np.testing.assert_allclose(pre.numpy(), full[:, :6], rtol=1e-5, atol=1e-5)
        for t in range(6, 16):
            logits, _ = model(idx[:, t:t + 1], cache=cache, last_only=True)
            np.testing.assert_allclose(logits.numpy()[:, -1], full[:, t], rtol=1e-5, atol=1e-5)
        # the cache is full now: one more position does not fit
        with pytest.raises(ValueError, match="block_size"):
            model(idx[:, :1], cache=cache)


def test_generate_restores_training_mode_and_handles_zero_tokens():
    model = GPT(small_config())
    idx = np.array([[1, 2, 3]])
    model.train()
    model.generate(idx, 3, temperature=0)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    model.generate(idx, 3, temperature=0)
    assert not model.training
    np.testing.assert_array_equal(model.generate(idx, 0), idx)
    np.testing.assert_array_equal(model.generate(tt.tensor(idx), 2, temperature=0),
                                  model.generate(idx, 2, temperature=0))
    with pytest.raises(ValueError):
        model.generate(np.array([1, 2, 3]), 2)  # 1-D: needs (batch, T)


def test_generate_stream_yields_the_new_tokens():
    model = sharpened(GPT(small_config()))
    idx = np.array([[4, 5], [6, 7]])
    steps = list(model.generate_stream(idx, 5, temperature=0))
    assert len(steps) == 5 and all(s.shape == (2,) for s in steps)
    np.testing.assert_array_equal(np.stack(steps, axis=1), model.generate(idx, 5, temperature=0)[:, 2:])


def test_seeded_sampling_is_reproducible():
    tt.manual_seed(10)
    model = sharpened(GPT(small_config()), 3.0)
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    a = model.generate(idx, 30, temperature=1.0, seed=42)
    b = model.generate(idx, 30, temperature=1.0, seed=42)
    np.testing.assert_array_equal(a, b)
    c = model.generate(idx, 30, temperature=1.0, seed=43)
    assert not np.array_equal(a, c)
    # sampling draws its numbers on the host from the seed alone: the cache does not change them
    d = model.generate(idx, 30, temperature=1.0, seed=42, kv_cache=False)
    np.testing.assert_array_equal(a, d)
    e = model.generate(idx, 30, temperature=0.7, top_k=5, top_p=0.9, seed=5)
    f = model.generate(idx, 30, temperature=0.7, top_k=5, top_p=0.9, seed=5)
    np.testing.assert_array_equal(e, f)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.5), dict(top_k=0), dict(top_k=-3), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(top_p=-0.2), dict(temperature=None)])
def test_invalid_sampling_args_raise(kwargs):
    model = GPT(small_config())
    with pytest.raises(ValueError):
        model.generate(np.array([[1]]), 3, **kwargs)
    with pytest.raises(ValueError):
        sample_next(np.zeros((1, 5)), **{"temperature": 1.0, **kwargs})
    args = {"temperature": 1.0, "top_k": None, "top_p": None, **kwargs}
    with pytest.raises(ValueError):
        check_sampling_args(args["temperature"], args["top_k"], args["top_p"])


def test_negative_max_new_tokens_raise():
    with pytest.raises(ValueError):
        GPT(small_config()).generate(np.array([[1]]), -1)


# -- sample_next -----------------------------------------------------------------------------------------------------------
def random_logits(batch=6, vocab=30, seed=0, scale=2.0):
    return np.random.default_rng(seed).standard_normal((batch, vocab)) * scale


def test_sample_next_greedy():
    logits = random_logits()
    np.testing.assert_array_equal(sample_next(logits, temperature=0), logits.argmax(-1))
    np.testing.assert_array_equal(sample_next(np.array([[0.0, 5.0, 1.0]]), temperature=0), [1])


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_1_and_tiny_top_p_are_greedy(temperature):
    logits = random_logits(batch=200, seed=1)
    greedy = logits.argmax(-1)
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(sample_next(logits, temperature, top_k=1, rng=rng), greedy)
    np.testing.assert_array_equal(sample_next(logits, temperature, top_p=1e-9, rng=rng), greedy)
    np.testing.assert_array_equal(sample_next(logits, temperature, top_k=1, top_p=0.5, rng=rng), greedy)


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_top_k_restricts_support():
    row = random_logits(batch=1, vocab=40, seed=2, scale=0.5)[0]  # flat: many tokens are likely
    n, k = 20000, 5
    logits = np.tile(row, (n, 1))
    ids = sample_next(logits, 1.0, top_k=k, rng=np.random.default_rng(1))
    top = set(np.argsort(-row)[:k].tolist())
    assert set(ids.tolist()) == top  # only the top k, and every one of them
    # with frequencies proportional to the renormalised probabilities
    p = softmax(row[sorted(top)])
    freq = np.array([(ids == t).mean() for t in sorted(top)])
    np.testing.assert_allclose(freq, p, atol=0.02)
    # top_k >= V changes nothing
    a = sample_next(logits[:100], 1.0, top_k=40, rng=np.random.default_rng(3))
    b = sample_next(logits[:100], 1.0, top_k=1000, rng=np.random.default_rng(3))
    c = sample_next(logits[:100], 1.0, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_restricts_to_the_nucleus(top_p):
    row = random_logits(batch=1, vocab=25, seed=4, scale=1.0)[0]
    probs = softmax(row)
    order = np.argsort(-probs)
    cum = np.cumsum(probs[order])
    size = int(np.searchsorted(cum, top_p) + 1)  # smallest prefix whose mass reaches top_p
    nucleus = set(order[:size].tolist())
    n = 20000
    ids = sample_next(np.tile(row, (n, 1)), 1.0, top_p=top_p, rng=np.random.default_rng(5))
    assert set(ids.tolist()) == nucleus
    freq = np.array([(ids == t).mean() for t in order[:size]])
    np.testing.assert_allclose(freq, probs[order[:size]] / probs[order[:size]].sum(), atol=0.02)


def test_temperature_sharpens_and_flattens():
    row = np.array([2.0, 1.0, 0.0, -1.0])
    n = 20000
    for temperature in (0.5, 1.0, 2.0):
        ids = sample_next(np.tile(row, (n, 1)), temperature, rng=np.random.default_rng(6))
        freq = np.bincount(ids, minlength=4) / n
        np.testing.assert_allclose(freq, softmax(row / temperature), atol=0.015)


def test_sample_next_never_picks_a_masked_token():
    """-inf logits (and tokens cut by top_k) have probability 0."""
    row = np.full(10, -np.inf)
    row[[3, 7]] = [0.0, 1.0]
    ids = sample_next(np.tile(row, (5000, 1)), 1.0, rng=np.random.default_rng(7))
    assert set(ids.tolist()) == {3, 7}


# -- the bigram baseline -------------------------------------------------------------------------------------------------
def test_bigram_trains_and_generates():
    tt.manual_seed(0)
    V = 12
    cfg = GPTConfig(vocab_size=V, block_size=8, n_layer=1, n_head=1, n_embd=4)
    model = BigramLM(cfg)
    assert list(model.state_dict()) == ["token_embedding.weight"]
    # data where token t is almost always followed by (t * 5 + 1) % V
    rng = np.random.default_rng(0)
    seq = [0]
    for _ in range(3000):
        seq.append((seq[-1] * 5 + 1) % V if rng.random() < 0.9 else int(rng.integers(V)))
    data = np.array(seq)
    opt = model.configure_optimizers(0.0, 0.1)
    losses = []
    for _ in range(40):
        starts = rng.integers(0, len(data) - 9, 16)
        x = np.stack([data[s:s + 8] for s in starts])
        y = np.stack([data[s + 1:s + 9] for s in starts])
        logits, loss = model(x, y)
        assert logits.shape == (16, 8, V)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(V), abs=0.1)
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    out = model.generate(np.array([[0], [3]]), 20, temperature=0)
    assert out.shape == (2, 21)
    np.testing.assert_array_equal(out[:, 1:], (out[:, :-1] * 5 + 1) % V)  # it learned the rule
    np.testing.assert_array_equal(out, model.generate(np.array([[0], [3]]), 20, temperature=0, kv_cache=False))
    sampled = model.generate(np.array([[0]]), 50, seed=1)
    assert sampled.shape == (1, 51) and sampled.min() >= 0 and sampled.max() < V


def test_gpt_and_tinytensor_never_import_torch():
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys, gpt.model, gpt.generate, gpt.train, gpt.sample, gpt.checkpoint, gpt.data, gpt.tokenizer, "
            "tinytensor; bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "print(bad); sys.exit(1 if bad else 0)")
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kv_cache_refuses_to_record_a_graph():
    """The cached path works on arrays (no graph): using it with grad on must fail loudly,
    not silently drop attention's gradients."""
    model = GPT(small_config())
    with pytest.raises(RuntimeError, match="no_grad"):
        model(np.zeros((1, 3), np.int64), cache=model.new_cache(1))
