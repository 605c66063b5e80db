"""The issue-11 ablation: one change at a time on nanoGPT's CPU recipe, several seeds each.

    python -m bench.ablation --input ../shared/data/tinyshakespeare.txt --seeds 0 1 2 --results abl.jsonl
    python -m bench.ablation --table abl.jsonl          # the markdown table from the results so far

Each run is `python -m gpt.train --preset shakespeare_char_cpu` in a subprocess with the variant's
flags, evaluated at the end over --eval-batches batches of each split (the run's own evaluation,
with its own seeded generator). Results are appended one JSON line per run, so an interrupted
ablation keeps what it measured and a rerun skips the (variant, seed) pairs already done.
Runs go seed-major (every variant's first seed before any second seed), so a partial table
already covers every option.

The ms/step column is the run's own training time over its steps (evaluation excluded); on a
shared machine it is only indicative: compare step costs with `python -m bench.train_step`.
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="the text to train on (Tiny Shakespeare)")
    p.add_argument("--preset", default="shakespeare_char_cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--eval-batches", type=int, default=200, help="batches per split in the final evaluation")
    p.add_argument("--results", default="ablation.jsonl", help="JSON lines, appended (and skipped when present)")
    p.add_argument("--table", metavar="RESULTS", help="print the markdown table of a results file and exit")
    p.add_argument("common", nargs=argparse.REMAINDER, help="flags passed to every run (after --)")
    args = p.parse_args(argv)
    if args.table:
        table(args.table)
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
