"""Our GPT against a PyTorch GPT written here (nanoGPT's architecture), after llm.c's
test_gpt2: load our weights into the torch model by name, then compare logits, loss,
the gradient of every parameter, and the losses of 10 AdamW steps with clipping."""
from __future__ import annotations

import math

import numpy as np
import pytest

import tinytensor as tt
from gpt.model import GPT, GPTConfig

torch = pytest.importorskip("torch")
nn = torch.nn
TF = torch.nn.functional

CONFIG = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
BATCH = 4






# -- the reference: nanoGPT's model, in PyTorch ----------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head = c["n_head"]
        self.c_attn = nn.Linear(c["n_embd"], 3 * c["n_embd"], bias=c["bias"])
        self.c_proj = nn.Linear(c["n_embd"], c["n_embd"], bias=c["bias"])

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # written out rather than F.scaled_dot_product_attention, so the reference is explicit
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c["n_embd"], 4 * c["n_embd"], bias=c["bias"])
        self.c_proj = nn.Linear(4 * c["n_embd"], c["n_embd"], bias=c["bias"])

    def forward(self, x):
        return self.c_proj(TF.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c["n_embd"], eps=1e-5, bias=c["bias"])
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c["n_embd"], eps=1e-5, bias=c["bias"])
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c["vocab_size"], c["n_embd"]),
            wpe=nn.Embedding(c["block_size"], c["n_embd"]),
            h=nn.ModuleList([Block(c) for _ in range(c["n_layer"])]),
            ln_f=nn.LayerNorm(c["n_embd"], eps=1e-5, bias=c["bias"]),
        ))
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT

    def forward(self, idx, targets=None):
        B, T = idx.shape
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else TF.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


# -- helpers -----------------------------------------------------------------------------------------------------
def make_pair(seed=0, dtype=np.float32, scale=1.0):
    """Our model and the torch one holding the same weights (``scale`` multiplies the 2-D ones)."""
    tt.manual_seed(seed)
    ours = GPT(GPTConfig(**CONFIG))
    for p in ours.parameters():
        if p.ndim == 2:
            p.data *= scale
        if dtype != np.float32:
            p.data = p.data.astype(dtype)
    ref = TorchGPT(CONFIG)
    if dtype == np.float64:
        ref = ref.double()
    result = ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ours.state_dict().items()},
                                 strict=False)
    assert result.missing_keys == ["lm_head.weight"]  # tied to wte: loaded through it
    assert result.unexpected_keys == []
    assert ref.lm_head.weight is ref.transformer.wte.weight
    ref_sd = ref.state_dict()
    for name, value in ours.state_dict().items():
        assert tuple(ref_sd[name].shape) == value.shape, name
        np.testing.assert_array_equal(ref_sd[name].numpy(), value, err_msg=name)
    np.testing.assert_array_equal(ref_sd["lm_head.weight"].numpy(), ours.state_dict()["transformer.wte.weight"])
    return ours, ref


def batch(seed, B=BATCH, T=CONFIG["block_size"], learnable=False):
    """(x, y) int64 (B, T); ``learnable``: y follows from x by a fixed rule, so training can lower the loss."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, CONFIG["vocab_size"], (B, T))
    y = (x * 7 + 3) % CONFIG["vocab_size"] if learnable else rng.integers(0, CONFIG["vocab_size"], (B, T))
    return x, y


def assert_close_scaled(ours, ref, rtol, atol_rel, what):
    """allclose with atol relative to the reference's scale (max |ref|)."""
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol_rel * max(scale, 1e-30), err_msg=what)


TOLS = {np.float32: dict(rtol=1e-4, atol_rel=1e-5), np.float64: dict(rtol=1e-9, atol_rel=1e-11)}


