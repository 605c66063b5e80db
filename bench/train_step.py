"""Time one training step (forward, backward, clip, AdamW) of the GPT, against PyTorch.

    python -m bench.train_step --backend numpy --preset shakespeare_char_cpu
    python -m bench.train_step --preset shakespeare_char --steps 5      # full size
    python -m bench.train_step --quick                                 # CI: proves it runs

The step is written with the public API only, as a user would. With torch
installed, a PyTorch eager model of the same shape (bench/torch_gpt.py) is
timed in the same process, the two taking turns in blocks of 10 steps with
pauses (``bench.common.take_turns``), with the same threads and batches; the
ratio of medians is what to quote (this machine is shared and noisy, absolute
numbers drift). Peak memory of each side is measured in a fresh subprocess
(the growth of peak RSS over the steps).
"""
from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import tinytensor as tt
from bench.common import describe_machine, finish, import_torch, machine, model_config, parser, take_turns
from gpt.model import GPT, GPTConfig
from gpt.trainer import train_step


def matmul_gflops(xp=np, n=1024, reps=10):
    """The machine's float32 matrix-product rate, measured here (the MFU denominator)."""
    a = xp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    a @ a
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        c = a @ a
        if hasattr(c, "get"):
            c.sum().get()  # wait for the GPU
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def step_flops(cfg: GPTConfig, batch: int) -> float:
    """Training FLOPs per step: 6 per parameter per token, plus attention (PaLM's estimate)."""
    n_params = (cfg.vocab_size * cfg.n_embd  # tied embedding / head
                + cfg.n_layer * (12 * cfg.n_embd ** 2 + 13 * cfg.n_embd))
    tokens = batch * cfg.block_size
    return 6 * n_params * tokens + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size * tokens


class Ours:
    name = "tinytensor"

    def __init__(self, cfg, batch, backend, seed=0):
        tt.manual_seed(seed)
        self.model = GPT(cfg).to(backend)
        self.opt = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))

    def step(self, x, y):
        # the trainer's own step: host batches (checked once on the host), clip, AdamW
        return train_step(self.model, self.opt, x, y, lr=1e-3, grad_clip=1.0)


class Torch:
    name = "pytorch"

    def __init__(self, cfg, batch, backend, seed=0):
        import torch

        from bench.torch_gpt import TorchGPT
        torch.manual_seed(seed)
        self.torch = torch
        self.device = "cuda" if backend == "cupy" else "cpu"
        self.model = TorchGPT(cfg).to(self.device)
        self.opt = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))

    def step(self, x, y):
        torch = self.torch
        x, y = torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device)
        _, loss = self.model(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.item()  # .item() synchronises, as ours does


def batches(cfg, batch, n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        idx = rng.integers(0, cfg.vocab_size, (batch, cfg.block_size + 1))
        yield idx[:, :-1], idx[:, 1:]


def time_steps(sides, cfg, batch, steps, warmup, block=10, pause=0.5):
    """Per-side lists of step times (s). The sides take turns (``take_turns``) in blocks of
    `block` steps on the same batches."""
    data = list(batches(cfg, batch, warmup + steps))
    for side in sides:  # warm-up: allocators, BLAS buffers, optimizer state
        for x, y in data[:warmup]:
            side.step(x, y)
    times = {s.name: [] for s in sides}
    for b, side in take_turns(sides, math.ceil(steps / block), pause):
        start = warmup + b * block
        for x, y in data[start:start + block]:
            t = time.perf_counter()
            side.step(x, y)
            times[side.name].append(time.perf_counter() - t)
    return times


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_step_memory(side, preset, backend, steps):
    """Peak RSS over `steps` training steps above the RSS before the first one, in MB
    (run in a fresh process): activations, temporaries, gradients and optimizer state,
    everything a step adds on top of the model's weights and the data."""
    tt.backend.keep_freed_memory()  # as main() does: this process measures the same allocator
    if side == "Ours":
        tt.kernels.warm_up()  # loaded code (as torch's, loaded at import) is not memory a step adds
    cfg, batch = model_config(preset)
    s = (Ours if side == "Ours" else Torch)(cfg, batch, backend)
    data = list(batches(cfg, batch, steps))
    tt.memory.release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set size
    before = _status_kb("VmRSS")
    for x, y in data:
        s.step(x, y)
    return (_status_kb("VmHWM") - before) / 1024


def peak_memory_mb(side, preset, backend, steps):
    code = (f"import bench.train_step as b; "
            f"print(b.measure_step_memory({side!r}, {preset!r}, {backend!r}, {steps}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode:
        raise RuntimeError(out.stderr)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = parser("python -m bench.train_step", __doc__, "shakespeare_char_cpu", "4 steps, tiny preset: for CI")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = ap.parse_args(argv)
    tt.backend.keep_freed_memory()
    if args.quick:
        args.preset, args.steps, args.warmup = "tiny", 4, 1
    cfg, batch = model_config(args.preset)
    xp = tt.backend.get_xp(args.backend)
    tt.kernels.warm_up()  # as the programs do: the kernels are loaded before the first step
    sides = [Ours(cfg, batch, args.backend)]
    torch = import_torch(args.no_torch)
    if torch is not None:
        sides.append(Torch(cfg, batch, args.backend))
    rate = matmul_gflops(xp)
    times = time_steps(sides, cfg, batch, args.steps, args.warmup)
    flops = step_flops(cfg, batch)
    tokens = batch * cfg.block_size
    result = {"preset": args.preset, "backend": args.backend, "steps": args.steps, "machine": machine(torch),
              "matmul_gflops": round(rate, 1), "step_gflop": round(flops / 1e9, 3)}
    print(f"{args.preset} ({cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, block {cfg.block_size}, batch {batch}), "
          f"backend {args.backend}, {args.steps} steps after {args.warmup} warm-up; "
          f"float32 matmul here: {rate:.0f} GFLOP/s\n  {describe_machine(result['machine'])}")
    for side in sides:
        ms = statistics.median(times[side.name]) * 1000
        mfu = flops / (ms / 1000) / (rate * 1e9)
        result[side.name] = {"median_ms": round(ms, 2), "tok_per_s": round(tokens / ms * 1000),
                             "mfu": round(mfu, 3)}
        print(f"  {side.name:10s} median {ms:8.2f} ms/step  {tokens / ms * 1000:9,.0f} tok/s  MFU {mfu:5.1%}")
    if len(sides) == 2:
        ratio = result["tinytensor"]["median_ms"] / result["pytorch"]["median_ms"]
        result["ratio"] = round(ratio, 3)
        print(f"  ratio tinytensor / pytorch: {ratio:.3f}x (below 1 = faster than PyTorch)")
    if not args.no_memory:
        steps = 2 if args.quick else 5
        for side in sides:
            cls = "Ours" if side.name == "tinytensor" else "Torch"
            mb = peak_memory_mb(cls, args.preset, args.backend, steps)
            result[side.name]["peak_mb"] = round(mb, 1)
            print(f"  {side.name:10s} peak memory of training steps (above weights and data): {mb:8.1f} MB")
        if len(sides) == 2 and result["pytorch"]["peak_mb"] > 0:
            result["memory_ratio"] = round(result["tinytensor"]["peak_mb"] / result["pytorch"]["peak_mb"], 3)
            print(f"  memory ratio tinytensor / pytorch: {result['memory_ratio']:.2f}x")
    return finish(result, args.json)


if __name__ == "__main__":
    main()
