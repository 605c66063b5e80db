"""The GPT language model (GPT-2 architecture, nanoGPT's names), on tinytensor.

Reads top-down: config, the option pieces (norms, rotary positions), attention, MLP, block,
the model, then a bigram baseline. The defaults are GPT-2's; ModelOptions lists the modern
alternatives (RoPE, RMSNorm, ReLU^2/SwiGLU, QK-norm, an untied zero-init head, ...).

>>> import numpy as np
>>> from gpt.model import GPT, GPTConfig
>>> model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))
>>> idx = np.zeros((1, 8), dtype=np.int64)
>>> logits, loss = model(idx)
>>> logits.shape
(1, 8, 65)
"""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields

import numpy as np

import tinytensor as tt
import tinytensor.functional as F
from tinytensor import nn

from .generate import KVCache, generate_tokens


# Hard upper limits, far above any model this engine can train (GPT-2 XL: vocab 50257,
# block 1024, 48 layers, 25 heads, n_embd 1600). A config read from a checkpoint or a
# command line is refused above them before anything is allocated.
SIZE_LIMITS = {"vocab_size": 1 << 20, "block_size": 1 << 20, "n_layer": 1024, "n_head": 1 << 16, "n_embd": 1 << 16}


@dataclass
class ModelOptions:
    """The model's shape and architecture options: the one declaration of each model field.
    GPTConfig adds the vocabulary (which comes from the data); gpt.config.TrainConfig
    inherits these, so each is a `--key` option, kept on --resume, with this help text.
    A new architecture option is one field here (with its help) and the module that uses it.
    """

    block_size: int = field(default=256, metadata={"help": "context length in tokens"})
    n_layer: int = field(default=6, metadata={"help": "transformer blocks"})
    n_head: int = field(default=6, metadata={"help": "attention heads (must divide --n-embd)"})
    n_embd: int = field(default=384, metadata={"help": "embedding width"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability in [0, 1)"})
    bias: bool = field(default=True, metadata={"help": "biases in Linear layers and LayerNorms, as GPT-2"})
    pos: str = field(default="learned", metadata={
        "help": "positions: learned absolute embeddings (GPT-2's wpe) or rope (rotary, on each head's "
                "queries and keys; no wpe, and the KV cache slides past the window)",
        "choices": ("learned", "rope")})
    norm: str = field(default="layernorm", metadata={
        "help": "normalisation before attention, MLP and head: layernorm or rmsnorm (no mean, no bias)",
        "choices": ("layernorm", "rmsnorm")})
    norm_gain: bool = field(default=True, metadata={"help": "a learned gain (weight) in each norm; false: "
                                                            "no learned affine at all (nor LayerNorm's bias)"})
    mlp: str = field(default="gelu", metadata={
        "help": "MLP: gelu (GPT-2, hidden 4 n_embd), relu2 (relu(x)^2, hidden 4 n_embd) or swiglu "
                "(silu(gate) * up, hidden 8/3 n_embd rounded down: about the same parameters)",
        "choices": ("gelu", "relu2", "swiglu")})
    qk_norm: bool = field(default=False, metadata={"help": "RMS-normalise each head's queries and keys "
                                                           "(no gain) before attention"})
    tie_head: bool = field(default=True, metadata={"help": "the output head shares the token embedding "
                                                           "(GPT-2); false: its own lm_head.weight, zero-initialised"})
    zero_init_proj: bool = field(default=False, metadata={"help": "zero-initialise the projections into the "
                                                                  "residual stream (attention and MLP c_proj)"})
    norm_eps: float = field(default=1e-5, metadata={"help": "the epsilon each norm adds to the variance, in "
                                                            "(0, 1] (GPT-2's layer_norm_epsilon)"})


# The fields added after the first checkpoints: a checkpoint without them is read with their
# defaults, which build the GPT it was written from.
ARCHITECTURE_OPTIONS = ("pos", "norm", "norm_gain", "mlp", "qk_norm", "tie_head", "zero_init_proj", "norm_eps")


@dataclass
class GPTConfig(ModelOptions):
    """The model's shape. Validated on construction, so a bad value from a checkpoint
    or a command line fails here, with its name, before any weight is allocated.

    >>> GPTConfig(vocab_size=65, n_layer=2, n_head=2, n_embd=32).num_parameters()
    35744
    """

    vocab_size: int = 65

    def __post_init__(self):
        for name, limit in SIZE_LIMITS.items():
            value = getattr(self, name)
            # bool is an int subclass and 1.5 would truncate: both are mistakes, not sizes
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
                    or not 1 <= value <= limit:
                raise ValueError(f"{name} must be an integer in [1, {limit}], got {value!r}")
            setattr(self, name, int(value))  # np.int64 -> int keeps to_dict() JSON-serialisable
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if isinstance(self.dropout, (bool, np.bool_)) or not isinstance(self.dropout, numbers.Real) \
                or not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if isinstance(self.norm_eps, (bool, np.bool_)) or not isinstance(self.norm_eps, numbers.Real) \
                or not (math.isfinite(self.norm_eps) and 0 < self.norm_eps <= 1):
            raise ValueError(f"norm_eps must be a number in (0, 1], got {self.norm_eps!r}")
        self.norm_eps = float(self.norm_eps)
        for f in fields(ModelOptions):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
            if f.type in ("bool", bool):
                if not isinstance(value, (bool, np.bool_)):
                    raise ValueError(f"{f.name} must be true or false, got {value!r}")
                setattr(self, f.name, bool(value))
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos rope rotates pairs of each head's dimensions: the head size n_embd/n_head "
                             f"({self.n_embd}/{self.n_head} = {self.n_embd // self.n_head}) must be even")

    def to_dict(self):
        return asdict(self)

    def param_shapes(self, model_type: str = "gpt") -> dict[str, tuple[int, ...]]:
        """name -> shape of every weight of ``MODELS[model_type](self)``, in state-dict
        order, computed without allocating anything (to check a checkpoint first).

        >>> GPTConfig(vocab_size=5).param_shapes("bigram")
        {'token_embedding.weight': (5, 5)}
        """
        V, T, C = self.vocab_size, self.block_size, self.n_embd
        if model_type == "bigram":
            return {"token_embedding.weight": (V, V)}
        if model_type != "gpt":
            raise ValueError(f"unknown model type {model_type!r}; choose one of {', '.join(MODELS)}")

        def linear(name, n_in, n_out):  # nn.Linear: weight (out, in), then bias
            return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if self.bias else {})}

        def norm(name):  # Norm: weight (the gain), then bias (LayerNorm only)
            return {**({f"{name}.weight": (C,)} if self.norm_gain else {}),
                    **({f"{name}.bias": (C,)} if self.bias and self.norm == "layernorm" and self.norm_gain else {})}

        H = mlp_hidden(self)
        shapes = {"transformer.wte.weight": (V, C), **({"transformer.wpe.weight": (T, C)} if self.pos == "learned" else {})}
        for i in range(self.n_layer):
            h = f"transformer.h.{i}"
            shapes.update({**norm(f"{h}.ln_1"), **linear(f"{h}.attn.c_attn", C, 3 * C),
                           **linear(f"{h}.attn.c_proj", C, C), **norm(f"{h}.ln_2"),
                           **linear(f"{h}.mlp.c_fc", C, 2 * H if self.mlp == "swiglu" else H),
                           **linear(f"{h}.mlp.c_proj", H, C)})
        shapes.update(norm("transformer.ln_f"))
        if not self.tie_head:  # tied: the head is wte, listed once
            shapes["lm_head.weight"] = (V, C)
        return shapes

    def num_parameters(self, model_type: str = "gpt") -> int:
        """Exact parameter count of ``MODELS[model_type](self)``, without building it."""
        return sum(math.prod(shape) for shape in self.param_shapes(model_type).values())


