"""Our GPT against the PyTorch reference (bench/torch_gpt.py: nanoGPT's architecture, with
attention written out), after llm.c's test_gpt2: load our weights into the torch model by
name, then compare logits, loss, the gradient of every parameter, and the losses of 10
AdamW steps with clipping, each model's optimizer from its own ``configure_optimizers``."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import tinytensor as tt
from gpt.model import GPT, GPTConfig

torch = pytest.importorskip("torch")
from bench.torch_gpt import TIED, TorchGPT, load_from_tinytensor, tied  # noqa: E402  (needs torch)

CONFIG = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
BATCH = 4


# -- helpers -----------------------------------------------------------------------------------------------------
def make_pair(seed=0, dtype=np.float32, scale=1.0, config=CONFIG):
    """Our model and the torch reference (explicit attention) holding the same weights
    (``scale`` multiplies the 2-D ones)."""
    tt.manual_seed(seed)
    ours = GPT(config)
    for p in ours.parameters():
        if p.ndim == 2:
            p.data *= scale
        if dtype != np.float32:
            p.data = p.data.astype(dtype)
    ref = TorchGPT(config, flash=False)
    if dtype == np.float64:
        ref = ref.double()
    result = load_from_tinytensor(ref, ours.state_dict())
    assert result.unexpected_keys == []
    ref_sd = ref.state_dict()
    for name, value in ours.state_dict().items():
        assert tuple(ref_sd[name].shape) == value.shape, name
        np.testing.assert_array_equal(ref_sd[name].numpy(), value, err_msg=name)
    if config.tie_head:
        assert result.missing_keys == ["lm_head.weight"] == list(TIED) == list(tied(config))  # loaded through wte
        assert ref.lm_head.weight is ref.transformer.wte.weight
        np.testing.assert_array_equal(ref_sd["lm_head.weight"].numpy(), ours.state_dict()["transformer.wte.weight"])
    else:
        assert result.missing_keys == [] and ref.lm_head.weight is not ref.transformer.wte.weight
    return ours, ref


def batch(seed, B=BATCH, T=CONFIG.block_size, learnable=False):
    """(x, y) int64 (B, T); ``learnable``: y follows from x by a fixed rule, so training can lower the loss."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CONFIG.vocab_size, (B, T))
    y = (x * 7 + 3) % CONFIG.vocab_size if learnable else rng.integers(0, CONFIG.vocab_size, (B, T))
    return x, y


def backward_both(ours, ref, x, y):
    """The loss of (x, y) on both models, back-propagated; returns both losses."""
    _, loss = ours(x, y)
    loss.backward()
    _, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    ref_loss.backward()
    return loss.item(), ref_loss.item()


def assert_close_scaled(ours, ref, rtol, atol_rel, what):
    """allclose with atol relative to the reference's scale (max |ref|)."""
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol_rel * max(scale, 1e-30), err_msg=what)


TOLS = {np.float32: dict(rtol=1e-4, atol_rel=1e-5), np.float64: dict(rtol=1e-9, atol_rel=1e-11)}


# -- the tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_reference_has_the_same_parameter_names(bias):
    ours, ref = make_pair(config=dataclasses.replace(CONFIG, bias=bias))
    ref_names = [n for n, _ in ref.named_parameters()]  # torch lists a shared parameter once
    assert ref_names == [n for n, _ in ours.named_parameters()]
    assert set(ref.state_dict()) == set(ours.state_dict()) | {"lm_head.weight"}