# -- the tests -----------------------------------------------------------------------------------------------------
def test_reference_has_the_same_parameter_names():
    ours, ref = make_pair()
    ref_names = [n for n, _ in ref.named_parameters()]  # torch lists a shared parameter once
    assert ref_names == [n for n, _ in ours.named_parameters()]
    assert set(ref.state_dict()) == set(ours.state_dict()) | {"lm_head.weight"}


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
        assert abs(loss.item() - math.log(CONFIG["vocab_size"])) < 0.1
    # shorter sequences too (positions 0..T-1 of wpe only)
    logits5, _ = ours(x[:, :5])
    with torch.no_grad():
        ref5, _ = ref(torch.from_numpy(x[:, :5]))
    assert_close_scaled(logits5.numpy(), ref5.numpy(), tol["rtol"], tol["atol_rel"], "logits T=5")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("scale", [1.0, 20.0], ids=["gpt2-init", "large-weights"])
def test_same_gradients(dtype, scale):
    ours, ref = make_pair(seed=2, dtype=dtype, scale=scale)
    x, y = batch(1)
    _, loss = ours(x, y)
    loss.backward()
    _, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    ref_loss.backward()
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
    _, loss = ours(x, y)
    loss.backward()
    _, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    ref_loss.backward()
    total = ref.transformer.wte.weight.grad.numpy().copy()  # a copy: the pass below accumulates into it
    # the head's part alone: the same forward with the head's matrix as a separate leaf
    w_head = ref.lm_head.weight.detach().clone().requires_grad_(True)
    with torch.no_grad():
        h = torch.from_numpy(x)
    xx = ref.transformer.wte(h) + ref.transformer.wpe(torch.arange(h.shape[1]))
    for block in ref.transformer.h:
        xx = block(xx)
    logits = ref.transformer.ln_f(xx) @ w_head.T
    TF.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).view(-1)).backward()
    head_part = w_head.grad.numpy()
    emb_part = total - head_part
    assert np.abs(head_part).max() > 1e-4 and np.abs(emb_part).max() > 1e-4
    g = ours.transformer.wte.weight.grad
    assert_close_scaled(g, total, 1e-4, 1e-5, "wte")
    assert np.abs(g - head_part).max() > 100 * 1e-5 * np.abs(total).max()
    assert np.abs(g - emb_part).max() > 100 * 1e-5 * np.abs(total).max()


def train_both(ours, ref, opt, ref_opt, batches):
    """The same AdamW + clip_grad_norm_(1.0) steps on both models: losses and norms of each."""
    losses, ref_losses, norms, ref_norms = [], [], [], []
    for x, y in batches:
        opt.zero_grad()
        _, loss = ours(x, y)
        loss.backward()
        norms.append(tt.nn.utils.clip_grad_norm_(ours.parameters(), 1.0))
        opt.step()
        losses.append(loss.item())

        ref_opt.zero_grad()
        _, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
        ref_loss.backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)))
        ref_opt.step()
        ref_losses.append(ref_loss.item())
    return losses, ref_losses, norms, ref_norms


def test_adamw_training_matches_torch():
    """10 steps of AdamW (decay on 2-D weights only) with clip_grad_norm_(1.0), same batches."""
    ours, ref = make_pair(seed=4)
    opt = ours.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref.parameters() if p.dim() < 2]
    assert len(decay) == len(opt.param_groups[0]["params"]) and len(no_decay) == len(opt.param_groups[1]["params"])
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    losses, ref_losses, norms, ref_norms = train_both(
        ours, ref, opt, ref_opt, [batch(100 + step, learnable=True) for step in range(10)])
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    np.testing.assert_allclose(norms, ref_norms, rtol=1e-4)
    assert losses[-1] < losses[0]  # it learns
    ref_params = dict(ref.named_parameters())
    C = CONFIG["n_embd"]
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
    opt = ours.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    ref_opt = torch.optim.AdamW([{"params": [p for p in ref.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                                 {"params": [p for p in ref.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    losses, ref_losses, norms, _ = train_both(ours, ref, opt, ref_opt, [batch(200 + step) for step in range(10)])
    assert min(norms) > 1.0
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
