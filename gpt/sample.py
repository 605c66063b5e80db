"""Sample text from a trained checkpoint: ``python -m gpt.sample [--prompt TEXT] ...``.

Only the generated text goes to stdout, streamed as it is made (pipe it
anywhere, ``| head`` included); notes and errors go to stderr. Exit codes: 0 done
(or the reader of stdout stopped reading), 1 error, 2 bad option, 130 Ctrl-C/SIGTERM.

>>> main(["--checkpoint", "out/ckpt.safetensors", "--prompt", "ROMEO:", "--seed", "1"])  # doctest: +SKIP
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a Ctrl-C while NumPy loads exits cleanly
    from gpt.signals import exit_quietly_on_signals
    exit_quietly_on_signals()

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

import tinytensor as tt
from tinytensor.backend import BACKENDS

from .checkpoint import CheckpointError
from .generate import check_sampling_args, load_model
from .config import number_arg
from .files import read_regular_file
from .quantize import QUANTIZATIONS, float32_bytes, numba_available, quantize_int8, weight_bytes
from .sft import END, TEMPLATES, render_prompt
from .signals import EXIT_INTERRUPTED, StopRequest
from .tokenizer import TokenizerError

MAX_NEW_TOKENS = 1_000_000
MAX_NUM_SAMPLES = 1000
MAX_PROMPT_BYTES = 16 << 20
SEPARATOR = "---------------\n"


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m gpt.sample", allow_abbrev=False,
        description="Sample text from a checkpoint written by gpt.train or a Hugging Face GPT-2. The text goes to "
                    "stdout as it is made; notes and errors go to stderr.",
        epilog="exit codes: 0 done (also when the reader of stdout stops early), 1 error, 2 bad option, "
               "130 interrupted (Ctrl-C or SIGTERM)")
    p.add_argument("--checkpoint", default="out/ckpt.safetensors", metavar="PATH",
                   help="checkpoint written by gpt.train, or a Hugging Face GPT-2 folder (config.json, "
                        "model.safetensors, vocab.json + merges.txt) or its model.safetensors (default: %(default)s)")
    p.add_argument("--backend", default="numpy", choices=BACKENDS,
                   help="array library: %(choices)s (default: %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="\n", metavar="TEXT", help="text to continue (default: a newline)")
    src.add_argument("--prompt-file", "--prompt_file", dest="prompt_file", metavar="PATH",
                     help="read the prompt from a UTF-8 text file (default: use --prompt)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", metavar="N",
                   type=number_arg(int, 0, MAX_NEW_TOKENS), default=500,
                   help=f"tokens to generate per sample, 0..{MAX_NEW_TOKENS:,} (default: %(default)s)")
    p.add_argument("--temperature", type=number_arg(float), default=0.8, metavar="X",
                   help="divide the logits by X; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-k", "--top_k", dest="top_k", type=number_arg(int, 1, 2**31 - 1), default=200, metavar="K",
                   help="sample among the K most likely tokens only, K >= 1 (default: %(default)s)")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=number_arg(float), default=None, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P, 0 < P <= 1 "
                        "(default: off)")
    p.add_argument("--seed", type=number_arg(int, 0, 2**32 - 1), default=1337, metavar="N",
                   help="random seed in [0, 2**32); sample i uses seed + i (default: %(default)s)")
    p.add_argument("--num-samples", "--num_samples", dest="num_samples", type=number_arg(int, 1, MAX_NUM_SAMPLES),
                   default=1, metavar="N", help=f"samples to draw, 1..{MAX_NUM_SAMPLES} (default: %(default)s)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                   help="int8: int8 weights with one scale per row for the blocks' matrices and the embedding/head "
                        "(a quarter of the memory; faster decoding with the numba extra) (default: %(default)s)")
    p.add_argument("--adapter", metavar="PATH", default=None,
                   help="a LoRA adapter file (adapter.safetensors of a gpt.train --lora-rank run) to apply to the "
                        "checkpoint, which must be the base it was trained on (default: none)")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="wrap the prompt as SFT training did (qa: 'Q: <prompt>\\nA:') and stop at the answer's end "
                        "(default: plain continuation)")
    p.add_argument("--no-kv-cache", "--no_kv_cache", dest="kv_cache", action="store_false",
                   help="recompute the whole context for every token (slower; for comparison)")
    return p


def _note(msg: str) -> None:
    """One line on stderr; a closed or broken stderr must not turn a result into a traceback."""
    try:
        if sys.stderr is not None:
            print(msg, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def read_prompt_file(name: str) -> str:
    """The text of a prompt file; ValueError with the reason for anything but a UTF-8 text file."""
    path = Path(name)
    # longer prompts are cut to block_size tokens anyway: a bigger file is a mistake
    data = read_regular_file(path, MAX_PROMPT_BYTES, "--prompt-file", "a text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                         f"{exc.start}); save it as UTF-8") from None


def _finish_output(out) -> None:
    """Flush ``out``; if that fails (a reader that went away), point its file descriptor at
    /dev/null so the interpreter's own flush at exit cannot print 'Exception ignored'."""
    try:
        out.flush()
        return
    except (OSError, ValueError):
        pass
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (e.g. a StringIO in tests): nothing will flush it at exit


