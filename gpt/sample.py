"""Sample text from a trained checkpoint: ``python -m gpt.sample [--prompt TEXT] ...``.

Only the generated text goes to stdout, streamed as it is made (pipe it
anywhere); notes and errors go to stderr.

>>> main(["--checkpoint", "out/ckpt.safetensors", "--prompt", "ROMEO:", "--seed", "1"])  # doctest: +SKIP
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import tinytensor as tt

from .checkpoint import CheckpointError, load_model
from .sampling import check_sampling_args
from .tokenizer import TokenizerError


def build_parser():
    p = argparse.ArgumentParser(prog="python -m gpt.sample", description=__doc__.splitlines()[0],
                                allow_abbrev=False)
    p.add_argument("--checkpoint", default="out/ckpt.safetensors", help="default: %(default)s")
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    src.add_argument("--prompt-file", "--prompt_file", dest="prompt_file", help="read the prompt from a file")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=200)
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--num-samples", "--num_samples", dest="num_samples", type=int, default=1)
    p.add_argument("--no-kv-cache", "--no_kv_cache", dest="kv_cache", action="store_false",
                   help="recompute the whole context for every token (slower; for comparison)")
    return p


def main(argv=None, out=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out or sys.stdout
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be at least 1, got {args.num_samples}")
    except ValueError as exc:
        parser.error(str(exc))
    try:
        prompt = args.prompt
        if args.prompt_file:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        model, tokenizer, meta = load_model(args.checkpoint, args.backend)
        ids = tokenizer.encode(prompt) if prompt else []
        if not ids:
            raise ValueError("the prompt is empty; give at least one character with --prompt")
        block = model.config.block_size
        if len(ids) > block:
            print(f"note: the prompt has {len(ids)} tokens; only its last {block} (block_size) are used",
                  file=sys.stderr)
            ids = ids[-block:]
        print(f"loaded {args.checkpoint} (step {meta.get('step')}, {args.backend})", file=sys.stderr)
        for i in range(args.num_samples):
            decoder = tokenizer.stream_decoder()
            out.write(prompt)
            t0, n = time.perf_counter(), 0
            for token in model.generate_stream(np.array([ids]), args.max_new_tokens, args.temperature,
                                               args.top_k, args.top_p, args.kv_cache, args.seed + i):
                out.write(decoder.feed(int(token[0])))
                out.flush()
                n += 1
            out.write(decoder.flush() + "\n")
            if i + 1 < args.num_samples:
                out.write("---------------\n")
            out.flush()
            dt = time.perf_counter() - t0
            print(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    except (CheckpointError, TokenizerError, tt.BackendError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
