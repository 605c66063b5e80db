"""Optimizers, learning-rate schedules and gradient clipping (AdamW and SGD against PyTorch)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import tinytensor as tt
from tinytensor.nn.utils import clip_grad_norm_
from tinytensor.optim import SGD, AdamW, WarmupCosine, warmup_cosine_lr

RTOL, ATOL = 1e-6, 1e-9


# -- a small float64 model, and its torch twin ---------------------------------------------------------
class MLP(tt.nn.Module):
    def __init__(self, sizes=(3, 8, 8, 2)):
        super().__init__()
        self.layers = tt.nn.ModuleList(tt.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        for p in self.parameters():
            p.data = p.data.astype(np.float64)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.tanh()
        return x


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, 3))
    y = rng.standard_normal((16, 2)) + 0.8  # off the outputs: with seed 0 the grad norm falls from ~2.4 to ~0.9
    return x, y


def _tt_loss(model, x, y, backend="numpy"):
    d = model(tt.tensor(x, backend=backend)) - tt.tensor(y, backend=backend)
    return (d * d).mean()


def _torch_twin(torch, model):
    tmodel = torch.nn.Sequential(*[m for layer in model.layers
                                   for m in (torch.nn.Linear(layer.in_features, layer.out_features).double(),
                                             torch.nn.Tanh())][:-1])
    sd = {}
    for i, layer in enumerate(model.layers):
        sd[f"{2 * i}.weight"] = torch.from_numpy(layer.weight.data.copy())
        sd[f"{2 * i}.bias"] = torch.from_numpy(layer.bias.data.copy())
    tmodel.load_state_dict(sd)
    return tmodel


def _groups(params):
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


SCHEDULE = dict(max_lr=3e-2, warmup_steps=3, decay_steps=8, min_lr=3e-3)


def test_adamw_two_groups_schedule_and_clipping_match_torch():
    torch = pytest.importorskip("torch")
    model = MLP()
    tmodel = _torch_twin(torch, model)
    initial = model.layers[0].weight.data.copy()
    x, y = _data()
    opt = AdamW(_groups(model.parameters()), lr=SCHEDULE["max_lr"], betas=(0.9, 0.95), eps=1e-8)
    tparams = list(tmodel.parameters())
    topt = torch.optim.AdamW([{"params": [p for p in tparams if p.ndim >= 2], "weight_decay": 0.1},
                              {"params": [p for p in tparams if p.ndim < 2], "weight_decay": 0.0}],
                             lr=SCHEDULE["max_lr"], betas=(0.9, 0.95), eps=1e-8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    norms = []
    for step in range(10):
        lr = warmup_cosine_lr(step, **SCHEDULE)
        for g in opt.param_groups + topt.param_groups:
            g["lr"] = lr

        opt.zero_grad()
        loss = _tt_loss(model, x, y)
        loss.backward()
        norm = clip_grad_norm_(model.parameters(), 1.0)

        topt.zero_grad()
        tloss = ((tmodel(xt) - yt) ** 2).mean()
        tloss.backward()
        tnorm = torch.nn.utils.clip_grad_norm_(tmodel.parameters(), 1.0)

        assert loss.dtype == np.float64
        np.testing.assert_allclose(loss.item(), tloss.item(), rtol=RTOL, atol=ATOL, err_msg=f"loss, step {step}")
        np.testing.assert_allclose(norm, tnorm.item(), rtol=RTOL, atol=ATOL, err_msg=f"grad norm, step {step}")
        norms.append(norm)
        opt.step()
        topt.step()

    assert max(norms) > 1.0, f"clipping never triggered: norms {norms}"
    assert min(norms) < 1.0, f"every step clipped, the unclipped path went untested: norms {norms}"
    for (name, p), tp in zip(model.named_parameters(), tparams):
        assert p.dtype == np.float64
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=name)
    # the model did move: the comparison is not between two untouched copies
    assert not np.allclose(model.layers[0].weight.data, initial)


def test_adamw_weight_decay_is_decoupled():
    """A zero gradient after a first step: weight decay alone shrinks the decayed group, not the other."""
    w = tt.nn.Parameter(np.ones((2, 2)))
    b = tt.nn.Parameter(np.ones(2))
    opt = AdamW([{"params": [w], "weight_decay": 0.5}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    w.grad, b.grad = np.zeros((2, 2)), np.zeros(2)
    opt.step()
    np.testing.assert_allclose(w.data, 1 - 0.1 * 0.5)
    np.testing.assert_array_equal(b.data, 1.0)


# -- optimizer state dicts ---------------------------------------------------------------------------------
def _train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        _tt_loss(model, x, y).backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


def _trained_adamw(data_seed, steps):
    """A two-group AdamW (lr 1e-2) on a fresh MLP, after ``steps`` training steps: it has state."""
    x, y = _data(data_seed)
    model = MLP()
    opt = AdamW(_groups(model.parameters()), lr=1e-2)
    _train(model, opt, x, y, steps)
    return opt


def test_optimizer_state_dict_round_trip_resumes_exactly():
    x, y = _data(1)
    model = MLP()
    opt = AdamW(_groups(model.parameters()), lr=1e-2, betas=(0.9, 0.95))
    opt.param_groups[1]["lr"] = 5e-3  # a changed hyperparameter must come back too
    _train(model, opt, x, y, 3)

    saved_opt = opt.state_dict()
    saved_weights = {k: v.copy() for k, v in model.state_dict().items()}

    tt.manual_seed(123)  # a differently initialised model: everything must come from the state dicts
    restored = MLP()
    assert not np.array_equal(restored.layers[0].weight.data, saved_weights["layers.0.weight"])
    restored.load_state_dict(saved_weights)
    ropt = AdamW(_groups(restored.parameters()), lr=1.0, betas=(0.5, 0.5))
    ropt.load_state_dict(saved_opt)
    assert ropt.param_groups[1]["lr"] == 5e-3 and ropt.param_groups[0]["betas"] == (0.9, 0.95)

    # mutating the dict that was loaded must not reach the restored optimizer
    for s in saved_opt["state"].values():
        s["exp_avg"][...] = 1e6
    saved_opt["param_groups"][0]["lr"] = 123.0

    _train(model, opt, x, y, 3)
    _train(restored, ropt, x, y, 3)
    for (name, a), b in zip(model.named_parameters(), restored.parameters()):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
    for p, q in zip(opt._params(), ropt._params()):
        assert opt.state[id(p)]["step"] == ropt.state[id(q)]["step"] == 6
        np.testing.assert_array_equal(opt.state[id(p)]["exp_avg_sq"], ropt.state[id(q)]["exp_avg_sq"])


def test_optimizer_state_dict_holds_copies():
    opt = _trained_adamw(data_seed=2, steps=2)
    sd = opt.state_dict()
    first = opt._params()[0]
    before = opt.state[id(first)]["exp_avg"].copy()
    assert set(sd["state"]) == set(range(len(opt._params())))
    for s in sd["state"].values():
        s["exp_avg"] += 1.0
        s["exp_avg_sq"] *= 0.0
    sd["param_groups"][0]["lr"] = 99.0
    sd["param_groups"][0]["params"].append(1000)
    np.testing.assert_array_equal(opt.state[id(first)]["exp_avg"], before)
    assert np.all(opt.state[id(first)]["exp_avg_sq"] > 0)
    assert opt.param_groups[0]["lr"] == 1e-2
    assert all(p is not None and hasattr(p, "shape") for p in opt.param_groups[0]["params"])


def test_optimizer_load_state_dict_rejects_mismatched_groups():
    sd = _trained_adamw(data_seed=3, steps=1).state_dict()

    one_group = AdamW(MLP().parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="parameter groups"):
        one_group.load_state_dict(sd)

    other = MLP()
    params = other.parameters()
    regrouped = AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)  # same count, other sizes
    with pytest.raises(ValueError, match="parameter groups"):
        regrouped.load_state_dict(sd)

    small = MLP((3, 4, 2))
    with pytest.raises(ValueError):
        AdamW(_groups(small.parameters()), lr=1e-2).load_state_dict(sd)


OPTIMIZERS = {"adamw": lambda params: AdamW(_groups(params), lr=1e-2, betas=(0.9, 0.95)),
              "muon+adamw": lambda params: _muon_and_adamw(params),
              "sgd": lambda params: SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_step_and_resume_alike_on_every_backend(backend_name, name):
    """The same steps on this backend as on NumPy (AdamW's flat path, and its per-tensor path when a
    gradient is missing), with clipping; a state dict taken on the backend resumes exactly there."""
    x, y = _data(4)

    def build(backend):
        tt.manual_seed(0)
        model = MLP().to(backend)
        return model, OPTIMIZERS[name](model.parameters())

    def train(model, opt, steps, drop_grad_at=None):
        for step in range(steps):
            opt.zero_grad()
            _tt_loss(model, x, y, model.parameters()[0].backend).backward()
            clip_grad_norm_(model.parameters(), 0.5)
            if step == drop_grad_at:
                model.parameters()[-1].grad = None  # AdamW: the per-tensor path for this step
            opt.step()

    (ref, ref_opt), (model, opt) = build("numpy"), build(backend_name)
    train(ref, ref_opt, 4, drop_grad_at=1)
    train(model, opt, 4, drop_grad_at=1)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.backend == backend_name and p.dtype == np.float64
        np.testing.assert_allclose(p.numpy(), q.data, rtol=1e-12, atol=1e-14, err_msg=n)

    resumed, resumed_opt = build(backend_name)
    resumed.load_state_dict({k: v.copy() for k, v in model.state_dict().items()})
    resumed_opt.load_state_dict(opt.state_dict())
    train(model, opt, 2)
    train(resumed, resumed_opt, 2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        np.testing.assert_array_equal(p.numpy(), q.numpy())


# -- SGD ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_sgd_momentum_matches_torch(weight_decay):
    torch = pytest.importorskip("torch")
    model = MLP()
    tmodel = _torch_twin(torch, model)
    x, y = _data(4)
    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
    topt = torch.optim.SGD(tmodel.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for step in range(5):
        opt.zero_grad()
        loss = _tt_loss(model, x, y)
        loss.backward()
        opt.step()
        topt.zero_grad()
        tloss = ((tmodel(xt) - yt) ** 2).mean()
        tloss.backward()
        topt.step()
        np.testing.assert_allclose(loss.item(), tloss.item(), rtol=RTOL, atol=ATOL, err_msg=f"loss, step {step}")
    for (name, p), tp in zip(model.named_parameters(), tmodel.parameters()):
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=RTOL, atol=ATOL, err_msg=name)


# -- learning-rate schedule ------------------------------------------------------------------------------------
def test_warmup_cosine_lr_shape():
    max_lr, warmup, decay, min_lr = 1e-3, 10, 50, 1e-4
    lrs = [warmup_cosine_lr(s, max_lr, warmup, decay, min_lr) for s in range(70)]
    # warmup: linear, nanoGPT's lr * (it + 1) / (warmup + 1)
    for s in range(warmup):
        assert lrs[s] == pytest.approx(max_lr * (s + 1) / (warmup + 1), rel=1e-12)
    np.testing.assert_allclose(np.diff(lrs[:warmup]), max_lr / (warmup + 1), rtol=1e-9)
    assert lrs[warmup] == pytest.approx(max_lr, rel=1e-12)
    assert max(lrs) == pytest.approx(max_lr, rel=1e-12)
    # cosine decay: strictly decreasing, through the midpoint, down to min_lr
    decay_part = lrs[warmup:decay + 1]
    assert all(a > b for a, b in zip(decay_part, decay_part[1:]))
    mid = warmup + (decay - warmup) // 2
    assert lrs[mid] == pytest.approx((max_lr + min_lr) / 2, rel=1e-12)
    assert lrs[decay] == pytest.approx(min_lr, rel=1e-12)
    assert all(lr == min_lr for lr in lrs[decay:])
    assert all(min_lr <= lr <= max_lr for lr in lrs[warmup:])


def test_warmup_cosine_scheduler_scales_each_group():
    w, b = tt.nn.Parameter(np.zeros((2, 2))), tt.nn.Parameter(np.zeros(2))
    opt = AdamW([{"params": [w], "lr": 1e-3}, {"params": [b], "lr": 4e-3}], lr=1.0)
    sched = WarmupCosine(opt, warmup_steps=4, decay_steps=20, min_lr_ratio=0.1)
    for step in range(25):
        if step:
            sched.step()
        for g, base in zip(opt.param_groups, (1e-3, 4e-3)):
            assert g["lr"] == pytest.approx(warmup_cosine_lr(step, base, 4, 20, 0.1 * base), rel=1e-12)
        assert opt.param_groups[1]["lr"] == pytest.approx(4 * opt.param_groups[0]["lr"], rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


# -- gradient clipping ---------------------------------------------------------------------------------------
def test_clip_grad_norm_below_max_leaves_grads_alone():
    rng = np.random.default_rng(5)
    params = [tt.nn.Parameter(rng.standard_normal((3, 4))), tt.nn.Parameter(rng.standard_normal(4))]
    grads = [rng.standard_normal(p.shape) * 0.1 for p in params]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    expected = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    assert expected < 1.0
    norm = clip_grad_norm_(params, 1.0)
    assert norm == pytest.approx(expected, rel=1e-12)
    for p, g in zip(params, grads):
        np.testing.assert_array_equal(p.grad, g)


def test_clip_grad_norm_above_max_scales_to_max():
    rng = np.random.default_rng(6)
    params = [tt.nn.Parameter(rng.standard_normal((3, 4)).astype(np.float32)), tt.nn.Parameter(np.zeros(2))]
    params[0].grad = rng.standard_normal((3, 4)).astype(np.float32) * 10
    # params[1] has no grad: skipped
    g0 = params[0].grad.copy()
    norm = clip_grad_norm_(params, 2.0)
    assert norm == pytest.approx(float(np.linalg.norm(g0.astype(np.float64))), rel=1e-6)
    assert norm > 2.0
    assert params[0].grad.dtype == np.float32
    assert float(np.linalg.norm(params[0].grad.astype(np.float64))) == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(params[0].grad, g0 * (2.0 / norm), rtol=1e-5)
    assert params[1].grad is None
    assert clip_grad_norm_([params[1]], 1.0) == 0.0


def test_adamw_flat_and_per_tensor_paths_match_torch():
    """The flat-buffer path (all grads present), the per-tensor fallback (a grad missing,
    then unequal step counts) and the switches between them all match torch.optim.AdamW."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    init = [rng.standard_normal((3, 4)), rng.standard_normal((5,))]
    ours = [tt.nn.Parameter(a.copy()) for a in init]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    opt = tt.optim.AdamW(ours, lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    topt = torch.optim.AdamW(theirs, lr=0.1, betas=(0.9, 0.95), weight_decay=0.1)
    for step, with_second in enumerate([True, False, True, True]):
        grads = [rng.standard_normal(a.shape) for a in init]
        for i, (p, tp) in enumerate(zip(ours, theirs)):
            keep = i == 0 or with_second
            p.grad = grads[i].copy() if keep else None
            tp.grad = torch.tensor(grads[i]) if keep else None
        opt.step()
        topt.step()
        for p, tp in zip(ours, theirs):
            np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-10, atol=1e-12, err_msg=f"step {step}")
    state = opt.state_dict()["state"]
    assert [state[i]["step"] for i in range(2)] == [4, 3]