def generate(args, out) -> None:
    """Load the checkpoint and write ``args.num_samples`` samples to ``out``."""
    prompt = read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt
    if args.template:
        prompt = render_prompt(prompt.strip("\n"))
    model, tokenizer, meta = load_model(args.checkpoint, args.backend, adapter=args.adapter, quantize=args.quantize)
    if args.quantize == "int8":
        before = float32_bytes(model)
        quantize_int8(model)  # (already int8 unless an adapter was merged in float first)
        _note(f"int8 weights: {before / 2**20:.1f} MiB -> {weight_bytes(model) / 2**20:.1f} MiB"
              + ("" if numba_available() or args.backend != "numpy" else
                 " (pip install numba for the fast int8 kernel; dequantizing by blocks instead)"))
    # this process decodes: keep NumPy's temporaries mapped (see backend); only now, so that the float
    # weights an int8 model no longer needs went back to the system
    tt.backend.keep_freed_memory()
    if args.backend == "numpy":
        tt.kernels.warm_up()  # the CPU kernels load now, not inside the first token
    ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        raise ValueError("the prompt is empty; give at least one character with --prompt")
    block = model.config.block_size
    if len(ids) > block:
        _note(f"note: the prompt has {len(ids)} tokens; only its last {block} (block_size) are used")
        ids = ids[-block:]
    what = "Hugging Face GPT-2" if meta.get("source") == "huggingface" else f"step {meta.get('step')}"
    _note(f"loaded {args.checkpoint} ({what}, {args.backend})")
    for i in range(args.num_samples):
        decoder = tokenizer.stream_decoder()
        out.write(prompt)
        t0, n, tail = time.perf_counter(), 0, ""
        for token in model.generate_stream(np.array([ids]), args.max_new_tokens, args.temperature,
                                           args.top_k, args.top_p, args.kv_cache, args.seed + i):
            piece = decoder.feed(int(token[0]))
            out.write(piece)
            out.flush()  # stream: a reader sees each token as it is made
            n += 1
            tail = (tail + piece)[-len(END):] if args.template else ""
            if args.template and tail == END:  # the answer is complete
                break
        out.write(decoder.flush() + "\n")
        if i + 1 < args.num_samples:
            out.write(SEPARATOR)
        out.flush()
        dt = time.perf_counter() - t0
        _note(f"[{n} tokens in {dt:.2f} s, {n / max(dt, 1e-9):.1f} tokens/s]")


def main(argv=None, out=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad option exits with code 2 and argparse's message
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    except ValueError as exc:
        parser.error(str(exc))
    out = out if out is not None else sys.stdout
    if out is None:  # Python sets sys.stdout to None when started with file descriptor 1 closed
        _note("error: stdout is closed; run with stdout open, e.g. `python -m gpt.sample > sample.txt`")
        return 1
    try:
        with StopRequest().installed():  # SIGTERM, like Ctrl-C, raises KeyboardInterrupt at once
            generate(args, out)
    except BrokenPipeError:  # the reader of stdout stopped reading (e.g. `| head`): a normal end
        _finish_output(out)
        return 0
    except KeyboardInterrupt:
        _finish_output(out)
        _note("interrupted")
        return EXIT_INTERRUPTED
    except (CheckpointError, TokenizerError, tt.BackendError, OSError, ValueError, MemoryError) as exc:
        _finish_output(out)
        _note(f"error: {exc}" if str(exc) else f"error: {type(exc).__name__}")
        return 1
    _finish_output(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
