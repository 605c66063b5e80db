"""Inference: load a model for sampling, the KV cache, the sampling rules and the decoding loop.

Sampling happens on the host in NumPy with its own seeded generator, so the
same seed gives the same text on either backend.

>>> model, tokenizer, meta = load_model("out/ckpt.safetensors")   # doctest: +SKIP
>>> ids = generate(model, np.array([tokenizer.encode("ROMEO:")]), 100, temperature=0.8, seed=1)  # doctest: +SKIP
"""
from __future__ import annotations

import math
import numbers
import threading

import numpy as np

import tinytensor as tt
import tinytensor.functional as F

from .checkpoint import CheckpointError  # noqa: F401  (load_model raises it)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def check_sampling_args(temperature, top_k, top_p, max_new_tokens=0):
    """Raise ValueError naming the first bad argument (NaN and infinities included: a NaN
    temperature would otherwise sample garbage silently).

    >>> check_sampling_args(0.8, 200, None, 100)  # fine: returns None
    """
    if not (_is_number(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be an integer >= 1 (None: no limit), got {top_k!r}")
    if top_p is not None and not (_is_number(top_p) and math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (None: no limit), got {top_p!r}")
    if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")


def sample_next(logits: np.ndarray, temperature=1.0, top_k=None, top_p=None, rng=None) -> np.ndarray:
    """Next token ids (B,) from last-position logits (B, V).

    >>> sample_next(np.array([[0.0, 5.0, 1.0]]), temperature=0)
    array([1])
    """
    check_sampling_args(temperature, top_k, top_p)  # else e.g. temperature -1 silently picks the least likely
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        kth = np.partition(logits, V - top_k, axis=-1)[:, V - top_k, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1:
        # nucleus: the smallest set of most likely tokens whose mass reaches top_p
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p
        drop = np.zeros_like(probs, dtype=bool)
        np.put_along_axis(drop, order, mass_before >= top_p, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    rng = rng if rng is not None else np.random.default_rng()
    u = rng.random((probs.shape[0], 1))
    choice = (np.cumsum(probs, axis=-1) < u * probs.sum(axis=-1, keepdims=True)).sum(axis=-1)
    return np.minimum(choice, V - 1)


def generate_tokens(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                    kv_cache=True, seed=None):
    """Yield (B,) next-token arrays. Works for any model with ``forward(idx, cache=,
    last_only=)``, ``new_cache(batch)`` and ``config.block_size``.

    With the KV cache each new token costs one position's forward. The context is
    cropped to the last ``block_size`` tokens exactly as without the cache. With learned
    absolute positions, once it would overflow, positions shift, so the cache is rebuilt
    from the cropped context. With RoPE the cache slides instead (``KVCache.sliding``):
    past the window it drops its oldest token per new one and keeps going.
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    idx = np.asarray(idx, dtype=np.int64)
    if idx.ndim != 2 or idx.shape[1] < 1:
        raise ValueError(f"idx must be (batch, T>=1) token ids, got shape {idx.shape}")
    block = model.config.block_size
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    cache, fused, context = None, None, idx[:, -block:]
    try:
        with tt.no_grad():
            for _ in range(max_new_tokens):
                if not kv_cache:
                    logits, _ = model(context, last_only=True)
                elif cache is None or cache.needs_rebuild:
                    cache = model.new_cache(context.shape[0])  # (re)build from the cropped context
                    logits, _ = model(context, cache=cache, last_only=True)
                    fused = FusedDecoder.for_model(model, cache)  # None: each token through model()
                elif fused is not None:
                    logits = fused.step(int(context[0, -1]))
                else:
                    logits, _ = model(context[:, -1:], cache=cache, last_only=True)
                nxt = sample_next(tt.backend.to_numpy(logits.data[:, -1, :]), temperature, top_k, top_p, rng)
                context = np.concatenate([context, nxt[:, None]], axis=1)[:, -block:]
                yield nxt
    finally:
        model.train(was_training)


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated buffer per layer.

    Only for inference (under ``tt.no_grad()``). With learned absolute positions
    the cache is valid only while the whole context fits in ``block_size``: once
    it would overflow, the caller crops the context and rebuilds the cache. With
    RoPE (``sliding``) the keys were rotated at their own absolute positions and
    attention scores depend only on distances, so past the window the cache shifts
    out its oldest entries and keeps the last block_size - 1 tokens for the new one.
    (Past the window in a model of more than one layer, the kept keys of later layers
    were computed when older tokens were still in view, as in sliding-window
    attention: recomputing the cropped context gives slightly different numbers.)
    """

    def __init__(self, config, batch: int, xp, dtype):  # config: a GPTConfig
        hs = config.n_embd // config.n_head
        shape = (batch, config.n_head, config.block_size, hs)
        self.keys = [xp.empty(shape, dtype) for _ in range(config.n_layer)]
        self.values = [xp.empty(shape, dtype) for _ in range(config.n_layer)]
        self.length = 0  # tokens stored (the same in every layer)
        self.position = 0  # tokens seen: the absolute position of the next one
        self.capacity = config.block_size
        self.sliding = getattr(config, "pos", "learned") == "rope"

    @property
    def needs_rebuild(self) -> bool:
        """A cache of absolute positions that is full: the caller rebuilds it from the cropped context."""
        return not self.sliding and self.length >= self.capacity

    def make_room(self, T: int):
        """Before T new tokens: a sliding cache drops its oldest entries so that they fit.
        A shift rather than a ring buffer keeps the stored keys in order for cached_attention's
        causal mask; it copies (a copy, as CuPy does not promise overlapping copies) what
        attention reads anyway, so it costs about as much as one token's attention."""
        drop = self.length + T - self.capacity
        if not self.sliding or drop <= 0:
            return
        keep = self.length - drop
        for buffers in (self.keys, self.values):
            for buf in buffers:
                buf[:, :, :keep] = buf[:, :, drop:self.length].copy()
        self.length = keep

    def advance(self, T: int):
        self.length += T
        self.position += T

    def attend(self, layer: int, qkv, n_head: int):
        """Causal attention of new tokens' packed q, k, v (B, T, 3C) over every cached
        token and themselves; stores their keys and values. Returns (B, T, C).

        On arrays, not autograd ops (F.cached_attention): inference records no graph, and one
        token's step is dominated by per-op overhead, so the fewer ops the better.
        """
        return F.cached_attention(qkv, self.keys[layer], self.values[layer], self.length, n_head)


class FusedDecoder:
    """A GPT's cached decoding step at batch 1 on arrays: one kernel call per block
    (``tinytensor.kernels.decode``) instead of a few dozen autograd ops, into buffers kept
    from token to token. The same math as ``model(token, cache=cache)`` (tests/test_decode.py
    holds the logits to the model's forward); the cache is the model's own ``KVCache``.

    ``for_model`` returns None where the kernels do not apply, and the caller then runs
    the model's forward: batch above 1, anything but float32 NumPy weights, kernels off or
    missing, or a model whose modules are not exactly gpt.model's (int8 layers from
    gpt.quantize, unmerged LoRA, a subclass): those keep their own code path.

    ``parallel_products``: split each matrix-vector product over the cores (one parallel
    region per product, 24 a token for 6 blocks) instead of running the whole token on the
    calling thread. Off: on the shared 2-core machine it cost CPU time and wall time
    (bench/RESULTS.md); ``python -m bench.sample`` measures both side by side.
    """

    parallel_products = False
    # Above this many bytes of weights a token is bound by memory bandwidth, not by per-op overhead,
    # and the model's forward (OpenBLAS's products on every core) is faster than the fused token on
    # one thread. Measured idle, 2-core Xeon: the 6x384 model (43 MB) 342-431 tok/s fused vs 346
    # unfused; GPT-2 124M (498 MB) 19.1 tok/s fused vs 30.2 unfused (bench/RESULTS.md).
    max_weight_bytes = 128 * 2**20

    @classmethod
    def for_model(cls, model, cache):
        from tinytensor import kernels, nn

        from .model import GPT, MLP, Block, CausalSelfAttention, Norm

        kern = kernels.decode_module()
        if (kern is None or not isinstance(cache, KVCache) or cache.keys[0].shape[0] != 1 or type(model) is not GPT
                or "head" in vars(model) or type(model.transformer.wte) is not nn.Embedding):
            return None
        tr = model.transformer
        modules = [tr.ln_f] + [m for b in tr.h for m in (b, b.ln_1, b.attn, b.ln_2, b.mlp, b.attn.c_attn,
                                                         b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        if any(type(m) not in (Block, Norm, CausalSelfAttention, MLP, nn.Linear) for m in modules):
            return None
        arrays = [p.data for p in model.parameters()] + cache.keys + cache.values
        if not cls.parallel_products and sum(p.data.nbytes for p in model.parameters()) > cls.max_weight_bytes:
            return None
        if kernels.for_arrays(*arrays) is None:
            return None
        return cls(model, cache, kern)

    def __init__(self, model, cache, kern):
        cfg, tr = model.config, model.transformer
        self.none = none = np.empty(0, np.float32)  # an absent gain or bias (or no RoPE)

        def data(p):
            return none if p is None else p.data

        self.kern, self.cache, self.n_head = kern, cache, cfg.n_head
        # the parallel copy from the main thread only: Numba's workqueue layer aborts when two threads
        # launch parallel kernels at once (gpt.serve decodes on a worker thread)
        parallel = self.parallel_products and threading.current_thread() is threading.main_thread()
        self.block_step = kern.block_step_parallel if parallel else kern.block_step
        self.eps, self.rms = np.float32(cfg.norm_eps), cfg.norm == "rmsnorm"
        self.mlp_kind, self.qk_norm = kern.MLP_KINDS[cfg.mlp], cfg.qk_norm
        self.wte = tr.wte.weight.data
        self.wpe = tr.wpe.weight.data if cfg.pos == "learned" else None
        hs = cfg.n_embd // cfg.n_head
        self.inv_freq = None if cfg.pos == "learned" else 10000.0 ** (-np.arange(0, hs, 2, dtype=np.float64) / hs)
        self.blocks = [(data(b.ln_1.weight), data(b.ln_1.bias), b.attn.c_attn.weight.data, data(b.attn.c_attn.bias),
                        b.attn.c_proj.weight.data, data(b.attn.c_proj.bias), data(b.ln_2.weight), data(b.ln_2.bias),
                        b.mlp.c_fc.weight.data, data(b.mlp.c_fc.bias), b.mlp.c_proj.weight.data,
                        data(b.mlp.c_proj.bias), cache.keys[i][0], cache.values[i][0])
                       for i, b in enumerate(tr.h)]
        self.final = (data(tr.ln_f.weight), data(tr.ln_f.bias), self.eps, self.rms,
                      (tr.wte.weight if cfg.tie_head else model.lm_head.weight).data)
        C, f = cfg.n_embd, np.float32
        self.x = np.empty(C, f)  # the residual stream
        self.scratch = (np.empty(C, f), np.empty(3 * C, f), np.empty(C, f), np.empty(cfg.block_size, f),
                        np.empty(tr.h[0].mlp.c_fc.weight.shape[0], f))
        self.logits = np.empty((1, 1, self.wte.shape[0] if cfg.tie_head else model.lm_head.weight.shape[0]), f)

    def step(self, token: int):
        """Logits (1, 1, V) after feeding ``token`` at the cache's next position (a Tensor, as
        the model's forward returns; its array is reused by the next step)."""
        cache, kern, x = self.cache, self.kern, self.x
        if not 0 <= token < self.wte.shape[0]:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.wte.shape[0]})")
        cache.make_room(1)  # a sliding (RoPE) cache drops its oldest token past the window
        if cache.length >= cache.capacity:
            raise ValueError(f"the KV cache is full ({cache.capacity} tokens): rebuild it from the cropped context")
        x[:] = self.wte[token]
        if self.wpe is not None:
            x += self.wpe[cache.position]
            cos = sin = self.none
        else:
            angles = cache.position * self.inv_freq  # float64 from the absolute position, as rope_tables
            cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        for args in self.blocks:
            self.block_step(x, *args, cache.length, self.n_head, self.eps, self.rms, self.mlp_kind, self.qk_norm,
                            cos, sin, *self.scratch)
        cache.advance(1)
        kern.head_step(x, *self.final, self.scratch[0], self.logits[0, 0])
        return tt.Tensor(self.logits)


def load_model(path, backend: str = "numpy", adapter=None, quantize: str = "none"):
    """(model, tokenizer, metadata) from a checkpoint written by ``gpt.train`` or a Hugging Face
    GPT-2 folder or file (gpt.pretrained), for inference. ``path`` may also be a
    ``gpt.checkpoint.InMemoryCheckpoint`` (an upload's bytes).

    >>> model, tokenizer, meta = load_model("out/ckpt.safetensors")  # doctest: +SKIP

    ``adapter``: a LoRA adapter file to apply to this (base) checkpoint; adapters, from the
    file or a LoRA run's checkpoint, are merged into plain Linear layers for decoding.

    The header and metadata are validated first (nothing is allocated for a bad
    file); then only the model's weights are read (never the optimizer's moments),
    and they must all be finite.

    ``quantize="int8"``: int8 weights (gpt.quantize), quantized while they are read.
    """
    from .pretrained import open_pretrained

    src = open_pretrained(path)  # (a LoRA run's checkpoint: its adapters come merged into the base)
    if quantize == "int8" and adapter is None:
        from .quantize import load_int8
        return load_int8(src, backend), src.tokenizer, src.meta
    model = src.build("numpy")
    if adapter is not None:
        from .lora import fold_lora, load_adapter
        load_adapter(model, adapter)
        fold_lora(model)  # plain Linears again: decoding costs what the base's does
    return model.to(backend), src.tokenizer, src.meta