def test_reference_refuses_an_option_it_does_not_implement():
    @dataclasses.dataclass
    class NewConfig(GPTConfig):
        rope: bool = False
    with pytest.raises(NotImplementedError, match="rope"):
        TorchGPT(NewConfig(**dataclasses.asdict(CONFIG)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("scale", [1.0, 20.0], ids=["gpt2-init", "large-weights"])
def test_same_logits_and_loss(dtype, scale):
    ours, ref = make_pair(seed=1, dtype=dtype, scale=scale)
    x, y = batch(0)
    logits, loss = ours(x, y)
    assert logits.dtype == dtype
    with torch.no_grad():
        ref_logits, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    tol = TOLS[dtype]
    assert_close_scaled(logits.numpy(), ref_logits.numpy(), tol["rtol"], tol["atol_rel"], "logits")
    np.testing.assert_allclose(loss.item(), ref_loss.item(), rtol=tol["rtol"])
    if scale == 1.0:
        assert abs(loss.item() - math.log(CONFIG.vocab_size)) < 0.1
    # shorter sequences too (positions 0..T-1 of wpe only)
    logits5, _ = ours(x[:, :5])
    with torch.no_grad():
        ref5, _ = ref(torch.from_numpy(x[:, :5]))
    assert_close_scaled(logits5.numpy(), ref5.numpy(), tol["rtol"], tol["atol_rel"], "logits T=5")


def test_flash_attention_peer_matches_the_explicit_reference():
    """The benchmarks' peer (F.scaled_dot_product_attention) computes what the reference does."""
    _, ref = make_pair(seed=6, config=dataclasses.replace(CONFIG, bias=False))
    peer = TorchGPT(ref.config)
    peer.load_state_dict(ref.state_dict())
    x, y = (torch.from_numpy(a) for a in batch(3))
    with torch.no_grad():
        (logits, loss), (peer_logits, peer_loss) = ref(x, y), peer(x, y)
    assert_close_scaled(peer_logits.numpy(), logits.numpy(), 1e-4, 1e-5, "logits")
    np.testing.assert_allclose(peer_loss.item(), loss.item(), rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("scale", [1.0, 20.0], ids=["gpt2-init", "large-weights"])
def test_same_gradients(dtype, scale):
    ours, ref = make_pair(seed=2, dtype=dtype, scale=scale)
    backward_both(ours, ref, *batch(1))
    tol = TOLS[dtype]
    ref_params = dict(ref.named_parameters())
    assert set(ref_params) == {n for n, _ in ours.named_parameters()}
    for name, p in ours.named_parameters():
        g, rg = p.grad, ref_params[name].grad.numpy()
        assert g is not None and g.dtype == dtype, name
        assert np.abs(rg).max() > 0, name
        assert_close_scaled(g, rg, tol["rtol"], tol["atol_rel"], name)


def test_tied_wte_gradient_has_both_uses():
    """The torch reference's wte grad is embedding + head; ours must equal it, and must differ
    from either part alone (so the check really sees the sum)."""
    ours, ref = make_pair(seed=3, scale=5.0)
    x, y = batch(2)
    backward_both(ours, ref, x, y)
    total = ref.transformer.wte.weight.grad.numpy().copy()  # a copy: the pass below accumulates into it
    # the head's part alone: the same forward with the head's matrix as a separate leaf
    w_head = ref.lm_head.weight.detach().clone().requires_grad_(True)
    logits = ref.hidden_states(torch.from_numpy(x)) @ w_head.T
    torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).view(-1)).backward()
    head_part = w_head.grad.numpy()
    emb_part = total - head_part
    assert np.abs(head_part).max() > 1e-4 and np.abs(emb_part).max() > 1e-4
    g = ours.transformer.wte.weight.grad
    assert_close_scaled(g, total, 1e-4, 1e-5, "wte")
    assert np.abs(g - head_part).max() > 100 * 1e-5 * np.abs(total).max()
    assert np.abs(g - emb_part).max() > 100 * 1e-5 * np.abs(total).max()


def both_optimizers(ours, ref):
    """Each model's own ``configure_optimizers(0.1, 1e-3, (0.9, 0.95))``, checked to hold the same
    groups: decay on the 2-D weights only, the same shapes in the same order, the same settings."""
    opt, ref_opt = (m.configure_optimizers(0.1, 1e-3, (0.9, 0.95)) for m in (ours, ref))
    decay, *no_decay = ref_opt.param_groups  # no second group when there is no 1-D weight (no gains, no bias)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for g in no_decay for p in g["params"])
    assert decay["weight_decay"] == 0.1 and all(g["weight_decay"] == 0.0 for g in no_decay)
    assert len(opt.param_groups) == len(ref_opt.param_groups)
    for group, ref_group in zip(opt.param_groups, ref_opt.param_groups):
        assert [tuple(p.shape) for p in group["params"]] == [tuple(p.shape) for p in ref_group["params"]]
        assert all(group[k] == ref_group[k] for k in ("lr", "betas", "eps", "weight_decay")), (group, ref_group)
    return opt, ref_opt


def train_both(ours, ref, batches):
    """The same AdamW + clip_grad_norm_(1.0) steps on both models: losses and norms of each."""
    opt, ref_opt = both_optimizers(ours, ref)
    losses, ref_losses, norms, ref_norms = [], [], [], []
    for x, y in batches:
        opt.zero_grad()
        ref_opt.zero_grad()
        loss, ref_loss = backward_both(ours, ref, x, y)
        norms.append(tt.nn.utils.clip_grad_norm_(ours.parameters(), 1.0))
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)))
        opt.step()
        ref_opt.step()
        losses.append(loss)
        ref_losses.append(ref_loss)
    return losses, ref_losses, norms, ref_norms


