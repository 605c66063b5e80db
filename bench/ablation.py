"""The issue-11 ablation: one change at a time on nanoGPT's CPU recipe, several seeds each.

    python -m bench.ablation --input ../shared/data/tinyshakespeare.txt --seeds 0 1 2 --results abl.jsonl
    python -m bench.ablation --table abl.jsonl          # the markdown table from the results so far
    python -m bench.ablation --step-times 20            # each option's training step, in turns, one process

Each run is `python -m gpt.train --preset shakespeare_char_cpu` in a subprocess with the variant's
flags, evaluated at the end over --eval-batches batches of each split (the run's own evaluation,
with its own seeded generator). Results are appended one JSON line per run, so an interrupted
ablation keeps what it measured and a rerun skips the (variant, seed) pairs already done.
Runs go seed-major (every variant's first seed before any second seed), so a partial table
already covers every option.

The s/run column is each run's wall time; on a shared machine it is only indicative. Step costs
come from ``--step-times``: every variant's trainer step (forward, backward, clip, its optimizer) on
the same random batch of its batch size, timed in one process taking turns (``take_turns``), so the
variants see the same machine state; the median ms/step and the ratio to the baseline's.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> extra flags on top of the preset; "baseline" is nanoGPT's recipe as the preset has it
VARIANTS = {
    "baseline": [],
    "lr3e-3": ["--learning-rate", "3e-3", "--min-lr", "3e-4"],
    "rope": ["--pos", "rope"],
    "rmsnorm": ["--norm", "rmsnorm"],
    "relu2": ["--mlp", "relu2"],
    "swiglu": ["--mlp", "swiglu"],
    "qk_norm+lr2e-3": ["--qk-norm", "true", "--learning-rate", "2e-3", "--min-lr", "2e-4"],
    "untied+zero_init": ["--tie-head", "false", "--zero-init-proj", "true"],
    "muon": ["--optimizer", "muon"],
    "muon+wsd": ["--optimizer", "muon", "--lr-schedule", "wsd"],
    "combo": ["--optimizer", "muon", "--pos", "rope", "--norm", "rmsnorm", "--mlp", "relu2", "--qk-norm", "true",
              "--tie-head", "false", "--zero-init-proj", "true", "--learning-rate", "3e-3", "--min-lr", "3e-4"],
}
# candidates for the new CPU preset: the combination in fewer steps (the wall-time budget is PyTorch's
# time for nanoGPT's 2000 steps), and with a larger batch, where Muon's fixed per-step cost
# (Newton-Schulz on every matrix, ~2.4 GFLOP at 4x128) is spread over more tokens
VARIANTS["combo_1000"] = VARIANTS["combo"] + ["--max-iters", "1000", "--warmup-iters", "50"]
VARIANTS["combo_b24_600"] = VARIANTS["combo"] + ["--batch-size", "24", "--max-iters", "600", "--warmup-iters", "50"]
VARIANTS["combo_b24_800"] = VARIANTS["combo"] + ["--batch-size", "24", "--max-iters", "800", "--warmup-iters", "50"]
VARIANTS["combo_b32_600"] = VARIANTS["combo"] + ["--batch-size", "32", "--max-iters", "600", "--warmup-iters", "50"]
# issue 11b: cheaper recipes than combo_b24_800 (the wall-time target): fewer steps, with a higher Muon or
# AdamW learning rate or a warmup-stable-decay schedule to make up for them
_B24 = VARIANTS["combo"] + ["--batch-size", "24", "--warmup-iters", "50"]
VARIANTS["combo_b24_700"] = _B24 + ["--max-iters", "700"]
VARIANTS["combo_b24_700_lr6e-3"] = _B24 + ["--max-iters", "700", "--learning-rate", "6e-3", "--min-lr", "6e-4"]
VARIANTS["combo_b24_600_mlr04"] = _B24 + ["--max-iters", "600", "--muon-lr", "0.04"]
VARIANTS["combo_b24_600_lr6e-3"] = _B24 + ["--max-iters", "600", "--learning-rate", "6e-3", "--min-lr", "6e-4"]
VARIANTS["combo_b24_600_wsd"] = _B24 + ["--max-iters", "600", "--lr-schedule", "wsd", "--decay-frac", "0.4"]


def run_one(name, flags, seed, args):
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "gpt.train", "--preset", args.preset, "--input", args.input,
               "--seed", str(seed), "--eval-interval", "100000", "--eval-iters", str(args.eval_batches),
               "--sample-tokens", "0", "--progress", "false", "--out-dir", out, *args.common, *flags]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            return {"variant": name, "seed": seed, "error": proc.stderr.strip().splitlines()[-1:]}
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    evals = [r for r in rows if r["kind"] == "eval"]
    trains = [r for r in rows if r["kind"] == "train"]
    steps = evals[-1]["step"]
    return {"variant": name, "seed": seed, "flags": flags, "steps": steps, "val_loss": evals[-1]["val_loss"],
            "train_loss": evals[-1]["train_loss"], "wall_s": round(wall, 1),
            "train_s": trains[-1].get("elapsed_s") if trains else None}


def table(path):
    rows = [json.loads(line) for line in open(path)]
    by = {}
    for r in rows:
        if "val_loss" in r:
            by.setdefault(r["variant"], []).append(r)
    print("| variant | flags | seeds | val loss (mean ± sd) | per seed | s/run (wall) |")
    print("|---|---|---|---|---|---|")
    for name in sorted(by, key=lambda n: statistics.mean(r["val_loss"] for r in by[n])):
        rs = by[name]
        vals = [r["val_loss"] for r in rs]
        sd = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        print(f"| {name} | `{' '.join(rs[0]['flags']) or '(preset)'}` | {len(rs)} | {statistics.mean(vals):.4f} ± "
              f"{sd:.4f} | {' / '.join(f'{v:.4f}' for v in vals)} | {statistics.mean(r['wall_s'] for r in rs):.0f} |")


def step_times(names, preset, steps, rounds=3):
    """{variant: median ms per trainer step}, the variants taking turns in this process."""
    import numpy as np

    import tinytensor as tt
    from bench.common import take_turns
    from gpt import config as C
    from gpt.model import GPT
    from gpt.optimizers import build_optimizer
    from gpt.trainer import train_step
    tt.kernels.warm_up()
    sides = {}
    for name in names:
        cfg, _ = C.from_args(["--preset", preset, *VARIANTS[name]])
        tt.manual_seed(0)
        model = GPT(cfg.model_config(65))  # Tiny Shakespeare's characters
        rng = np.random.default_rng(0)
        x = rng.integers(0, 65, (cfg.batch_size, cfg.block_size))
        sides[name] = (model, build_optimizer(model, cfg), x, np.roll(x, -1, axis=1), cfg)
        train_step(model, sides[name][1], x, sides[name][3], lr=cfg.learning_rate, grad_clip=cfg.grad_clip)
    times = {name: [] for name in names}
    for _, name in take_turns(names, rounds):
        model, opt, x, y, cfg = sides[name]
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, opt, x, y, lr=cfg.learning_rate, grad_clip=cfg.grad_clip)
        times[name].append((time.perf_counter() - start) / steps * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="the text to train on (Tiny Shakespeare)")
    p.add_argument("--preset", default="shakespeare_char_cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--eval-batches", type=int, default=200, help="batches per split in the final evaluation")
    p.add_argument("--results", default="ablation.jsonl", help="JSON lines, appended (and skipped when present)")
    p.add_argument("--table", metavar="RESULTS", help="print the markdown table of a results file and exit")
    p.add_argument("--step-times", type=int, metavar="STEPS",
                   help="instead: time STEPS trainer steps of each variant (3 rounds, in turns) and exit")
    p.add_argument("common", nargs=argparse.REMAINDER, help="flags passed to every run (after --)")
    args = p.parse_args(argv)
    if args.table:
        table(args.table)
        return 0
    if args.step_times:
        from bench.common import describe_machine, machine
        print(describe_machine(machine()))
        ms = step_times(args.variants, args.preset, args.step_times)
        base = ms.get("baseline")
        print("| variant | ms/step | vs baseline |\n|---|---|---|")
        for name, t in ms.items():
            print(f"| {name} | {t:.1f} | {f'{t / base:.2f}x' if base else ''} |")
        return 0
    if not args.input:
        p.error("--input is required to run the ablation")
    args.common = [a for a in args.common if a != "--"]
    done = set()
    if os.path.exists(args.results):
        done = {(r["variant"], r["seed"]) for r in map(json.loads, open(args.results)) if "val_loss" in r}
    for seed in args.seeds:
        for name in args.variants:
            if (name, seed) in done:
                continue
            result = run_one(name, VARIANTS[name], seed, args)
            print(json.dumps(result), flush=True)
            with open(args.results, "a") as f:
                f.write(json.dumps(result) + "\n")
    table(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
