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
# Every GPTConfig field this model implements. A new option of gpt/model.py is added here
# and gets its one branch at the place marked "option:" below; until then TorchGPT refuses
# a config that has it.
OPTIONS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias",
           "pos", "norm", "norm_gain", "mlp", "qk_norm", "tie_head", "zero_init_proj", "norm_eps")


def tied(config: GPTConfig) -> dict:
    """The weights our state dict leaves out: the same tensor as another one (none when untied)."""
    return {"lm_head.weight": "transformer.wte.weight"} if config.tie_head else {}


TIED = tied(GPTConfig())  # the default (GPT-2's) tied head


def check_options(config: GPTConfig) -> None:
    unknown = [f.name for f in dataclasses.fields(config) if f.name not in OPTIONS]
    if unknown:
        raise NotImplementedError(f"bench/torch_gpt.py does not implement GPTConfig option(s) {', '.join(unknown)}: "
                                  f"add each to OPTIONS and its branch to the reference model")


def norm(config: GPTConfig) -> nn.Module:
    # option: norm (layernorm | rmsnorm), norm_gain, norm_eps
    if config.norm == "layernorm":
        return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias, elementwise_affine=config.norm_gain)
    return nn.RMSNorm(config.n_embd, eps=config.norm_eps, elementwise_affine=config.norm_gain)


def linear(config: GPTConfig, n_in: int, n_out: int) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=config.bias)


def mlp_hidden(config: GPTConfig) -> int:
    return 8 * config.n_embd // 3 if config.mlp == "swiglu" else 4 * config.n_embd  # option: mlp


def rope(x, positions, base=10000.0):
    """option: pos rope. (B, nh, T, hs), GPT-NeoX/llama half-split rotation (as torchtune's
    and HF llama's rotate_half)."""
    hs = x.size(-1)
    inv_freq = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angles = positions.to(torch.float64)[:, None] * inv_freq  # (T, hs/2)
    cos, sin = (torch.cat([a, a], dim=-1).to(x.dtype) for a in (angles.cos(), angles.sin()))  # (T, hs)
    x1, x2 = x[..., :hs // 2], x[..., hs // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# -- the model, top-down as gpt/model.py ---------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, flash: bool):
        super().__init__()
        self.n_head, self.dropout, self.flash = config.n_head, config.dropout, flash
        self.qk_norm, self.rope = config.qk_norm, config.pos == "rope"
        self.c_attn = linear(config, config.n_embd, 3 * config.n_embd)  # q, k, v at once
        self.c_proj = linear(config, config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if self.qk_norm:  # option: qk_norm
            q, k = (F.rms_norm(t, (t.size(-1),), eps=1e-5) for t in (q, k))
        if self.rope:  # option: pos rope
            positions = torch.arange(T, device=x.device)
            q, k = rope(q, positions), rope(k, positions)
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
        self.kind, H = config.mlp, mlp_hidden(config)
        self.c_fc = linear(config, config.n_embd, 2 * H if self.kind == "swiglu" else H)  # swiglu: gate, up
        self.c_proj = linear(config, H, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "gelu":  # option: mlp
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.dropout(self.c_proj(h))


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
            **({"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos == "learned" else {}),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, flash) for _ in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:  # option: tie_head
            self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2 (see tied())
        # GPT-2's initialisation, as gpt.model.GPT._init_weights (named_parameters lists wte once)
        for name, p in self.named_parameters():
            if name == "lm_head.weight" or (config.zero_init_proj and name.endswith("c_proj.weight")):
                nn.init.zeros_(p)  # option: an untied head, zero_init_proj
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * config.n_layer))
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def hidden_states(self, idx):
        """(B, T) token ids -> (B, T, C): the final LayerNorm's output, which the head reads."""
        tr = self.transformer
        x = tr.wte(idx)
        if self.config.pos == "learned":  # option: rope acts in attention instead
            x = x + tr.wpe(torch.arange(idx.shape[1], device=idx.device))
        x = tr.drop(x)
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
    a missing key is a tied weight (``tied(config)``), loaded through its twin; any other
    difference raises."""
    result = model.load_state_dict({name: torch.from_numpy(tt.backend.to_numpy(value))
                                    for name, value in state.items()}, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(tied(model.config)):
        raise ValueError(f"our state dict does not fit the torch GPT: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    return result
