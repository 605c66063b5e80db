"""The GPT language model (GPT-2 architecture, nanoGPT's names), on tinytensor.

Reads top-down: config, attention, MLP, block, the model, then a bigram baseline.

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
from dataclasses import asdict, dataclass, field

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
        if not isinstance(self.bias, (bool, np.bool_)):
            raise ValueError(f"bias must be true or false, got {self.bias!r}")
        self.bias = bool(self.bias)

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

        def layer_norm(name):
            return {f"{name}.weight": (C,), **({f"{name}.bias": (C,)} if self.bias else {})}

        shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}
        for i in range(self.n_layer):
            h = f"transformer.h.{i}"
            shapes.update({**layer_norm(f"{h}.ln_1"), **linear(f"{h}.attn.c_attn", C, 3 * C),
                           **linear(f"{h}.attn.c_proj", C, C), **layer_norm(f"{h}.ln_2"),
                           **linear(f"{h}.mlp.c_fc", C, 4 * C), **linear(f"{h}.mlp.c_proj", 4 * C, C)})
        shapes.update(layer_norm("transformer.ln_f"))  # no lm_head: it is tied to wte
        return shapes

    def num_parameters(self, model_type: str = "gpt") -> int:
        """Exact parameter count of ``MODELS[model_type](self)``, without building it."""
        return sum(math.prod(shape) for shape in self.param_shapes(model_type).values())


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache: KVCache | None = None, layer: int = 0):
        qkv = self.c_attn(x)  # (B, T, 3C): every head's queries, keys and values
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


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The container nanoGPT calls ``transformer``, so parameter names match GPT-2's."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        self._init_weights()

    def _init_weights(self):
        """GPT-2 initialisation: N(0, 0.02), zero biases, and the projections that
        write into the residual stream scaled by 1/sqrt(2 n_layer) so its variance
        does not grow with depth."""
        rng = tt.backend.rng()
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                p.data[...] = rng.normal(0.0, resid_std, p.shape)
            elif p.ndim == 2:  # Linear weights and embeddings
                p.data[...] = rng.normal(0.0, 0.02, p.shape)
            elif name.endswith("bias"):
                p.data[...] = 0.0

    def forward(self, idx, targets=None, cache: KVCache | None = None, last_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        ``cache`` continues from the cached positions (inference); ``last_only``
        computes the logits of the last position only (generation).
        """
        idx = idx.data if isinstance(idx, tt.Tensor) else idx
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        tr = self.transformer
        # token ids and positions go to the embeddings as they are (on the host, for a batch drawn
        # by NumPy): F.embedding checks them there before moving them, with no read back from a GPU
        pos = np.arange(start, start + T)
        x = tr.drop(tr.wte(idx) + tr.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(tr.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        x = tr.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = F.linear(x, tr.wte.weight)  # LM head tied to the token embedding, (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits, targets)
        return logits, loss

    def new_cache(self, batch: int) -> KVCache:
        w = self.transformer.wte.weight
        return KVCache(self.config, batch, w.xp, w.dtype)

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas=(0.9, 0.95), eps=1e-8):
        """AdamW with weight decay on 2-D weights (matmuls, embeddings) only, not on
        biases and LayerNorm gains, as nanoGPT."""
        decay = [p for p in self.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.parameters() if p.ndim < 2]
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
