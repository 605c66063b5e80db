"""Modules and layers: parameter registration, state dicts, modes, and a small MLP that learns."""
from __future__ import annotations

import numpy as np
import pytest

import tinytensor as tt
import tinytensor.functional as F
from tinytensor import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.ln(x)).relu()


class Net(nn.Module):
    """Embedding -> 2 blocks -> LayerNorm -> head whose weight is tied to the embedding."""

    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied

    def forward(self, idx):
        x = self.wte(idx)
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln_f(x))


NET_NAMES = ["wte.weight",
             "blocks.0.ln.weight", "blocks.0.ln.bias", "blocks.0.fc.weight", "blocks.0.fc.bias",
             "blocks.1.ln.weight", "blocks.1.ln.bias", "blocks.1.fc.weight", "blocks.1.fc.bias",
             "ln_f.weight", "ln_f.bias"]


# -- registration ---------------------------------------------------------------------------------------------
def test_named_parameters_order_names_and_tied_weights_once():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == NET_NAMES  # definition order, depth first; the tied head weight listed once
    params = net.parameters()
    assert len(params) == len({id(p) for p in params}) == len(NET_NAMES)
    assert params[0] is net.wte.weight is net.head.weight
    assert [p for _, p in net.named_parameters()] == params
    assert net.num_parameters() == 7 * 4 + 2 * (4 + 4 + 16 + 4) + 8
    # the state dict lists a tied weight under every name, as in PyTorch
    sd = net.state_dict()
    assert list(sd) == NET_NAMES[:9] + ["ln_f.weight", "ln_f.bias", "head.weight"]
    assert sd["head.weight"] is sd["wte.weight"]


def test_reassigning_and_none_attributes():
    lin = nn.Linear(3, 2)
    lin.bias = None
    assert [n for n, _ in lin.named_parameters()] == ["weight"]
    lin.weight = nn.Parameter(np.zeros((2, 3), np.float32))
    assert [n for n, _ in lin.named_parameters()] == ["weight"]
    assert lin.parameters()[0] is lin.weight
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert len(seq) == 3 and isinstance(seq[1], nn.ReLU) and seq[-1] is list(seq)[2]


# -- state dicts ------------------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    tt.manual_seed(1)
    a = Net()
    tt.manual_seed(2)
    b = Net()
    idx = tt.tensor(np.array([[0, 3, 6], [2, 2, 1]]))
    assert not np.allclose(a(idx).numpy(), b(idx).numpy())
    saved = {k: v.copy() for k, v in a.state_dict().items()}
    result = b.load_state_dict(saved)
    assert result == {"missing_keys": [], "unexpected_keys": []}
    for k, v in b.state_dict().items():
        np.testing.assert_array_equal(v, saved[k], err_msg=k)
    np.testing.assert_array_equal(a(idx).numpy(), b(idx).numpy())
    assert b.head.weight is b.wte.weight  # loading copies into place: ties survive
    # loaded values are copies: changing the source afterwards leaves the model alone
    saved["ln_f.bias"] += 1
    assert not np.array_equal(b.ln_f.bias.data, saved["ln_f.bias"])


def test_load_state_dict_keeps_dtype_and_accepts_other_dtypes():
    lin = nn.Linear(3, 2)
    lin.load_state_dict({"weight": np.ones((2, 3), np.float64), "bias": np.zeros(2, np.float64)})
    assert lin.weight.dtype == np.float32
    np.testing.assert_array_equal(lin.weight.data, 1.0)


def test_load_state_dict_missing_key():
    net = Net()
    sd = {k: v.copy() for k, v in net.state_dict().items()}
    del sd["blocks.1.fc.bias"]
    with pytest.raises(KeyError, match=r"missing.*blocks\.1\.fc\.bias"):
        net.load_state_dict(sd)


def test_load_state_dict_unexpected_key():
    net = Net()
    sd = {k: v.copy() for k, v in net.state_dict().items()}
    sd["blocks.2.fc.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(KeyError, match=r"unexpected.*blocks\.2\.fc\.weight"):
        net.load_state_dict(sd)


def test_load_state_dict_shape_mismatch_names_key_and_both_shapes():
    net = Net()
    before = {k: v.copy() for k, v in net.state_dict().items()}
    sd = {k: v.copy() + 1 for k, v in net.state_dict().items()}
    sd["blocks.0.fc.weight"] = np.zeros((4, 5), np.float32)
    for strict in (True, False):
        with pytest.raises(KeyError) as info:
            net.load_state_dict(sd, strict=strict)
        msg = str(info.value)
        assert "blocks.0.fc.weight" in msg and "(4, 5)" in msg and "(4, 4)" in msg, msg
        # nothing was half-loaded
        for k, v in net.state_dict().items():
            np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_load_state_dict_non_strict_ignores_missing_and_unexpected():
    net = Net()
    before = {k: v.copy() for k, v in net.state_dict().items()}
    sd = {"ln_f.weight": np.full(4, 3.0, np.float32), "extra.thing": np.zeros(2, np.float32)}
    result = net.load_state_dict(sd, strict=False)
    assert result["unexpected_keys"] == ["extra.thing"]
    assert set(result["missing_keys"]) == set(before) - {"ln_f.weight"}
    np.testing.assert_array_equal(net.ln_f.weight.data, 3.0)
    for k in before:
        if k != "ln_f.weight":
            np.testing.assert_array_equal(net.state_dict()[k], before[k], err_msg=k)


# -- modes, grads, backends ----------------------------------------------------------------------------------------
def test_train_eval_propagate_and_dropout_stops_in_eval():
    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Sequential(nn.GELU(), nn.Dropout(0.3)))
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    x = tt.tensor(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    drop = model[1]
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())
    np.testing.assert_array_equal(model(x).numpy(), model(x).numpy())
    model.train()
    assert all(m.training for m in model.modules())
    y = drop(x).numpy()
    assert (y == 0).mean() > 0.2 and not np.array_equal(y, x.numpy())
    model.train(False)
    assert not model[2][1].training


