"""Greedy decoding speed: KV cache vs full-context recompute, ours and PyTorch's.

    python -m bench.sample                 # shakespeare_char shape, 255 tokens after a 1-token prompt
    python -m bench.sample --quick         # CI: tiny model, a few tokens

Within the 256-token window. Four decoders on the same weights: ours with the KV cache
(``GPT.generate``) and without it, and the PyTorch reference (bench/torch_gpt.py, eager)
with its KV cache (what a PyTorch user decodes with, as transformers' ``generate``) and
without it (nanoGPT's ``generate``); with the kernels, a fifth: ours with the KV cache and
each matrix-vector product split over the cores (``FusedDecoder.parallel_products``).
Greedy outputs should match (up to float32 ties).
Cold: each decoder's first call in this process, after the start-up warm-up that
``gpt.sample`` also does before its first token (``tinytensor.kernels.warm_up``: it loads
the compiled kernels; its seconds are printed and not counted in any rate); warm: the
median of the repeats, run in turns.

``--pos rope`` decodes a RoPE model, whose KV cache slides past the window: then
``--new-tokens`` may exceed the window (e.g. 1000 with the 256-token one).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

import tinytensor as tt
from bench.common import describe_machine, finish, import_torch, machine, model_config, parser, take_turns
from gpt.generate import FusedDecoder
from gpt.model import GPT


def tokens_per_s(fns, n_tokens, repeats, pause=0.5):
    """(each fn's first-call tokens/s, its median tokens/s over `repeats` further calls run in
    turns (``take_turns``; the machine is noisy), its output)."""
    cold, rates, outs = [], [[] for _ in fns], [None] * len(fns)
    for fn in fns:
        time.sleep(pause)
        t = time.perf_counter()
        fn()
        cold.append(n_tokens / (time.perf_counter() - t))
    for _, i in take_turns(range(len(fns)), repeats, pause):
        t = time.perf_counter()
        outs[i] = fns[i]()
        rates[i].append(n_tokens / (time.perf_counter() - t))
    return cold, [float(np.median(r)) for r in rates], outs


def main(argv=None):
    ap = parser("python -m bench.sample", __doc__, "shakespeare_char", "tiny model, 20 tokens: for CI")
    ap.add_argument("--new-tokens", type=int, default=255)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each decoder, in turns; medians reported")
    ap.add_argument("--pos", choices=("learned", "rope"), default="learned",
                    help="positions of the model: rope slides its KV cache past the window")
    args = ap.parse_args(argv)
    tt.backend.keep_freed_memory()
    warm_up_s = tt.kernels.warm_up()  # as gpt.sample does at start-up
    if args.quick:
        args.preset, args.new_tokens, args.repeats = "tiny", 20, 1
    cfg, _ = model_config(args.preset)
    cfg = dataclasses.replace(cfg, pos=args.pos)
    if args.new_tokens + 1 > cfg.block_size and args.pos != "rope":
        ap.error(f"--new-tokens {args.new_tokens} does not fit in the {cfg.block_size}-token window "
                 f"(with --pos rope the KV cache slides past it)")
    tt.manual_seed(0)
    model = GPT(cfg).to(args.backend)
    prompt = np.zeros((1, 1), dtype=np.int64)
    n = args.new_tokens
    torch = import_torch(args.no_torch)
    if torch is not None and n + 1 > cfg.block_size:  # the PyTorch peer's KV cache stops at the window
        print(f"note: {n} tokens pass the {cfg.block_size}-token window; the PyTorch peers decode within it "
              "only, so they are left out")
        torch = None
    result = {"preset": args.preset, "pos": args.pos, "backend": args.backend, "new_tokens": n,
              "machine": machine(torch), "kernel_warm_up_s": round(warm_up_s, 3)}
    names = ["tinytensor KV cache", "tinytensor recompute"]
    decoders = [lambda: model.generate(prompt, n, temperature=0, kv_cache=True),
                lambda: model.generate(prompt, n, temperature=0, kv_cache=False)]
    if tt.kernels.decode_module() is not None:
        names.append("tinytensor KV, 2-thread")

        def parallel_products():
            FusedDecoder.parallel_products = True
            try:
                return model.generate(prompt, n, temperature=0, kv_cache=True)
            finally:
                FusedDecoder.parallel_products = False
        decoders.append(parallel_products)
    if torch is not None:
        from bench.torch_gpt import TorchGPT, load_from_tinytensor
        torch_model = TorchGPT(cfg).eval()
        load_from_tinytensor(torch_model, model.state_dict())
        names += ["pytorch KV cache", "pytorch recompute"]
        decoders += [lambda: torch_model.generate(torch.from_numpy(prompt), n, kv_cache=True).numpy(),
                     lambda: torch_model.generate(torch.from_numpy(prompt), n).numpy()]
    cold, warm, outs = tokens_per_s(decoders, n, args.repeats)
    keys = ["kv_cache", "recompute"] + ["kv_cache_parallel"] * (len(names) % 2) + ["torch_kv_cache", "torch_recompute"]
    for key, c, w in zip(keys, cold, warm):
        result[f"{key}_tok_s"], result[f"{key}_cold_tok_s"] = round(w, 1), round(c, 1)
    result.update(identical=bool((outs[0] == outs[1]).all()), speedup=round(warm[0] / warm[1], 2),
                  speedup_cold=round(cold[0] / cold[1], 2))
    print(f"{args.preset} ({cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}, {args.pos} positions), greedy, {n} tokens after a 1-token prompt; "
          f"warm: median of {args.repeats}, cold: first call\n  {describe_machine(result['machine'])} "
          f"(kernel warm-up at start {warm_up_s:.2f} s, as gpt.sample's, not counted)")
    print(f"  {'decoder':22s} {'warm tok/s':>11s} {'cold tok/s':>11s}")
    for name, c, w in zip(names, cold, warm):
        print(f"  {name:22s} {w:11.1f} {c:11.1f}")
    print(f"  KV cache vs own recompute: {result['speedup']:.1f}x warm, {result['speedup_cold']:.1f}x cold; "
          f"identical output: {result['identical']}")
    if len(names) % 2:
        result["identical_parallel"] = bool((outs[2] == outs[0]).all())
    if torch is not None:
        tk, tr = len(names) - 2, len(names) - 1  # pytorch KV cache, pytorch recompute
        result.update(vs_torch_kv=round(warm[0] / warm[tk], 2), vs_torch_kv_cold=round(cold[0] / cold[tk], 2),
                      vs_torch_recompute=round(warm[0] / warm[tr], 2),
                      same_as_torch=bool((outs[tk] == outs[0]).all() and (outs[tr] == outs[0]).all()))
        print(f"  ours (KV cache) vs pytorch KV cache: {result['vs_torch_kv']:.2f}x warm, "
              f"{result['vs_torch_kv_cold']:.2f}x cold; vs pytorch recompute {result['vs_torch_recompute']:.1f}x; "
              f"same tokens as pytorch: {result['same_as_torch']}")
    return finish(result, args.json)


if __name__ == "__main__":
    main()
