"""Muon (Keller Jordan, 2024): momentum orthogonalised by a Newton-Schulz iteration, for 2-D weights;
``Combined`` steps it beside AdamW (embeddings, head, gains and biases) as one optimizer."""
from __future__ import annotations

import numpy as np

from .. import backend, kernels
from .optimizer import Optimizer

# the reference's quintic: maximises the slope at 0, so small singular values grow fast
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G, steps: int = 5, eps: float = 1e-7):
    """An approximation of U V^T for G = U S V^T (its singular values pushed to about 1), as the
    reference's ``zeropower_via_newtonschulz5``, in float32 (NumPy has no bfloat16 GEMM). G may be
    a stack (..., m, n) of equal-shaped matrices, each orthogonalised on its own (one batched
    product per stage instead of one per matrix).

    Each iteration is X <- (a I + b A + c A^2) X with A = X X^T: the reference's a X + B X with
    a I folded into the small (m, m) factor, so an iteration is 3 products and no elementwise pass
    over X (the same polynomial; float32 rounding differs in the last bits).

    >>> O = newton_schulz(np.random.default_rng(0).standard_normal((4, 6)))   # doctest: +SKIP
    """
    xp = backend.xp_of(G)
    a, b, c = NS_COEFFICIENTS
    tall = G.shape[-2] > G.shape[-1]
    X = xp.swapaxes(G, -1, -2) if tall else G  # iterate on the wide side: X X^T is the smaller Gram matrix
    X, view = xp.empty(X.shape, xp.float32), X  # a C-contiguous float32 copy: BLAS-ready, ours to overwrite
    X[...] = view
    # Frobenius norm >= spectral norm, so every singular value starts in (0, 1]
    X /= xp.sqrt((X * X).sum(axis=(-2, -1), keepdims=True)) + eps
    m = X.shape[-2]
    A = xp.empty(X.shape[:-1] + (m,), xp.float32)
    B, Y = xp.empty_like(A), xp.empty_like(X)
    diagonal = B.reshape(-1, m * m)[:, ::m + 1]  # a view: each matrix's diagonal
    f32 = np.float32
    for _ in range(steps):
        xp.matmul(X, xp.swapaxes(X, -1, -2), out=A)
        xp.matmul(A, A, out=B)
        B *= f32(c)
        A *= f32(b)
        B += A
        diagonal += f32(a)
        xp.matmul(B, X, out=Y)
        X, Y = Y, X
    return xp.swapaxes(X, -1, -2) if tall else X