def test_zero_grad_sets_none():
    net = Net()
    idx = tt.tensor(np.array([[0, 1, 2]]))
    F.cross_entropy(net(idx), idx).backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


def test_to_numpy_keeps_working():
    net = Net()
    idx = tt.tensor(np.array([[0, 1, 2]]))
    F.cross_entropy(net(idx), idx).backward()
    before = net(idx).numpy()
    grads = [p.grad.copy() for p in net.parameters()]
    assert net.to("numpy") is net
    assert all(p.backend == "numpy" and isinstance(p.data, np.ndarray) for p in net.parameters())
    np.testing.assert_array_equal(net(idx).numpy(), before)
    for p, g in zip(net.parameters(), grads):
        np.testing.assert_array_equal(p.grad, g)
    assert net.head.weight is net.wte.weight


# -- layers ---------------------------------------------------------------------------------------------------------------
def test_linear_shapes():
    lin = nn.Linear(5, 3)
    assert lin.weight.shape == (3, 5) and lin.bias.shape == (3,)
    assert lin.weight.dtype == np.float32 and lin.weight.requires_grad
    assert np.abs(lin.weight.data).max() <= 1 / np.sqrt(5)  # torch's default init bound
    assert lin(tt.randn(2, 4, 5)).shape == (2, 4, 3)
    assert lin(tt.randn(5)).shape == (3,)
    assert nn.Linear(5, 3, bias=False).bias is None
    with pytest.raises(ValueError, match="in_features"):
        lin(tt.randn(2, 4))


def test_linear_loads_a_torch_state_dict():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    ref = torch.nn.Linear(6, 4)
    lin = nn.Linear(6, 4)
    lin.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((3, 2, 6)).astype(np.float32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(lin(tt.tensor(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_embedding_and_layernorm_shapes():
    emb = nn.Embedding(10, 3)
    assert emb.weight.shape == (10, 3)
    out = emb(tt.tensor(np.array([[1, 2, 9], [0, 0, 0]])))
    assert out.shape == (2, 3, 3)
    np.testing.assert_array_equal(out.numpy()[1, 2], emb.weight.data[0])
    with pytest.raises(IndexError):
        emb(tt.tensor(np.array([10])))
    ln = nn.LayerNorm(3)
    assert ln.weight.shape == ln.bias.shape == (3,)
    y = ln(out).numpy()
    assert y.shape == (2, 3, 3)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.var(-1), 1, atol=1e-3)
    assert nn.LayerNorm(3, bias=False).bias is None
    assert [n for n, _ in nn.LayerNorm(3, bias=False).named_parameters()] == ["weight"]


def test_sequential_forward():
    seq = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2), nn.GELU())
    x = tt.randn(4, 3)
    expected = F.gelu(seq[2](F.relu(seq[0](x))))
    np.testing.assert_array_equal(seq(x).numpy(), expected.numpy())
    assert seq(x).shape == (4, 2)


# -- it learns ---------------------------------------------------------------------------------------------------------
def _spirals(n=200, seed=0):
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.random(n // 2)) * 2 * np.pi  # two interleaved arms, one turn each
    arm = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / (2 * np.pi)
    x = np.concatenate([arm, -arm]) + rng.normal(0, 0.02, (n, 2))
    y = np.concatenate([np.zeros(n // 2, np.int64), np.ones(n // 2, np.int64)])
    return x.astype(np.float32), y


def test_small_mlp_learns_two_spirals():
    """A 2-32-2 MLP (GELU) fits 200 two-spiral points: cross-entropy from > 0.6 to < 0.1.

    Full-batch AdamW, lr 1e-2, no weight decay, 300 steps, seeded data and weights. It starts
    near ln 2 = 0.69 and ends near 0.05 (0.03-0.06 over other seeds) with ~97% accuracy;
    a linear model stalls near 0.39 on this data, so passing needs the hidden layer.
    """
    tt.manual_seed(0)
    x_np, y_np = _spirals()
    x, y = tt.tensor(x_np), tt.tensor(y_np)
    model = nn.Sequential(nn.Linear(2, 32), nn.GELU(), nn.Linear(32, 2))
    opt = tt.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with tt.no_grad():
        logits = model(x).numpy()
    final = float(F.cross_entropy(tt.tensor(logits), y).item())
    accuracy = float((logits.argmax(-1) == y_np).mean())
    assert losses[0] > 0.6, losses[0]
    assert final < 0.1, (final, accuracy)
    assert accuracy >= 0.95
