"""Where a training step's CPU time goes, primitive by primitive, and a whole run's training CPU
time against PyTorch on nanoGPT's recipe: single-threaded CPU time, which a busy shared machine
disturbs far less than wall time.

    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python -m bench.step_profile --preset shakespeare_char_cpu_modern
    OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 python -m bench.step_profile --preset shakespeare_char_cpu_modern \\
        --versus shakespeare_char_cpu

The step is the trainer's own (``gpt.trainer.train_step``, the preset's optimizer as ``gpt.train``
builds it: Muon + AdamW for the modern presets). The table times every primitive's forward and
backward (``Function.forward``/``backward`` wrapped) and the optimizer step; what is left is the
engine's own work (graph, gradient sums, clipping). With ``--versus`` (torch needed), PyTorch runs
that preset's step on one thread too (AdamW, bench/torch_gpt.py), in turns with ours, and the two
presets' training CPU time over their ``max_iters`` is compared (evaluation not included).
Set the thread variables above before the run: the libraries read them when they load.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import numpy as np

import tinytensor as tt
from gpt import config as C
from gpt.model import GPT
from gpt.optimizers import build_optimizer
from gpt.trainer import train_step
from tinytensor.tensor import PRIMITIVES

clock = time.process_time


def batches(cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.integers(0, 65, (cfg.batch_size, cfg.block_size + 1))
        out.append((idx[:, :-1], idx[:, 1:]))
    return out


class Ours:
    def __init__(self, preset):
        self.cfg, _ = C.from_args(["--preset", preset])
        tt.manual_seed(0)
        self.model = GPT(self.cfg.model_config(65))
        self.opt = build_optimizer(self.model, self.cfg)

    def step(self, x, y):
        return train_step(self.model, self.opt, x, y, lr=[1e-3] * len(self.opt.param_groups), grad_clip=1.0)


class Torch:
    def __init__(self, preset):
        import torch

        from bench.torch_gpt import TorchGPT
        torch.set_num_threads(1)
        self.torch = torch
        self.cfg, _ = C.from_args(["--preset", preset])
        torch.manual_seed(0)
        self.model = TorchGPT(self.cfg.model_config(65))
        self.opt = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))

    def step(self, x, y):
        torch = self.torch
        _, loss = self.model(torch.from_numpy(x), torch.from_numpy(y))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.item()


def profile(side, steps):
    """Per-primitive (forward, backward) CPU ms per step, the optimizer's, and the step's."""
    fw, bw, calls = collections.Counter(), collections.Counter(), collections.Counter()
    saved = {name: (cls.forward, cls.backward) for name, cls in PRIMITIVES.items()}

    def wrap(name, f0, b0):
        def forward(self, *a, **k):
            t = clock()
            r = f0(self, *a, **k)
            fw[name] += clock() - t
            calls[name] += 1
            return r

        def backward(self, g):
            t = clock()
            r = b0(self, g)
            bw[name] += clock() - t
            return r
        return forward, backward

    opt_time, opt_step = [0.0], side.opt.step

    def timed_step():
        t = clock()
        opt_step()
        opt_time[0] += clock() - t
    data = batches(side.cfg, steps + 2)
    for x, y in data[:2]:
        side.step(x, y)
    try:
        for name, cls in PRIMITIVES.items():
            cls.forward, cls.backward = wrap(name, *saved[name])
        side.opt.step = timed_step
        t = clock()
        for x, y in data[2:]:
            side.step(x, y)
        total = clock() - t
    finally:
        for name, cls in PRIMITIVES.items():
            cls.forward, cls.backward = saved[name]
        del side.opt.step
    ms = 1e3 / steps
    rows = sorted(set(fw), key=lambda k: -(fw[k] + bw[k]))
    return total * ms, opt_time[0] * ms, [(k, fw[k] * ms, bw[k] * ms, calls[k] // steps) for k in rows]


def step_times(sides, steps, rounds):
    data = {name: batches(s.cfg, steps) for name, s in sides.items()}
    for name, s in sides.items():
        for x, y in data[name][:2]:
            s.step(x, y)
    times = {name: [] for name in sides}
    for _ in range(rounds):  # in turns, so a change in the machine's load hits every side alike
        for name, s in sides.items():
            t = clock()
            for x, y in data[name]:
                s.step(x, y)
            times[name].append((clock() - t) / steps * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}, times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="shakespeare_char_cpu_modern")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="--versus: rounds of --steps steps per side, in turns")
    ap.add_argument("--versus", metavar="PRESET", help="PyTorch's preset for the whole-run comparison")
    args = ap.parse_args(argv)
    tt.backend.keep_freed_memory()
    tt.kernels.warm_up()
    print(f"{args.preset}: {tt.kernels.describe()}")
    total, opt, rows = profile(Ours(args.preset), args.steps)
    print(f"  step {total:.1f} ms CPU: primitives forward {sum(r[1] for r in rows):.1f} + backward "
          f"{sum(r[2] for r in rows):.1f}, optimizer {opt:.1f}, the rest (graph, gradient sums, clip) "
          f"{total - opt - sum(r[1] + r[2] for r in rows):.1f}")
    print(f"  {'primitive':24s} {'fwd ms':>7s} {'bwd ms':>7s} {'calls':>6s}")
    for name, f, b, n in rows:
        print(f"  {name:24s} {f:7.2f} {b:7.2f} {n:6d}")
    if args.versus:
        sides = {"ours " + args.preset: Ours(args.preset), "pytorch " + args.versus: Torch(args.versus)}
        med, times = step_times(sides, args.steps, args.rounds)
        for name, v in med.items():
            print(f"  {name:40s} {v:7.1f} ms CPU/step (rounds: {', '.join(f'{t:.1f}' for t in times[name])})")
        (ours_name, o), (torch_name, t) = med.items()
        n_ours, n_torch = sides[ours_name].cfg.max_iters, sides[torch_name].cfg.max_iters
        print(f"  training CPU over a whole run: ours {n_ours} x {o:.1f} = {n_ours * o / 1e3:.1f} s, PyTorch "
              f"{n_torch} x {t:.1f} = {n_torch * t / 1e3:.1f} s: {n_ours * o / (n_torch * t):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
