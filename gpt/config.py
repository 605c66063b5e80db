"""Training configuration: one dataclass, named presets, validated overrides.

>>> cfg = from_args(["--preset", "tiny", "--max-iters", "10"])
>>> cfg.max_iters, cfg.n_layer
(10, 2)
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import Optional, Union, get_args, get_origin, get_type_hints


@dataclass
class TrainConfig:
    # data
    dataset: str = "shakespeare_char"
    input: Optional[str] = None  # a text file to train on instead of the download
    tokenizer: str = "char"  # char | bpe
    vocab_size: Optional[int] = None  # bpe only (default 512)
    # model
    model: str = "gpt"  # gpt | bigram
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1  # micro-batches per step: the same as a grad_accum times larger batch
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: Optional[int] = None  # default: max_iters
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 250
    eval_iters: int = 20
    sample_tokens: int = 200  # length of the sample printed at each eval (0: none)
    save_checkpoints: bool = True
    # run
    seed: int = 1337
    backend: str = "numpy"
    out_dir: str = "out"
    resume: bool = False
    progress: bool = True  # the tqdm bar

    def validate(self):
        """Raise ValueError with one clear message for the first bad value."""
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
                    "eval_iters")
        non_negative = ("max_iters", "warmup_iters", "sample_tokens", "learning_rate", "min_lr", "weight_decay",
                        "grad_clip")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n-embd ({self.n_embd}) must be divisible by --n-head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"--beta1/--beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 0:
            raise ValueError(f"--lr-decay-iters must not be negative, got {self.lr_decay_iters}")
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"--tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.model not in ("gpt", "bigram"):
            raise ValueError(f"--model must be 'gpt' or 'bigram', got {self.model!r}")
        if self.backend not in ("numpy", "cupy"):
            raise ValueError(f"--backend must be 'numpy' or 'cupy', got {self.backend!r}")
        if self.vocab_size is not None and not 256 <= self.vocab_size <= 65536:
            raise ValueError(f"--vocab-size must be in [256, 65536] for byte-level BPE, got {self.vocab_size}")
        return self


# nanoGPT's configs (config/train_shakespeare_char.py and its README's CPU command); like
# nanoGPT's train.py they use no biases in Linear layers and LayerNorms
PRESETS = {
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, bias=False,
                             learning_rate=1e-3, max_iters=5000, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                             eval_interval=250, eval_iters=200),
    "shakespeare_char_cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
                                 bias=False, learning_rate=1e-3, max_iters=2000, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                                 eval_interval=250, eval_iters=20),
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0, max_iters=50,
                 warmup_iters=5, eval_interval=25, eval_iters=4, sample_tokens=50),
}
DEFAULT_PRESET = {"numpy": "shakespeare_char_cpu", "cupy": "shakespeare_char"}

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _parse_bool(text):
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _converter(tp):
    if get_origin(tp) is Union:  # Optional[X]
        inner = [a for a in get_args(tp) if a is not type(None)][0]
        conv = _converter(inner)
        return lambda s: None if s.lower() == "none" else conv(s)
    if tp is bool:
        return _parse_bool
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"

        def to_number(s):
            try:
                return tp(s)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}") from None
        return to_number
    return str


def build_parser(prog="python -m gpt.train", description=None) -> argparse.ArgumentParser:
    """One --key option per config field, spelled with dashes (underscores work too)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False,
                                     usage=f"{prog} [--preset NAME] [--key value ...]  (--help lists every key)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="named configuration (default: shakespeare_char_cpu on numpy, shakespeare_char on cupy)")
    hints = get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        names = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        kwargs = dict(dest=f.name, type=_converter(hints[f.name]), default=argparse.SUPPRESS,
                      metavar=f.name.upper(), help=f"default: {f.default}")
        if hints[f.name] is bool:  # `--resume` alone means true
            kwargs.update(nargs="?", const=True)
        parser.add_argument(*names, **kwargs)
    return parser


def from_args(argv=None, parser=None) -> TrainConfig:
    """Defaults, then the preset, then the command line's overrides, validated.

    Errors exit with code 2 and one message (argparse's convention).
    """
    parser = parser or build_parser()
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", None) or DEFAULT_PRESET[args.get("backend", "numpy")]
    cfg = dataclasses.replace(TrainConfig(), **PRESETS[preset])
    cfg = dataclasses.replace(cfg, **args)
    try:
        cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))
    cfg.overrides = sorted(args)  # which fields the user set explicitly (matters on --resume)
    cfg.preset = preset
    return cfg
