"""Export a checkpoint for other libraries: ``python -m gpt.export --format hf OUT_DIR``.

``--format hf`` writes a Hugging Face GPT-2 folder (config.json, model.safetensors and, for a
GPT-2 tokenizer, vocab.json + merges.txt) that ``transformers.GPT2LMHeadModel.from_pretrained``
opens, giving the same logits. Only a GPT with the default architecture options can be
written (GPT-2 has no RoPE, RMSNorm, other MLPs or QK-norm). Exit codes: 0 done, 1 error,
2 bad usage, 130 interrupted.

>>> main(["--format", "hf", "--checkpoint", "out/ckpt.safetensors", "gpt2-export"])  # doctest: +SKIP
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a Ctrl-C while NumPy loads exits cleanly
    from gpt.signals import exit_quietly_on_signals
    exit_quietly_on_signals()

import argparse
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .signals import EXIT_INTERRUPTED

FORMATS = ("hf",)


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m gpt.export", allow_abbrev=False,
        description="Write a checkpoint of gpt.train in another library's format. hf: a Hugging Face GPT-2 "
                    "folder for transformers.GPT2LMHeadModel.from_pretrained (GPT architecture with the default "
                    "options only).",
        epilog="exit codes: 0 done, 1 error, 2 bad usage, 130 interrupted")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created; its files of these names are "
                                                      "replaced only with --overwrite)")
    p.add_argument("--format", required=True, choices=FORMATS, help="hf: Hugging Face GPT-2 (required)")
    p.add_argument("--checkpoint", default="out/ckpt.safetensors", metavar="PATH",
                   help="checkpoint written by gpt.train (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in OUT_DIR")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)  # a bad option exits with code 2 and argparse's message
    from .hf_gpt2 import WEIGHTS_FILE, ExportError, export_hf

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        print(f"error: OUT_DIR {out} is a file; pass a folder", file=sys.stderr)
        return 2
    if (out / WEIGHTS_FILE).exists() and not args.overwrite:
        print(f"error: {out} already holds a {WEIGHTS_FILE}; pass --overwrite to replace it, or choose another "
              "OUT_DIR", file=sys.stderr)
        return 2
    try:
        written = export_hf(args.checkpoint, out)
    except (ExportError, CheckpointError, OSError, ValueError, MemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {', '.join(p.name for p in written)} to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
