"""The PyTorch reference GPT: the benchmarks' peer and the parity tests' reference.

nanoGPT's model in eager PyTorch, built from our ``gpt.model.GPTConfig``, with the
architecture and the parameter names (GPT-2's) of ``gpt.model.GPT``: weights copy
across by name (``load_from_tinytensor``) and gradients compare by name. Only bench/
and tests/ import it (gpt/ and tinytensor/ never import torch).

>>> from gpt.model import GPTConfig
>>> model = TorchGPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32))
>>> logits, loss = model(torch.zeros((1, 8), dtype=torch.long))
>>> tuple(logits.shape)
(1, 8, 65)
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import tinytensor as tt
from gpt.model import GPTConfig

# -- the architecture options ------------------------------------------------------------------------------
# Every GPTConfig field this model implements. A new option of gpt/model.py (rope, rmsnorm,
# swiglu, qk-norm, an untied head, ...) is added here and gets its one branch at the place
# marked "option:" below; until then TorchGPT refuses a config that has it.
OPTIONS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias")

# Our state dict leaves out these weights: they are the same tensor as another one.
TIED = {"lm_head.weight": "transformer.wte.weight"}  # option: an untied head has none


def check_options(config: GPTConfig) -> None:
    unknown = [f.name for f in dataclasses.fields(config) if f.name not in OPTIONS]
    if unknown:
        raise NotImplementedError(f"bench/torch_gpt.py does not implement GPTConfig option(s) {', '.join(unknown)}: "
                                  f"add each to OPTIONS and its branch to the reference model")


def norm(config: GPTConfig) -> nn.Module:
    return nn.LayerNorm(config.n_embd, bias=config.bias)  # option: rmsnorm


def linear(config: GPTConfig, n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=config.bias)


# -- the model, top-down as gpt/model.py ---------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, flash: bool):
        super().__init__()
        self.n_head, self.dropout, self.flash = config.n_head, config.dropout, flash
        self.c_attn = linear(config, config.n_embd, 3 * config.n_embd)  # q, k, v at once
        self.c_proj = linear(config, config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        # option: qk-norm and rope transform q and k here
        dropout_p = self.dropout if self.training else 0.0
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:  # written out, as nanoGPT's fallback: the parity tests' reference is explicit
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device))
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = F.dropout(att, dropout_p) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = linear(config, config.n_embd, 4 * config.n_embd)  # option: swiglu
        self.c_proj = linear(config, 4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, flash: bool):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, flash)
        self.ln_2 = norm(config)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(nn.Module):
    """``flash``: attention by ``F.scaled_dot_product_attention`` (the benchmarks' peer, as
    nanoGPT), else written out with an explicit causal mask (the tests' reference)."""

    def __init__(self, config: GPTConfig, flash: bool = True):
        super().__init__()
        check_options(config)
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),  # option: rope has no wpe
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, flash) for _ in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2 (see TIED)
        # GPT-2's initialisation, as gpt.model.GPT._init_weights (named_parameters lists wte once)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def hidden_states(self, idx):
        """(B, T) token ids -> (B, T, C): the final LayerNorm's output, which the head reads."""
        tr = self.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device)))
        for block in tr.h:
            x = block(x)
        return tr.ln_f(x)

    def forward(self, idx, targets=None):
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas=(0.9, 0.95), eps=1e-8):
        """gpt.model.GPT.configure_optimizers: AdamW, weight decay on 2-D weights only."""
        groups = [{"params": [p for p in self.parameters() if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in self.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas, eps=eps)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Greedy decoding as nanoGPT's generate: the whole cropped context every token."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            idx = torch.cat([idx, logits[:, -1, :].argmax(dim=-1, keepdim=True)], dim=1)
        return idx


def load_from_tinytensor(model: TorchGPT, state: dict):
    """Copy our GPT's state dict (name -> NumPy or CuPy array) into ``model`` by name,
    converted to the model's dtype. Returns torch's (missing_keys, unexpected_keys):
    a missing key is a tied weight (``TIED``), loaded through its twin; any other
    difference raises."""
    result = model.load_state_dict({name: torch.from_numpy(tt.backend.to_numpy(value))
                                    for name, value in state.items()}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(TIED):
        raise ValueError(f"our state dict does not fit the torch GPT: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    return result