def test_adamw_training_matches_torch():
    """10 steps of AdamW (decay on 2-D weights only) with clip_grad_norm_(1.0), same batches."""
    ours, ref = make_pair(seed=4)
    losses, ref_losses, norms, ref_norms = train_both(ours, ref, [batch(100 + step, learnable=True)
                                                                  for step in range(10)])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
    assert losses[-1] < losses[0]  # it learns
    ref_params = dict(ref.named_parameters())
    C = CONFIG.n_embd
    for name, p in ours.named_parameters():
        w, rw = p.numpy(), ref_params[name].detach().numpy()
        if name.endswith("c_attn.bias"):
            # The key bias (c_attn.bias[C:2C]) has a gradient that is zero in exact arithmetic (it
            # adds the same q.b to every score of a softmax row), so Adam turns rounding noise into
            # steps of up to lr in either framework: it only has to stay that small.
            assert np.abs(w[C:2 * C]).max() <= 10 * 1e-3 and np.abs(rw[C:2 * C]).max() <= 10 * 1e-3
            w, rw = np.delete(w, np.s_[C:2 * C]), np.delete(rw, np.s_[C:2 * C])
        assert_close_scaled(w, rw, 1e-3, 1e-4, name)


def test_adamw_with_active_clipping_matches_torch():
    """Large weights make the gradient norm far above 1, so clipping really scales every step."""
    ours, ref = make_pair(seed=5, scale=20.0)
    losses, ref_losses, norms, _ = train_both(ours, ref, [batch(200 + step) for step in range(10)])
    assert min(norms) > 1.0
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)


# -- the architecture options (gpt.model.ModelOptions), one at a time and combined ------------------------------
OPTION_CASES = {
    "rope": dict(pos="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "layernorm-no-gain": dict(norm_gain=False),
    "rmsnorm-no-gain": dict(norm="rmsnorm", norm_gain=False),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu"),
    "qk-norm": dict(qk_norm=True),
    "untied-head": dict(tie_head=False),
    "zero-init-proj": dict(zero_init_proj=True),
    "no-bias": dict(bias=False),
    "norm-eps": dict(norm_eps=0.5),  # large, so a norm that ignored it would show
    "rmsnorm-eps": dict(norm="rmsnorm", norm_eps=0.5),
    "modern": dict(pos="rope", norm="rmsnorm", norm_gain=False, mlp="relu2", qk_norm=True, tie_head=False,
                   zero_init_proj=True, bias=False),
    "modern-swiglu": dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_head=False),
}


