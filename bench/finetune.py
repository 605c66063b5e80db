"""Fine-tuning costs: memory and time of a training step with LoRA, a quantized base and
gradient checkpointing, against full fine-tuning of the same model; and SFT accuracy.

    python -m bench.finetune                               # shakespeare_char (6x384, block 256, batch 64):
                                                           # full, full+ckpt and lora8, memory and time
    python -m bench.finetune --variants full,full+ckpt --rounds 1   # just the checkpointing pair
    python -m bench.finetune --quick                       # tiny preset: proves it runs (CI)
    python -m bench.finetune --accuracy out/ckpt.safetensors --sft-data sft.jsonl [--adapter PATH]

Variants (``VARIANTS``): full fine-tuning, the same with --grad-checkpoint, LoRA rank 8 on the
attention projections (float32, int8 and int4 bases), all from one seeded model, dropout and
bias as the preset. Memory: each variant in a fresh process, one warm-up step (the optimizer's
state exists after it), then the growth of peak RSS over one more step above the RSS before it:
the step's activations and temporaries (``step_peak_mb``); beside it the weights' and the
optimizer state's bytes, counted from the arrays. Time: every variant in one process, taking
turns (``bench.common.take_turns``) on the same batches; the ratios to full fine-tuning's median
are what to quote (this machine is shared; absolute times drift).

On glibc, large temporaries (over 32 MB, which keep_freed_memory cannot keep) are mmapped and
page-faulted afresh in every step, which dominates the full preset's step here and pulls every
ratio towards 1. For step times run both sides under the same allocator settings, e.g.
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1000000000``, and say so.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

import numpy as np

import tinytensor as tt
from bench.common import finish, machine, model_config, parser, take_turns
from bench.train_step import _status_kb, batches
from gpt.lora import LoRASpec, apply_lora
from gpt.model import GPT
from gpt.trainer import train_step

# name -> (LoRA base dtype or None for full fine-tuning, gradient checkpointing)
VARIANTS = {"full": (None, False), "full+ckpt": (None, True), "lora8": ("float32", False),
            "lora8+ckpt": ("float32", True), "qlora8-int8": ("int8", False), "qlora8-int4": ("int4", False)}
RANK = 8


class Variant:
    def __init__(self, name, cfg, seed=0):
        base_dtype, ckpt = VARIANTS[name]
        tt.manual_seed(seed)
        self.name, self.model = name, GPT(cfg)
        if base_dtype is not None:
            apply_lora(self.model, LoRASpec(rank=RANK, alpha=16.0, targets="attn", base_dtype=base_dtype))
        self.model.grad_checkpoint = ckpt
        self.opt = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99))

    def step(self, x, y):
        return train_step(self.model, self.opt, x, y, lr=1e-3, grad_clip=1.0)

    def sizes(self) -> dict:
        params = self.model.parameters()
        trainable = sum(p.size for p in params if p.requires_grad)
        counted = self.model.config.num_parameters()  # the model's own (a quantized base counts as its floats)
        state = sum(v.nbytes for s in self.opt.state.values() for v in s.values() if hasattr(v, "nbytes"))
        return {"trainable": trainable, "parameters": counted,
                "weights_mb": round(sum(p.data.nbytes for p in params) / 2**20, 2),
                "optimizer_state_mb": round(state / 2**20, 3)}


def measure_memory(name, preset):
    """Run in a fresh process: (sizes, the step's peak RSS above the RSS before it, MB)."""
    tt.backend.keep_freed_memory()
    cfg, batch = model_config(preset)
    v = Variant(name, cfg)
    data = list(batches(cfg, batch, 2))
    v.step(*data[0])  # warm-up: the optimizer's state and flat buffers exist after it
    tt.memory.release_freed_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM
    before = _status_kb("VmRSS")
    v.step(*data[1])
    return {**v.sizes(), "step_peak_mb": round((_status_kb("VmHWM") - before) / 1024, 1)}


def memory_in_subprocess(name, preset):
    code = f"import bench.finetune as b; print(repr(b.measure_memory({name!r}, {preset!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode:
        raise RuntimeError(out.stderr)
    return eval(out.stdout.strip().splitlines()[-1])  # our own repr of a dict of numbers


def time_variants(names, cfg, batch, rounds, pause=0.5):
    variants = [Variant(n, cfg) for n in names]
    data = list(batches(cfg, batch, rounds + 1))
    for v in variants:
        v.step(*data[0])  # warm-up
    times = {n: [] for n in names}
    for r, v in take_turns(variants, rounds, pause):
        t = time.perf_counter()
        v.step(*data[1 + r])
        times[v.name].append(time.perf_counter() - t)
    return times


def accuracy(checkpoint, sft_data, adapter=None, limit=200, max_new_tokens=40):
    """Exact-match rate of greedy answers on the SFT file's validation examples (the last 10 %,
    as gpt.train splits them): the text generated after the prompt, up to the END marker."""
    from gpt.generate import load_model
    from gpt.sft import END, SFTData, read_jsonl, render_prompt
    model, tokenizer, _ = load_model(checkpoint, adapter=adapter)
    examples, _ = read_jsonl(sft_data)
    n_val = len(SFTData.load(sft_data, tokenizer, model.config.block_size).val)
    val = examples[len(examples) - n_val:][:limit]
    right = 0
    for ex in val:
        ids = tokenizer.encode(render_prompt(ex["prompt"]))[-model.config.block_size:]
        out = []
        for token in model.generate_stream(np.array([ids]), max_new_tokens, temperature=0):
            out.append(int(token[0]))
            if tokenizer.decode(out).endswith(END):
                break
        right += tokenizer.decode(out).strip() == ex["response"].strip()
    return {"examples": len(val), "exact_match": right / max(1, len(val))}


def main(argv=None):
    ap = parser("python -m bench.finetune", __doc__, "shakespeare_char", "tiny preset, 1 round: for CI",
                backend=False)
    ap.add_argument("--rounds", type=int, default=2, help="timed steps per variant")
    # the targets' three by default: a full-preset step is ~10-20 s here, so all six take long
    ap.add_argument("--variants", default="full,full+ckpt,lora8",
                    help="comma-separated, from: " + ", ".join(VARIANTS))
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--accuracy", metavar="CKPT", help="instead: SFT exact-match accuracy of this checkpoint")
    ap.add_argument("--sft-data", metavar="PATH")
    ap.add_argument("--adapter", metavar="PATH")
    args = ap.parse_args(argv)
    tt.backend.keep_freed_memory()
    if args.accuracy:
        if not args.sft_data:
            ap.error("--accuracy needs --sft-data")
        result = accuracy(args.accuracy, args.sft_data, args.adapter)
        print(f"{args.accuracy}{' + ' + args.adapter if args.adapter else ''}: exact match "
              f"{result['exact_match']:.1%} of {result['examples']} validation examples")
        return finish(result, args.json)
    if args.quick:
        args.preset, args.rounds = "tiny", 1
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    cfg, batch = model_config(args.preset)
    result = {"preset": args.preset, "machine": machine(), "rounds": args.rounds, "variants": {}}
    print(f"{args.preset} ({cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, block {cfg.block_size}, batch {batch}, "
          f"dropout {cfg.dropout}); {result['machine']['cpu']}, {result['machine']['cores']} cores")
    times = time_variants(names, cfg, batch, args.rounds)
    base_ms = statistics.median(times[names[0]]) * 1000
    for name in names:
        ms = statistics.median(times[name]) * 1000
        row = result["variants"][name] = {"median_ms": round(ms, 1), "time_ratio": round(ms / base_ms, 3)}
        if not args.no_memory:
            row.update(memory_in_subprocess(name, args.preset))
    full = result["variants"].get("full", {})
    for name, row in result["variants"].items():
        line = f"  {name:12s} {row['median_ms']:9.1f} ms/step ({row['time_ratio']:.2f}x {names[0]})"
        if "step_peak_mb" in row:
            share = row["trainable"] / row["parameters"]
            line += (f"  step peak {row['step_peak_mb']:8.1f} MB"
                     + (f" ({row['step_peak_mb'] / full['step_peak_mb']:.2f}x full)" if full.get("step_peak_mb") else "")
                     + f"  weights {row['weights_mb']:6.2f} MB  trainable {row['trainable']:,} ({share:.2%})"
                     f"  optimizer state {row['optimizer_state_mb']:.3f} MB")
        print(line)
    return finish(result, args.json)


if __name__ == "__main__":
    main()
