"""Greedy decoding speed: KV cache vs full-context recompute vs PyTorch.

    python -m bench.sample                 # shakespeare_char shape, 255 tokens after a 1-token prompt
    python -m bench.sample --quick         # CI: tiny model, a few tokens

Within the 256-token window. PyTorch runs nanoGPT's `generate` (the whole
cropped context per token), eager, greedy. Both models get the same weights, so
their greedy outputs should match too (up to float32 ties).
"""
from __future__ import annotations

import time

import numpy as np

import tinytensor as tt
from bench.common import finish, import_torch, machine, model_config, parser, take_turns
from gpt.model import GPT


def tokens_per_s(fns, n_tokens, repeats, pause=0.5):
    """Median tokens/s of each fn, run in turns (``take_turns``) `repeats` times (the machine
    is noisy), and each fn's output."""
    rates, outs = [[] for _ in fns], [None] * len(fns)
    for _, i in take_turns(range(len(fns)), repeats, pause):
        t = time.perf_counter()
        outs[i] = fns[i]()
        rates[i].append(n_tokens / (time.perf_counter() - t))
    return [float(np.median(r)) for r in rates], outs


def main(argv=None):
    ap = parser("python -m bench.sample", __doc__, "shakespeare_char", "tiny model, 20 tokens: for CI")
    ap.add_argument("--new-tokens", type=int, default=255)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each decoder, in turns; medians reported")
    args = ap.parse_args(argv)
    tt.backend.keep_freed_memory()
    if args.quick:
        args.preset, args.new_tokens, args.repeats = "tiny", 20, 1
    cfg, _ = model_config(args.preset)
    if args.new_tokens + 1 > cfg.block_size:
        ap.error(f"--new-tokens {args.new_tokens} does not fit in the {cfg.block_size}-token window")
    tt.manual_seed(0)
    model = GPT(cfg).to(args.backend)
    prompt = np.zeros((1, 1), dtype=np.int64)
    n = args.new_tokens
    torch = import_torch(args.no_torch)
    result = {"preset": args.preset, "backend": args.backend, "new_tokens": n, "machine": machine(torch)}
    decoders = [lambda: model.generate(prompt, n, temperature=0, kv_cache=True),
                lambda: model.generate(prompt, n, temperature=0, kv_cache=False)]
    torch_model = None
    if torch is not None:
        from bench.torch_gpt import TorchGPT, load_from_tinytensor
        torch_model = TorchGPT(cfg).eval()
        load_from_tinytensor(torch_model, model.state_dict())
        decoders.append(lambda: torch_model.generate(torch.from_numpy(prompt), n).numpy())
    rates, outs = tokens_per_s(decoders, n, args.repeats)
    cached_tps, full_tps = rates[:2]
    cached, full = outs[:2]
    result.update(kv_cache_tok_s=round(cached_tps, 1), recompute_tok_s=round(full_tps, 1),
                  identical=bool((cached == full).all()), speedup=round(cached_tps / full_tps, 2))
    print(f"{args.preset} ({cfg.n_layer}x{cfg.n_head}x{cfg.n_embd}), greedy, {n} tokens after a 1-token prompt, "
          f"median of {args.repeats}")
    print(f"  tinytensor KV cache : {cached_tps:9.1f} tokens/s")
    print(f"  tinytensor recompute: {full_tps:9.1f} tokens/s   (cache speed-up {cached_tps / full_tps:.1f}x, "
          f"identical output: {result['identical']})")
    if torch_model is not None:
        torch_tps, tout = rates[2], outs[2]
        result.update(torch_tok_s=round(torch_tps, 1), vs_torch=round(cached_tps / torch_tps, 2),
                      same_as_torch=bool((tout == cached).all()))
        print(f"  pytorch recompute   : {torch_tps:9.1f} tokens/s   (KV cache vs pytorch "
              f"{cached_tps / torch_tps:.1f}x, same tokens: {result['same_as_torch']})")
    return finish(result, args.json)


if __name__ == "__main__":
    main()