def option_pair(options, seed, dtype=np.float64):
    """Our model and the reference with ``options``; zero-initialised weights (an untied head,
    zero_init_proj) are drawn at random here so that every gradient is non-trivial."""
    config = dataclasses.replace(CONFIG, **options)
    tt.manual_seed(seed)
    ours = GPT(config)
    rng = np.random.default_rng(seed)
    for name, p in ours.named_parameters():
        if not np.any(p.data):
            p.data = rng.normal(0.0, 0.02, p.shape).astype(np.float32)
        if name.endswith(".weight") and p.ndim == 1:  # gains away from 1, so a missing gain shows
            p.data = (1.0 + rng.normal(0.0, 0.1, p.shape)).astype(np.float32)
    state = ours.state_dict()
    for p in ours.parameters():
        p.data = p.data.astype(dtype)
    ref = TorchGPT(config, flash=False)
    ref = ref.double() if dtype == np.float64 else ref
    load_from_tinytensor(ref, {n: v.astype(dtype) for n, v in state.items()})
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
    return ours, ref


@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_option_initialisation_matches_the_reference(options):
    """The same names, shapes and init rules: zero where the option says so, N(0, 0.02) elsewhere."""
    config = dataclasses.replace(CONFIG, **options)
    tt.manual_seed(0)
    ours = GPT(config)
    ref = TorchGPT(config, flash=False)
    ref_sd = ref.state_dict()
    assert set(ref_sd) == set(ours.state_dict()) | set(tied(config))
    for name, p in ours.named_parameters():
        r = ref_sd[name].numpy()
        assert r.shape == p.shape, name
        if not np.any(r):
            assert not np.any(p.data), name  # zero in both
        else:
            np.testing.assert_allclose(p.data.std(), r.std(), rtol=0.3, atol=1e-3, err_msg=name)
    zeroed = [n for n, p in ours.named_parameters() if p.ndim == 2 and not np.any(p.data)]
    expected = (["lm_head.weight"] if not config.tie_head else []) + \
        ([n for n, _ in ours.named_parameters() if n.endswith("c_proj.weight")] if config.zero_init_proj else [])
    assert sorted(zeroed) == sorted(expected)
    assert ("transformer.wpe.weight" in ref_sd) == (config.pos == "learned")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("options", OPTION_CASES.values(), ids=OPTION_CASES.keys())
def test_option_same_logits_loss_and_gradients(options, dtype):
    ours, ref = option_pair(options, seed=7, dtype=dtype)
    x, y = batch(8)
    logits, loss = ours(x, y)
    loss.backward()
    ref_logits, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    ref_loss.backward()
    tol = TOLS[dtype]
    assert logits.dtype == dtype
    assert_close_scaled(logits.numpy(), ref_logits.detach().numpy(), tol["rtol"], tol["atol_rel"], "logits")
    np.testing.assert_allclose(loss.item(), ref_loss.item(), rtol=tol["rtol"])
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g, rg = p.grad, ref_params[name].grad.numpy()
        assert g is not None and g.dtype == dtype, name
        assert np.abs(rg).max() > 0, name
        assert_close_scaled(g, rg, tol["rtol"], tol["atol_rel"], name)


@pytest.mark.parametrize("options", [OPTION_CASES[k] for k in ("rope", "swiglu", "modern", "modern-swiglu")],
                         ids=["rope", "swiglu", "modern", "modern-swiglu"])
def test_option_adamw_training_matches_torch(options):
    ours, ref = option_pair(options, seed=9, dtype=np.float32)
    losses, ref_losses, norms, ref_norms = train_both(ours, ref, [batch(300 + step, learnable=True)
                                                                  for step in range(5)])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
    ref_params = dict(ref.named_parameters())
    C = CONFIG.n_embd
    for name, p in ours.named_parameters():
        w, rw = p.numpy(), ref_params[name].detach().numpy()
        if name.endswith("c_attn.bias"):  # the key bias: see test_adamw_training_matches_torch
            w, rw = np.delete(w, np.s_[C:2 * C]), np.delete(rw, np.s_[C:2 * C])
        assert_close_scaled(w, rw, 1e-3, 1e-4, name)
