"""Per-op forward+backward time against PyTorch, at the GPT's own shapes.

    python -m bench.ops [--preset shakespeare_char_cpu] [--quick]

Shows where a training step's time goes, op by op; each op is timed as
forward + backward with a fixed upstream gradient, alternating with torch.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import tinytensor as tt
import tinytensor.functional as F
from bench.train_step import model_config


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
    }


def torch_mod():
    import torch
    return torch


def tf():
    return torch_mod().nn.functional


def time_op(fn, arrays, make, reps):
    inputs = [make(a) for a in arrays]
    out = fn(*inputs)
    g = np.ones(tuple(out.shape), np.float32)
    times = []
    for _ in range(reps):
        inputs = [make(a) for a in arrays]
        t = time.perf_counter()
        out = fn(*inputs)
        out.backward(make_grad(out, g))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def make_grad(out, g):
    return g if isinstance(out, tt.Tensor) else torch_mod().from_numpy(g)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="shakespeare_char_cpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 2 reps: for CI")
    args = ap.parse_args(argv)
    tt.backend.keep_freed_memory()  # as in training: temporaries do not page-fault back in every rep
    if args.quick:
        args.preset, args.reps = "tiny", 2
    cfg, batch = model_config(args.preset)
    rng = np.random.default_rng(0)
    try:
        torch_mod()
        have_torch = True
    except ImportError:
        have_torch = False
    print(f"{args.preset}: forward+backward per op, median of {args.reps} (ms)")
    print(f"  {'op':16s} {'tinytensor':>10s} {'pytorch':>10s} {'ratio':>7s}")
    results = {}
    for name, (ours, theirs, shapes) in cases(cfg, batch).items():
        arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        ms = time_op(ours, arrays, lambda a: tt.tensor(a, requires_grad=True), args.reps)
        row = {"tinytensor_ms": ms}
        if have_torch:
            torch = torch_mod()
            tms = time_op(theirs, arrays, lambda a: torch.from_numpy(a.copy()).requires_grad_(), args.reps)
            row.update(pytorch_ms=tms, ratio=ms / tms)
            print(f"  {name:16s} {ms:10.3f} {tms:10.3f} {ms / tms:7.2f}")
        else:
            print(f"  {name:16s} {ms:10.3f}")
        results[name] = row
    return results


if __name__ == "__main__":
    main()