def mlp_hidden(config: GPTConfig) -> int:
    """The MLP's hidden width: 4 n_embd, or 8/3 n_embd for swiglu (its c_fc makes two halves,
    gate and up, so the parameter count stays about the same)."""
    return 8 * config.n_embd // 3 if config.mlp == "swiglu" else 4 * config.n_embd


def rms_norm(x, eps: float = 1e-5):
    """x / sqrt(mean(x^2) + eps) over the last axis (no mean subtracted, no gain); fused."""
    return F.rms_norm(x, None, eps)


class Norm(nn.Module):
    """The norm before attention, MLP and head: LayerNorm (GPT-2; bias with --bias) or RMSNorm
    (no bias), each with a learned gain ``weight`` unless norm_gain is false (then no bias either,
    as torch's elementwise_affine=False). With the defaults
    it is nn.LayerNorm exactly (same names, same op)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C, self.kind, self.eps = config.n_embd, config.norm, config.norm_eps
        self.weight = nn.Parameter(np.ones(C, np.float32)) if config.norm_gain else None
        layer_norm_bias = config.bias and config.norm == "layernorm" and config.norm_gain
        self.bias = nn.Parameter(np.zeros(C, np.float32)) if layer_norm_bias else None

    def forward(self, x):
        if self.kind == "layernorm":
            return F.layer_norm(x, self.weight, self.bias, self.eps)  # fused
        return F.rms_norm(x, self.weight, self.eps)  # fused, gain included


def rope_tables(positions, head_size: int, xp, dtype, base: float = 10000.0):
    """cos and sin (T, 1, hs/2) of the rotary angles pos * base^(-2i/hs), for ``rotate``.
    Computed in float64 from absolute positions: a position past block_size (a sliding
    KV cache) is as exact as one inside it."""
    inv_freq = base ** (-np.arange(0, head_size, 2, dtype=np.float64) / head_size)
    angles = np.asarray(positions, dtype=np.float64)[:, None, None] * inv_freq  # (T, 1, hs/2)
    return tt.Tensor(xp.asarray(np.cos(angles), dtype=dtype)), tt.Tensor(xp.asarray(np.sin(angles), dtype=dtype))


def rotate(x, cos, sin):
    """RoPE on (B, T, nh, hs), GPT-NeoX/llama's half-split convention: dimension i pairs with
    i + hs/2, each pair turned by its angle. Then q.k depends on positions only through
    their distance, so keys cached at their own positions stay valid as the window slides.
    The model runs the fused ``F.qk_norm_rope`` on the packed projection; this composed form
    is its reference (tests)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return F.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0, rope=None):
        qkv = self.c_attn(x)  # (B, T, 3C): every head's queries, keys and values
        if self.qk_norm or rope is not None:
            qkv = self.transform_qk(qkv, rope)
        if cache is None:
            # fused: split heads, causal softmax(q k^T / sqrt(hs)) v, merge heads -> (B, T, C)
            y = F.multi_head_attention(qkv, self.n_head, causal=True,
                                       dropout_p=self.dropout if self.training else 0.0)
            if y.dtype != qkv.dtype:
                # ml_dtypes' bfloat16 matmul returns float32, so on NumPy attention on bfloat16 runs (and
                # returns) in float32: back to the compute dtype, so the residual stream stays in it
                y = y.astype(qkv.dtype)
        else:
            y = cache.attend(layer, qkv, self.n_head)  # inference: also attends to the cached tokens
        return self.resid_dropout(self.c_proj(y))

    def transform_qk(self, qkv, rope):
        """QK-norm, then RoPE, on the query and key parts of the packed projection, which then
        goes on packed to the fused attention (and the KV cache stores rotated keys)."""
        # one fused op on (B, T, 3C): per head of q and k, rms_norm (eps 1e-5, no gain) then ``rotate``
        return F.qk_norm_rope(qkv, self.n_head, rope, self.qk_norm)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.kind, self.hidden = config.mlp, mlp_hidden(config)
        n_fc = 2 * self.hidden if self.kind == "swiglu" else self.hidden  # swiglu: gate and up, packed
        self.c_fc = nn.Linear(config.n_embd, n_fc, bias=config.bias)
        self.c_proj = nn.Linear(self.hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":
            h = F.gelu(h)
        elif self.kind == "relu2":
            h = F.relu_squared(h)  # fused relu(h)^2
        else:  # swiglu: silu(gate) * up, fused (c_fc packs [gate | up])
            h = F.swiglu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = Norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, rope=None):
        x = x + self.attn(self.ln_1(x), cache, layer, rope)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The container nanoGPT calls ``transformer``, so parameter names match GPT-2's."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos == "learned":  # rope: positions act inside attention, no table
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = Norm(config)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        if not config.tie_head:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._init_weights()
        # --grad-checkpoint: each block but the last keeps only its input and recomputes its forward
        # in backward (the last block's backward starts right after its forward: recomputing it
        # would cost a block's forward and save no peak memory worth having)
        self.grad_checkpoint = False

    def _init_weights(self):
        """GPT-2 initialisation: N(0, 0.02), zero biases, and the projections that
        write into the residual stream scaled by 1/sqrt(2 n_layer) so its variance
        does not grow with depth. Options: zero_init_proj zeroes those projections, and an
        untied head starts at zero (uniform predictions), as modded-nanogpt. Skipped under
        nn.skip_init() (weights about to be loaded: gpt.pretrained)."""
        if nn.init_skipped():
            return
        rng = tt.backend.rng()
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            zero = name == "lm_head.weight" or (self.config.zero_init_proj and name.endswith("c_proj.weight"))
            if zero or name.endswith("bias"):
                p.data[...] = 0.0
            elif name.endswith("c_proj.weight"):
                p.data[...] = rng.normal(0.0, resid_std, p.shape)
            elif p.ndim == 2:  # Linear weights and embeddings
                p.data[...] = rng.normal(0.0, 0.02, p.shape)

    def forward(self, idx, targets=None, cache: KVCache | None = None, last_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        ``cache`` continues from the cached positions (inference); ``last_only``
        computes the logits of the last position only (generation).
        """
        idx = idx.data if isinstance(idx, tt.Tensor) else idx
        B, T = idx.shape
        start = cache.position if cache is not None else 0  # absolute position of idx[:, 0]
        longest = T if cache is not None and cache.sliding else start + T
        if longest > self.config.block_size:
            raise ValueError(f"sequence of length {longest} is longer than block_size {self.config.block_size}")
        tr = self.transformer
        if cache is not None:
            cache.make_room(T)  # a sliding cache drops its oldest tokens past the window
        # token ids and positions go to the embeddings as they are (on the host, for a batch drawn
        # by NumPy): F.embedding checks them there before moving them, with no read back from a GPU
        pos = np.arange(start, start + T)
        x = tr.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "learned":
            x = x + tr.wpe(pos)
        else:
            rope = rope_tables(pos, self.config.n_embd // self.config.n_head, x.xp, x.dtype)
        x = tr.drop(x)
        for layer, block in enumerate(tr.h):
            if self.grad_checkpoint and cache is None and layer < len(tr.h) - 1:
                x = tt.checkpoint(block, x, rope=rope)
            else:
                x = block(x, cache, layer, rope)
        if cache is not None:
            cache.advance(T)
        x = tr.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.head(x)  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss

    def head(self, x):
        """The LM head: tied to the token embedding (GPT-2) or its own matrix. A method of its own
        so that gpt.quantize can put an int8 one in its place for sampling (an instance attribute)."""
        return F.linear(x, self.transformer.wte.weight if self.config.tie_head else self.lm_head.weight)

    def new_cache(self, batch: int) -> KVCache:
        w = self.transformer.wte.weight
        return KVCache(self.config, batch, w.xp, w.dtype)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), eps=1e-8):
        """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not on
        biases and LayerNorm gains, as nanoGPT. Frozen parameters (LoRA's base) get no state."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        no_decay = [p for p in trainable if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return tt.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=eps)

    def generate(self, idx, max_new_tokens: int, temperature=1.0, top_k=None, top_p=None,
                 kv_cache: bool = True, seed=None):
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + new) int64.

        temperature 0 is greedy. See ``gpt.sampling`` for top_k / top_p.
        """
        idx = np.asarray(idx.numpy() if isinstance(idx, tt.Tensor) else tt.backend.to_numpy(idx), dtype=np.int64)
        new = list(self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, kv_cache, seed))
        return np.concatenate([idx] + [t[:, None] for t in new], axis=1) if new else idx

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        kv_cache=True, seed=None):
        """Yield the next token ids (B,) one step at a time."""
        return generate_tokens(self, idx, max_new_tokens, temperature, top_k, top_p, kv_cache, seed)


class BigramLM(nn.Module):
    """Baseline: the next token depends on the current one only (a V x V table)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.vocab_size)
        self.token_embedding.weight.data *= 0.02

    def forward(self, idx, targets=None, cache=None, last_only=False):
        idx = idx.data if isinstance(idx, tt.Tensor) else idx  # host ids stay there: see GPT.forward
        if last_only:
            idx = idx[:, -1:]
        logits = self.token_embedding(idx)  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss

    def new_cache(self, batch):
        return None  # nothing to cache: only the last token matters

    configure_optimizers = GPT.configure_optimizers
    generate = GPT.generate
    generate_stream = GPT.generate_stream


MODELS = {"gpt": GPT, "bigram": BigramLM}
