"""Per-op forward+backward time against PyTorch, at the GPT's own shapes.

    python -m bench.ops [--preset shakespeare_char_cpu] [--quick]
    python -m bench.ops --threads 1 --clock cpu      # one thread each, CPU time: robust on a busy machine

Shows where a training step's time goes, op by op; each op is timed as
forward + backward with a fixed upstream gradient, alternating with torch.
Covers the non-matmul ops of the default model and of the modern options
(rmsnorm, relu2, swiglu: taken from gpt/model.py's own modules and functions,
so a faster implementation there shows up here; rope: the fused op the model
runs on the packed projection, against PyTorch's rope on q and k) and two matmuls
for scale. Dropout uses p=0.2 (the full preset's).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np

import tinytensor as tt
import tinytensor.functional as F
from bench.train_step import model_config
from gpt import model as gm

DROPOUT = 0.2


def model_activation(cfg, kind):
    """gpt.model's MLP with its two linears (and dropout) taken out: the activation the model runs."""
    mlp = gm.MLP(dataclasses.replace(cfg, mlp=kind, dropout=0.0))
    mlp.c_fc = mlp.c_proj = mlp.dropout = (lambda x: x)
    return mlp


def torch_activation(cfg, kind):
    from bench.torch_gpt import MLP
    mlp = MLP(dataclasses.replace(cfg, mlp=kind, dropout=0.0))
    mlp.c_fc = mlp.c_proj = mlp.dropout = torch_mod().nn.Identity()
    return mlp


def cases(cfg, batch):
    """name -> (tinytensor fn, torch fn, input shapes); inputs are float32 normal."""
    B, T, C, H, V = batch, cfg.block_size, cfg.n_embd, cfg.n_head, cfg.vocab_size
    N = B * T
    rng = np.random.default_rng(0)
    targets = rng.integers(0, V, N)
    idx = rng.integers(0, V, (B, T))
    return {
        "linear c_fc": (lambda x, w, b: F.linear(x, w, b), lambda x, w, b: tf().linear(x, w, b),
                        [(N, C), (4 * C, C), (4 * C,)]),
        "linear c_attn": (lambda x, w, b: F.linear(x, w, b), lambda x, w, b: tf().linear(x, w, b),
                          [(N, C), (3 * C, C), (3 * C,)]),
        "gelu": (F.gelu, lambda x: tf().gelu(x, approximate="tanh"), [(N, 4 * C)]),
        "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), lambda x, w, b: tf().layer_norm(x, (C,), w, b),
                       [(B, T, C), (C,), (C,)]),
        "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
                      lambda q, k, v: tf().scaled_dot_product_attention(q, k, v, is_causal=True),
                      [(B, H, T, C // H)] * 3),
        "cross_entropy": (lambda x: F.cross_entropy(x, targets),
                          lambda x: tf().cross_entropy(x, torch_mod().from_numpy(targets)), [(N, V)]),
        "embedding": (lambda w: F.embedding(idx, w), lambda w: tf().embedding(torch_mod().from_numpy(idx), w),
                      [(V, C)]),
        "add (residual)": (lambda a, b: a + b, lambda a, b: a + b, [(B, T, C), (B, T, C)]),
        "dropout": (lambda x: F.dropout(x, DROPOUT), lambda x: tf().dropout(x, DROPOUT), [(B, T, C)]),
        "attention+dropout": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=DROPOUT),
                              lambda q, k, v: tf().scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                dropout_p=DROPOUT),
                              [(B, H, T, C // H)] * 3),
        "softmax": (lambda x: F.softmax(x, axis=-1), lambda x: tf().softmax(x, dim=-1), [(B * H, T, T)]),
        "rmsnorm": (lambda x, w: gm.rms_norm(x, cfg.norm_eps) * w, lambda x, w: tf().rms_norm(x, (C,), w, cfg.norm_eps),
                    [(B, T, C), (C,)]),
        "relu2": (model_activation(cfg, "relu2"), lambda x: torch_activation(cfg, "relu2")(x), [(N, 4 * C)]),
        "swiglu": (model_activation(cfg, "swiglu"), lambda x: torch_activation(cfg, "swiglu")(x),
                   [(N, 2 * gm.mlp_hidden(dataclasses.replace(cfg, mlp="swiglu")))]),
        # what the models run: ours the fused op on the packed projection (B, T, 3C), rotating q and k
        # and passing v through; PyTorch's bench/torch_gpt.py rope on the q and k heads of the same input
        "rope": (lambda x: F.qk_norm_rope(x, H, gm.rope_tables(np.arange(T), C // H, np, np.float32), qk_norm=False),
                 lambda x: torch_rope(x[..., :2 * C].reshape(B, T, 2 * H, C // H).transpose(1, 2), T),
                 [(B, T, 3 * C)]),
    }


def torch_rope(x, T):
    from bench.torch_gpt import rope
    return rope(x, torch_mod().arange(T))


def torch_mod():
    import torch
    return torch


def tf():
    return torch_mod().nn.functional


def time_op(fn, arrays, make, reps, clock=time.perf_counter):
    inputs = [make(a) for a in arrays]
    out = fn(*inputs)
    g = np.ones(tuple(out.shape), np.float32)
    times = []
    for _ in range(reps):
        inputs = [make(a) for a in arrays]
        t = clock()
        out = fn(*inputs)
        out.backward(make_grad(out, g))
        times.append(clock() - t)
    return statistics.median(times) * 1000


def make_grad(out, g):
    return g if isinstance(out, tt.Tensor) else torch_mod().from_numpy(g)


def set_threads(n, have_torch):
    """The same number of threads on both sides: BLAS (threadpoolctl), numba's kernels, torch."""
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n, user_api="blas")
    except ImportError:
        pass
    if tt.kernels.module() is not None:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if have_torch:
        torch_mod().set_num_threads(n)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="shakespeare_char_cpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps: for CI")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time; cpu: the process's CPU time (all its threads), which a busy "
                         "machine disturbs less (use with --threads 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both sides (BLAS, numba, torch); default: as the libraries start")
    args = ap.parse_args(argv)
    tt.backend.keep_freed_memory()  # as in training: temporaries do not page-fault back in every rep
    tt.kernels.warm_up()  # loaded before the first rep, as the programs do
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.preset, args.reps = "tiny", 2
    cfg, batch = model_config(args.preset)
    rng = np.random.default_rng(0)
    try:
        torch_mod()
        have_torch = True
    except ImportError:
        have_torch = False
    if args.threads:
        set_threads(args.threads, have_torch)
    print(f"{args.preset}: forward+backward per op, median of {args.reps} ({args.clock} time, ms)")
    print(f"  {'op':18s} {'tinytensor':>10s} {'pytorch':>10s} {'ratio':>7s}")
    results = {}
    for name, (ours, theirs, shapes) in cases(cfg, batch).items():
        arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        ms = time_op(ours, arrays, lambda a: tt.tensor(a, requires_grad=True), args.reps, clock)
        row = {"tinytensor_ms": ms}
        if have_torch:
            torch = torch_mod()
            tms = time_op(theirs, arrays, lambda a: torch.from_numpy(a.copy()).requires_grad_(), args.reps, clock)
            row.update(pytorch_ms=tms, ratio=ms / tms)
            print(f"  {name:18s} {ms:10.3f} {tms:10.3f} {ms / tms:7.2f}")
        else:
            print(f"  {name:18s} {ms:10.3f}")
        results[name] = row
    return results


if __name__ == "__main__":
    main()