class Muon(Optimizer):
    """>>> opt = Muon(hidden_matrices, lr=0.02, momentum=0.95)

    Per 2-D parameter: momentum buffer m = mu m + (1 - mu) g; the update (Nesterov:
    (1 - mu) g + mu m, else m) is orthogonalised by ``newton_schulz`` and applied with
    lr * max(1, rows / cols) ** 0.5 (the reference's per-shape scale); weight decay is decoupled.
    No read from the device: the normalisation stays an array.
    """

    state_names = ("momentum_buffer",)

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))

    def _check(self, group):
        super()._check(group)
        if not 0 <= group["momentum"] < 1:
            raise ValueError(f"Muon momentum must be in [0, 1), got {group['momentum']}")
        if group["weight_decay"] < 0:
            raise ValueError(f"Muon weight_decay must be >= 0, got {group['weight_decay']}")
        if not (isinstance(group["ns_steps"], int) and 1 <= group["ns_steps"] <= 100):
            raise ValueError(f"Muon ns_steps must be an integer in [1, 100], got {group['ns_steps']!r}")
        for p in group["params"]:
            if p.ndim != 2:
                raise ValueError(f"Muon orthogonalises matrices only; got a parameter of shape {p.shape}. "
                                 "Give gains, biases (and embeddings, the head) to AdamW beside it: "
                                 "tinytensor.optim.Combined([Muon(matrices), AdamW(others)])")

    def step(self):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            by_shape = {}  # equal-shaped matrices (a model's layers) are orthogonalised as one stack
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault((p.shape, p.xp), []).append(p)
            for (shape, xp), params in by_shape.items():
                rows, cols = shape
                tall = rows > cols  # orthogonalised as its transpose (see newton_schulz)
                stack = xp.empty((len(params),) + ((cols, rows) if tall else shape), xp.float32)
                for p, slot in zip(params, stack):
                    self._momentum(p, mu, group["nesterov"], slot.T if tall else slot)
                O = newton_schulz(stack, group["ns_steps"])  # wide already: comes back as it went in
                step = lr * max(1.0, rows / cols) ** 0.5
                for p, o in zip(params, O):
                    o = o.T if tall else o
                    k = kernels.modern_for_arrays(p.data, o, contiguous=False)
                    if k is not None:
                        k.muon_apply(p.data, o, np.float32(1 - lr * wd), np.float32(step))
                        continue
                    if wd:
                        p.data *= 1 - lr * wd
                    o *= step
                    p.data -= o.astype(p.dtype, copy=False)

    def _momentum(self, p, mu, nesterov, out):
        """The momentum buffer m = mu m + (1 - mu) g, and the update ((1 - mu) g + mu m with Nesterov,
        else m) written into ``out`` (its slot in the Newton-Schulz stack)."""
        g = p.grad
        s = self.state.get(id(p))
        if s is None:
            s = self.state[id(p)] = {"momentum_buffer": p.xp.zeros_like(p.data)}
        m = s["momentum_buffer"]
        k = kernels.modern_for_arrays(g, m, out, contiguous=False)
        if k is not None and m.flags.c_contiguous and p.data.flags.c_contiguous:
            k.muon_momentum(g, m, np.float32(mu), bool(nesterov), out)
            return
        m *= mu
        m += (1 - mu) * g
        out[...] = (1 - mu) * g + mu * m if nesterov else m


class Combined:
    """Several optimizers over disjoint parameters, stepped as one (e.g. Muon on the hidden
    matrices, AdamW on the rest). ``param_groups`` is theirs, in order; ``state_dict`` numbers
    the parameters over all of them, so it is any optimizer's layout (a checkpoint stores it).

    >>> opt = Combined([Muon(matrices, lr=0.02), AdamW(others, lr=1e-3)])   # doctest: +SKIP
    """

    def __init__(self, optimizers):
        self.optimizers = list(optimizers)
        if not self.optimizers:
            raise ValueError("Combined: got no optimizers")
        seen = set()
        for p in self._params():
            if id(p) in seen:
                raise ValueError(f"Combined: a parameter of shape {p.shape} is in two optimizers")
            seen.add(id(p))

    @property
    def param_groups(self):
        return [g for opt in self.optimizers for g in opt.param_groups]

    def _params(self):
        return [p for opt in self.optimizers for p in opt._params()]

    def zero_grad(self):
        for opt in self.optimizers:
            opt.zero_grad()

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            sd = opt.state_dict()
            state.update({offset + i: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += len(opt._params())
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict):
        groups, state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state_dict has {len(groups)} parameter groups, this Combined optimizer "
                             f"{len(self.param_groups)}")
        first, offset = 0, 0
        for opt in self.optimizers:
            n, own = len(opt._params()), groups[first:first + len(opt.param_groups)]
            indices = sorted(int(i) for g in own for i in g["params"])
            if indices != list(range(offset, offset + n)):
                raise ValueError(f"optimizer state_dict's groups {first}..{first + len(own) - 1} do not hold "
                                 f"parameters {offset}..{offset + n - 1} ({type(opt).__name__}'s)")
            opt.load_state_dict({
                "param_groups": [{**g, "params": [int(i) - offset for i in g["params"]]} for g in own],
                "state": {int(i) - offset: s for i, s in state.items() if offset <= int(i) < offset + n}})
            first, offset = first + len(own), offset + n
