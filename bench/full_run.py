"""A whole training run, tinytensor vs PyTorch: wall time to the final val loss.

    python -m bench.full_run --input ../shared/data/tinyshakespeare.txt     # shakespeare_char_cpu, 2000 steps
    python -m bench.full_run --quick --input FILE                           # a few steps, for CI

Ours is `python -m gpt.train` itself (in-process, progress bar off, samples
on). The PyTorch side trains bench/torch_gpt.py with the same config, the same
batches (gpt.data.get_batch with the same seed), the same learning-rate curve,
AdamW groups, clipping and evaluation schedule. The two runs go one after the
other, so a busy machine skews them: rerun and compare.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time

import numpy as np

import tinytensor as tt
from bench.common import finish, import_torch, machine, parser
from gpt import config as C
from gpt import train
from gpt.data import get_batch, prepare
from tinytensor.optim import warmup_cosine_lr


def run_ours(argv, out_dir):
    t = time.perf_counter()
    code = train.main(argv + ["--out-dir", out_dir, "--progress", "false"])
    wall = time.perf_counter() - t
    if code:
        raise RuntimeError(f"gpt.train exited with {code}")
    evals = [row for row in map(json.loads, open(f"{out_dir}/metrics.jsonl")) if row["kind"] == "eval"]
    return wall, evals[-1]["val_loss"]


def run_torch(cfg: C.TrainConfig, torch_rng=False):
    """The PyTorch side. With ``torch_rng`` it draws batches as nanoGPT does
    (torch.randint on torch's generator, seeded like nanoGPT) instead of sharing ours."""
    import torch

    from bench.torch_gpt import TorchGPT
    t = time.perf_counter()
    data = prepare(cfg.dataset, cfg.input, cfg.tokenizer, cfg.vocab_size, log=None)
    torch.manual_seed(cfg.seed)
    model = TorchGPT(cfg.model_config(data.vocab_size))
    opt = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2))
    rng = np.random.default_rng(cfg.seed)
    decay = cfg.lr_decay_iters or cfg.max_iters

    def batch(split_data, generator):
        if not torch_rng:
            return map(torch.from_numpy, get_batch(split_data, cfg.batch_size, cfg.block_size, generator))
        ix = torch.randint(len(split_data) - cfg.block_size, (cfg.batch_size,))
        x = torch.stack([torch.from_numpy(split_data[i:i + cfg.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(split_data[i + 1:i + 1 + cfg.block_size].astype(np.int64)) for i in ix])
        return x, y
    val = math.nan
    for step in range(cfg.max_iters + 1):
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            model.eval()
            erng = np.random.default_rng([cfg.seed, step, 1])
            with torch.no_grad():
                for split, d in (("train", data.train), ("val", data.val)):
                    losses = [model(*batch(d, erng))[1].item() for _ in range(cfg.eval_iters)]
                    val = float(np.mean(losses))
            model.train()
        if step == cfg.max_iters:
            break
        for g in opt.param_groups:
            g["lr"] = warmup_cosine_lr(step, cfg.learning_rate, cfg.warmup_iters, decay, cfg.min_lr)
        x, y = batch(data.train, rng)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    return time.perf_counter() - t, val


def main(argv=None):
    ap = parser("python -m bench.full_run", __doc__, "shakespeare_char_cpu", "20 steps: for CI", backend=False)
    ap.add_argument("--input", help="the Tiny Shakespeare text (default: download / data/ cache)")
    ap.add_argument("--torch-rng", action="store_true",
                    help="PyTorch draws its own batches with torch.randint, exactly as nanoGPT does")
    ap.add_argument("--seed", type=int, help="override the preset's seed (both sides)")
    ap.add_argument("--ours-preset", help="train this preset on our side instead (e.g. shakespeare_char_cpu_modern "
                                          "against PyTorch on nanoGPT's recipe: issue 11's wall-time target)")
    args = ap.parse_args(argv)
    tt.backend.keep_freed_memory()
    argv = ["--preset", args.preset] + (["--input", args.input] if args.input else [])
    if args.quick:
        argv += ["--max-iters", "20", "--eval-interval", "10", "--eval-iters", "2", "--sample-tokens", "0"]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    cfg, _ = C.from_args(argv)
    ours_argv = argv if not args.ours_preset else ["--preset", args.ours_preset] + argv[2:]
    ours_cfg, _ = C.from_args(ours_argv)
    result = {"preset": args.preset, "max_iters": cfg.max_iters}
    wall = None
    if not args.torch_rng:  # that mode only calibrates PyTorch against nanoGPT's published figure
        with tempfile.TemporaryDirectory() as out:
            wall, val = run_ours(ours_argv, out)
        result["tinytensor"] = {"preset": args.ours_preset or args.preset, "max_iters": ours_cfg.max_iters,
                                "wall_s": round(wall, 1), "val_loss": round(val, 4)}
        print(f"tinytensor: {ours_cfg.max_iters} steps in {wall:.1f} s, final val loss {val:.4f}", file=sys.stderr)
    torch = import_torch(args.no_torch)  # after ours has run
    result["machine"] = machine(torch)
    if torch is not None:
        twall, tval = run_torch(cfg, torch_rng=args.torch_rng)
        result["pytorch"] = {"wall_s": round(twall, 1), "val_loss": round(tval, 4)}
        print(f"pytorch   : {cfg.max_iters} steps in {twall:.1f} s, final val loss {tval:.4f}", file=sys.stderr)
        if wall is not None:
            result["wall_ratio"] = round(wall / twall, 3)
            print(f"wall-time ratio tinytensor / pytorch: {wall / twall:.3f}x", file=sys.stderr)
    print(json.dumps(result))
    return finish(result, args.json)


if __name__ == "__main__":
    main()