# -- Muon --------------------------------------------------------------------------------------------------
def _torch_muon_step(torch, params, bufs, lr, momentum, nesterov, weight_decay, ns_steps=5):
    """Muon as published (Keller Jordan's muon.py: muon_update + zeropower_via_newtonschulz5), in float32."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    for p, buf in zip(params, bufs):
        g = p.grad
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf
        X = update.float()
        tall = X.size(-2) > X.size(-1)
        if tall:
            X = X.mT
        X = X / (X.norm() + 1e-7)
        for _ in range(ns_steps):
            A = X @ X.mT
            B = b * A + c * A @ A
            X = a * X + B @ X
        if tall:
            X = X.mT
        X = X * max(1, g.size(-2) / g.size(-1)) ** 0.5
        with torch.no_grad():
            p.mul_(1 - lr * weight_decay)
            p.add_(X.reshape(p.shape), alpha=-lr)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_a_torch_reference(nesterov):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    shapes = [(6, 4), (4, 6), (5, 5), (12, 3)]  # tall, wide, square, very tall (scale 2)
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ours = [tt.nn.Parameter(a.copy()) for a in init]
    theirs = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    bufs = [torch.zeros_like(t) for t in theirs]
    opt = tt.optim.Muon(ours, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
    for step in range(6):
        for p, tp in zip(ours, theirs):
            g = rng.standard_normal(p.shape).astype(np.float32)
            p.grad, tp.grad = g.copy(), torch.from_numpy(g.copy())
        opt.step()
        _torch_muon_step(torch, theirs, bufs, lr=0.05, momentum=0.9, nesterov=nesterov, weight_decay=0.1)
        for i, (p, tp, buf) in enumerate(zip(ours, theirs, bufs)):
            assert p.dtype == np.float32 and opt.state[id(p)]["momentum_buffer"].dtype == np.float32
            np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=f"step {step}, {i}")
            np.testing.assert_allclose(opt.state[id(p)]["momentum_buffer"], buf.numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(ours[0].data, init[0])


def test_newton_schulz_orthogonalises():
    G = np.random.default_rng(0).standard_normal((16, 48)).astype(np.float32)
    for M in (G, G.T):
        O = tt.optim.newton_schulz(M, steps=5)
        assert O.shape == M.shape and O.dtype == np.float32
        s = np.linalg.svd(O, compute_uv=False)
        assert 0.6 < s.min() and s.max() < 1.25, s  # the quintic's band around 1, not exactly 1 (by design)
        u, _, vt = np.linalg.svd(M, full_matrices=False)
        assert np.sum(O * (u @ vt)) / np.linalg.norm(O) / np.linalg.norm(u @ vt) > 0.98  # along U V^T


def test_muon_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match=r"matrices only.*shape \(3,\).*AdamW"):
        tt.optim.Muon([tt.nn.Parameter(np.zeros((2, 3), np.float32)), tt.nn.Parameter(np.zeros(3, np.float32))])
    with pytest.raises(ValueError, match="momentum"):
        tt.optim.Muon([tt.nn.Parameter(np.zeros((2, 3)))], momentum=1.0)


def _muon_and_adamw(params):
    matrices = [p for p in params if p.ndim == 2]
    others = [p for p in params if p.ndim != 2]
    return tt.optim.Combined([tt.optim.Muon(matrices[1:], lr=0.02, momentum=0.9),
                              AdamW(_groups(matrices[:1] + others), lr=1e-2, betas=(0.9, 0.95))])


def test_combined_state_dict_round_trips_and_numbers_every_parameter():
    x, y = _data(5)
    model = MLP()
    opt = _muon_and_adamw(model.parameters())
    _train(model, opt, x, y, 3)
    sd = opt.state_dict()
    n = len(model.parameters())
    assert sorted(i for g in sd["param_groups"] for i in g["params"]) == list(range(n))
    assert sorted(sd["state"]) == list(range(n))
    assert [sorted(g) for g in sd["param_groups"]] == [p for p in (
        ["lr", "momentum", "nesterov", "ns_steps", "params", "weight_decay"],
        ["betas", "eps", "lr", "params", "weight_decay"], ["betas", "eps", "lr", "params", "weight_decay"])]

    tt.manual_seed(9)
    restored = MLP()
    restored.load_state_dict({k: v.copy() for k, v in model.state_dict().items()})
    ropt = _muon_and_adamw(restored.parameters())
    ropt.load_state_dict(sd)
    for i, s in ropt.state_dict()["state"].items():
        assert set(s) == set(sd["state"][i])
        for name, v in s.items():
            np.testing.assert_array_equal(v, sd["state"][i][name])
    _train(model, opt, x, y, 2)
    _train(restored, ropt, x, y, 2)
    for p, q in zip(model.parameters(), restored.parameters()):
        np.testing.assert_array_equal(p.data, q.data)

    swapped = dict(sd, param_groups=sd["param_groups"][1:] + sd["param_groups"][:1])
    with pytest.raises((ValueError, KeyError)):
        _muon_and_adamw(MLP().parameters()).load_state_dict(swapped)
    with pytest.raises(ValueError, match="parameter groups"):
        _muon_and_adamw(MLP().parameters()).load_state_dict(dict(sd, param_groups=sd["param_groups"][:2]))
    wrong_state = {**sd, "state": {**sd["state"], 0: {"exp_avg": sd["state"][0]["momentum_buffer"]}}}
    with pytest.raises(ValueError, match="momentum_buffer"):
        _muon_and_adamw(MLP().parameters()).load_state_dict(wrong_state)
    with pytest.raises(ValueError, match="ns_steps"):  # a loaded group is checked like a new one
        bad = [dict(g) for g in sd["param_groups"]]
        bad[0]["ns_steps"] = 10**9
        _muon_and_adamw(MLP().parameters()).load_state_dict(dict(sd, param_groups=bad))
    with pytest.raises(ValueError, match="two optimizers"):
        p = MLP().parameters()
        tt.optim.Combined([SGD(p), SGD(p[:1])])


# -- warmup-stable-decay -------------------------------------------------------------------------------------
def test_warmup_stable_decay_lr_shape():
    lr, warmup, total, frac, min_lr = 1e-2, 10, 100, 0.2, 1e-3
    lrs = [tt.optim.warmup_stable_decay_lr(s, lr, warmup, total, frac, min_lr) for s in range(120)]
    for s in range(warmup):  # the same warmup as warmup_cosine_lr
        assert lrs[s] == warmup_cosine_lr(s, lr, warmup, total, min_lr)
    assert all(v == lr for v in lrs[warmup:80])  # stable
    np.testing.assert_allclose(lrs[80:101], np.linspace(lr, min_lr, 21), rtol=1e-12)  # linear decay, last 20 %
    assert all(v == min_lr for v in lrs[100:])
    # no decay part: stable to the end; all decay: straight down from the warmup
    assert tt.optim.warmup_stable_decay_lr(99, lr, warmup, total, 0.0, min_lr) == lr
    assert tt.optim.warmup_stable_decay_lr(55, lr, warmup, total, 1.0, min_lr) == pytest.approx(
        min_lr + (lr - min_lr) * 45 / 90)


@pytest.mark.skipif(not __import__("cupy_standin").installed(), reason="counts need the CuPy stand-in")
def test_muon_step_reads_nothing_back_from_the_device():
    import cupy_standin
    rng = np.random.default_rng(2)
    params = [tt.nn.Parameter(rng.standard_normal(s).astype(np.float32)).to("cupy") for s in ((8, 4), (4, 8))]
    ref = [tt.nn.Parameter(p.numpy()) for p in params]
    opt, ref_opt = tt.optim.Muon(params), tt.optim.Muon(ref)
    for _ in range(2):
        for p, q in zip(params, ref):
            g = rng.standard_normal(p.shape).astype(np.float32)
            q.grad, p.grad = g, tt.backend.to_backend(g, "cupy")
        with cupy_standin.count_syncs() as syncs:
            opt.step()
        ref_opt.step()
        assert syncs.n == 0, syncs
    for p, q in zip(params, ref):
        assert p.backend == "cupy" and p.dtype == np.float32
        np.testing.assert_allclose(p.numpy(), q.data, rtol=1e-6, atol=1e-7)
