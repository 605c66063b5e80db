"""Training configuration: one dataclass, named presets, validated overrides.

Each field declares its own help text and, where it has them, its choices
(taken from the registries that own them) and what a resumed run does with it.

>>> cfg, _ = from_args(["--preset", "tiny", "--max-iters", "10"])
>>> cfg.max_iters, cfg.n_layer
(10, 2)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass, field, fields
from typing import Optional, Union, get_args, get_origin, get_type_hints

from tinytensor.backend import BACKENDS
from tinytensor.distributed import COMMUNICATORS
from tinytensor.optim import COMPUTE_DTYPES

from tinytensor.nn.lora import BASE_DTYPES

from .lora import TARGETS as LORA_TARGETS, LoRASpec
from .model import MODELS, GPTConfig, ModelOptions
from .tokenizer import MAX_VOCAB, MIN_BPE_VOCAB, TOKENIZERS, TRAINED_TOKENIZERS

OPTIMIZERS = ("adamw", "muon")  # built by gpt.optimizers.build_optimizer
LR_SCHEDULES = ("cosine", "wsd")  # gpt.trainer.Trainer.lr_at
DIST_CHOICES = ("auto",) + tuple(COMMUNICATORS)  # resolved by gpt.distributed.resolve_dist

class UsageError(ValueError):
    """The options (or a checkpoint's settings with them) cannot make a run: exit 2."""


# What `--resume` does with a field (the `resume` entry of its metadata):
#   "keep"   the run's identity (model shape, data, seed): the checkpoint's value; a different one is an error
#   "free"   the checkpoint's value unless the command line sets it (e.g. --max-iters to train longer)
#   "local"  never read from a checkpoint: paths and per-invocation switches come from this command line only
#            (a checkpoint is untrusted input: it must not choose which files we read or write)


def _opt(default, help, resume="free", choices=None, metavar=None):
    return field(default=default, metadata={"help": help, "resume": resume, "choices": choices, "metavar": metavar})


@dataclass
class TrainConfig(ModelOptions):
    """Everything a training run is: the model options (inherited: one declaration each),
    data, optimisation, evaluation and run settings. ``model_config(vocab)`` gives the GPTConfig."""

    # data
    dataset: str = _opt("shakespeare_char", "dataset to download and prepare when --input is not given",
                        resume="keep", choices=("shakespeare_char",))
    input: Optional[str] = _opt(None, "a UTF-8 text file to train on instead of Tiny Shakespeare", resume="local",
                                metavar="PATH")
    data_dir: Optional[str] = _opt(None, "where prepared datasets are cached (default: $GPT_DATA_DIR, else data/ "
                                         "in a clone, else a per-user cache folder)", resume="local",
                                   metavar="DIR")
    tokenizer: str = _opt("char", "char: one token per character; bpe: byte-level BPE trained on the text; "
                                  "gpt2: GPT-2's (with --init-from a GPT-2 model, which sets it)",
                          resume="keep", choices=TOKENIZERS)
    vocab_size: Optional[int] = _opt(None, "BPE vocabulary size, 256..65536 (default 512; char ignores it)",
                                     resume="keep")
    # model: the architecture fields are inherited from ModelOptions (gpt/model.py)
    model: str = _opt("gpt", "gpt, or the bigram baseline", resume="keep", choices=tuple(MODELS))
    init_from: Optional[str] = _opt(None, "fine-tune an existing model: a checkpoint written by gpt.train, or a "
                                          "Hugging Face GPT-2 folder (config.json, model.safetensors, vocab files) "
                                          "or .safetensors file. Its model type, architecture and tokenizer are "
                                          "used (--dropout may differ, --block-size may shrink), --input is "
                                          "tokenized with its tokenizer, the optimizer starts fresh. --resume "
                                          "ignores it (the run's checkpoint holds everything)",
                                    resume="local", metavar="PATH")
    # optimisation
    batch_size: int = _opt(12, "sequences per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per step: the same as a grad_accum times larger batch")
    max_iters: int = _opt(2000, "optimizer steps in all (raise it on --resume to train longer)")
    optimizer: str = _opt("adamw", "adamw: AdamW on every parameter; muon: Muon on the blocks' attention and MLP "
                                   "matrices, AdamW on embeddings, head, gains and biases", resume="keep",
                          choices=OPTIMIZERS)
    learning_rate: float = _opt(1e-3, "peak learning rate (AdamW's)")
    min_lr: float = _opt(1e-4, "learning rate at the end of the decay (Muon's: the same fraction of --muon-lr)")
    warmup_iters: int = _opt(100, "steps of linear warmup")
    lr_decay_iters: Optional[int] = _opt(None, "step where the decay reaches --min-lr (default: --max-iters)")
    decay_lr: bool = _opt(True, "warmup + decay (--lr-schedule); false keeps the learning rates constant")
    lr_schedule: str = _opt("cosine", "cosine: warmup, cosine decay; wsd: warmup, constant, linear decay over the "
                                      "last --decay-frac", choices=LR_SCHEDULES)
    decay_frac: float = _opt(0.2, "wsd: the fraction of the steps spent decaying, in [0, 1]")
    weight_decay: float = _opt(0.1, "AdamW weight decay on matrices")
    muon_lr: float = _opt(0.02, "--optimizer muon: Muon's peak learning rate")
    muon_momentum: float = _opt(0.95, "--optimizer muon: Muon's (Nesterov) momentum, in [0, 1)")
    muon_weight_decay: float = _opt(0.0, "--optimizer muon: Muon's decoupled weight decay")
    beta1: float = _opt(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = _opt(0.99, "AdamW beta2, in [0, 1)")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0 disables clipping)")
    # fine-tuning (gpt/finetune.py): LoRA adapters, a quantized frozen base, SFT data, recomputation
    lora_rank: int = _opt(0, "LoRA: train rank-N adapters on --lora-targets, every other weight frozen "
                             "(0: train every weight)", resume="keep")
    lora_alpha: float = _opt(16.0, "LoRA: the adapters' update is scaled by alpha / rank", resume="keep")
    lora_dropout: float = _opt(0.0, "LoRA: dropout on the adapters' input, in [0, 1)", resume="keep")
    lora_targets: str = _opt("attn", "LoRA: the Linears of each block to adapt: attn (qkv and output projections), "
                                     "mlp (both MLP layers) or all", resume="keep", choices=tuple(LORA_TARGETS))
    lora_base: str = _opt("float32", "LoRA: the frozen base's adapted weights in float32, or int8/int4 blocks of 64 "
                                     "inputs with a scale each (QLoRA-style, dequantized on the fly)",
                          resume="keep", choices=BASE_DTYPES)
    sft_data: Optional[str] = _opt(None, "SFT: a JSONL file of {\"prompt\", \"response\"} (or {\"messages\"}) "
                                         "examples to train on instead of the text; loss on the responses only",
                                   resume="local", metavar="PATH")
    grad_checkpoint: bool = _opt(False, "recompute each block's forward in backward: far less activation memory "
                                        "for about one more forward; identical gradients")
    # evaluation, logging, checkpoints
    eval_interval: int = _opt(250, "evaluate, sample and save every this many steps")
    eval_iters: int = _opt(20, "batches per split in each evaluation")
    log_interval: int = _opt(10, "steps between log lines when stderr is not a terminal")
    sample_tokens: int = _opt(200, "length of the sample printed at each evaluation (0: none)")
    save_checkpoints: bool = _opt(True, "write ckpt.safetensors and ckpt_best.safetensors at evaluations")
    # run
    seed: int = _opt(1337, "seed of the initialisation, the batches and dropout (0 .. 2**32-1)", resume="keep")
    backend: str = _opt("numpy", "array library: numpy (CPU) or cupy (NVIDIA GPU)", choices=BACKENDS)
    dtype: str = _opt("float32", "compute dtype: float16/bfloat16 run the forward and backward in it with float32 "
                                 "master weights and dynamic loss scaling (bfloat16: numpy only, needs ml_dtypes)",
                      resume="keep", choices=COMPUTE_DTYPES)
    out_dir: str = _opt("out", "folder for checkpoints, metrics.jsonl and loss.png", resume="local",
                        metavar="DIR")
    resume: bool = _opt(False, "continue the run whose checkpoint is in --out-dir", resume="local")
    overwrite: bool = _opt(False, "start a new run in an --out-dir that holds another run's checkpoints, "
                                  "deleting them", resume="local")
    progress: bool = _opt(True, "a progress bar on a terminal (plain log lines otherwise)", resume="local")
    # data-parallel (gpt/distributed.py): this invocation's, never the checkpoint's (any number of ranks resumes)
    dist: str = _opt("auto", "data-parallel transport under mpiexec: mpi (NumPy, or CuPy staged through the host), "
                             "nccl (CuPy, GPU to GPU), none (one process); auto: nccl on cupy, mpi on numpy when "
                             "mpiexec started several processes, else none. --batch-size is per rank",
                     resume="local", choices=DIST_CHOICES)
    dist_timeout: float = _opt(600.0, "seconds a rank waits for the others in a step's all-reduce (or a start-up "
                                      "broadcast) before it stops every rank (a rank died or hangs)", resume="local")

    def validate(self):
        """Raise ValueError with one clear message for the first bad value."""
        for f in fields(self):  # types first: a checkpoint's config goes through here too
            value, kind = getattr(self, f.name), _HINTS[f.name]
            if value is None and get_origin(kind) is Union:
                continue
            kind = _inner(kind)
            ok = (isinstance(value, bool) if kind is bool else
                  isinstance(value, int) and not isinstance(value, bool) if kind is int else
                  isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  if kind is float else isinstance(value, str))
            if not ok:
                what = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]
                raise ValueError(f"{_flag(f.name)} must be {what}, got {value!r}")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{_flag(f.name)} must be one of {', '.join(choices)}; got {value!r}")
        for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "sample_tokens", "learning_rate", "min_lr", "weight_decay",
                     "grad_clip", "lr_decay_iters", "muon_lr", "muon_weight_decay"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{_flag(name)} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in [0, 2**32), got {self.seed}")
        # hard upper bounds: far beyond anything this engine can train, small enough that the
        # memory estimate (and every size computed from them) stays exact
        for name, limit in _LIMITS.items():
            if (getattr(self, name) or 0) > limit:
                raise ValueError(f"{_flag(name)} {getattr(self, name)} is too large (at most {limit:,})")
        try:  # the model fields: GPTConfig is the one place they are checked
            self.model_config(vocab_size=1)
        except ValueError as exc:
            raise ValueError(_MODEL_FIELD.sub(lambda m: _flag(m[0]), str(exc))) from None
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"--muon-momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"--decay-frac must be in [0, 1], got {self.decay_frac}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"--beta1/--beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.vocab_size is not None and not MIN_BPE_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise ValueError(f"--vocab-size must be in [{MIN_BPE_VOCAB}, {MAX_VOCAB}] for byte-level BPE, "
                             f"got {self.vocab_size}")
        if not 0 < self.dist_timeout <= 86400:
            raise ValueError(f"--dist-timeout must be in (0, 86400] seconds, got {self.dist_timeout}")
        if self.dist == "nccl" and self.backend != "cupy":
            raise ValueError("--dist nccl reduces GPU arrays: it needs --backend cupy (or use --dist mpi)")
        if self.tokenizer not in TRAINED_TOKENIZERS and self.init_from is None and not self.resume:
            raise ValueError(f"--tokenizer {self.tokenizer} comes with a model: pass --init-from PATH (a GPT-2 "
                             f"folder), or choose one made from the text: {', '.join(TRAINED_TOKENIZERS)}")
        if self.lora_rank:
            try:
                LoRASpec(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                         targets=self.lora_targets, base_dtype=self.lora_base)
            except ValueError as exc:
                raise ValueError(f"--lora-rank/--lora-alpha/--lora-dropout: {exc}") from None
            if self.dtype != "float32":
                raise ValueError(f"--lora-rank with --dtype {self.dtype} is not supported yet; use --dtype float32")
            if self.model != "gpt":
                raise ValueError(f"--lora-rank adapts the GPT's Linear layers; the {self.model} model has none")
        elif self.lora_rank < 0:
            raise ValueError(f"--lora-rank must be 0 (off) or at least 1, got {self.lora_rank}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out-dir and --overwrite deletes it: choose one")
        return self

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPTConfig of this run's model (validated), for a vocabulary of ``vocab_size``."""
        return GPTConfig(vocab_size=vocab_size, **{f: getattr(self, f) for f in MODEL_FIELDS})


# The model fields: those TrainConfig inherits from ModelOptions (vocab_size comes from the data).
MODEL_FIELDS = tuple(f.name for f in fields(ModelOptions))
_MODEL_FIELD = re.compile(r"\b(" + "|".join(MODEL_FIELDS) + r")\b")
_LIMITS = {"batch_size": 1 << 20,
           "grad_accum": 1 << 16, "max_iters": 10**12, "eval_iters": 1 << 20, "sample_tokens": 1 << 20,
           "warmup_iters": 10**12, "lr_decay_iters": 10**12, "eval_interval": 10**12, "log_interval": 10**12}
_HINTS = get_type_hints(TrainConfig)
_METAVARS = {int: "N", float: "X", bool: "BOOL", str: "TEXT"}


def _inner(tp):
    """X for Optional[X], else tp."""
    if get_origin(tp) is Union:
        return [a for a in get_args(tp) if a is not type(None)][0]
    return tp


def _flag(name):
    return "--" + name.replace("_", "-")


def fields_resumed_as(kind):
    """Names of the fields whose `resume` metadata is ``kind`` ("keep", "free" or "local")."""
    return tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resume", "keep") == kind)


# nanoGPT's configs (config/train_shakespeare_char.py and its README's CPU command); like
# nanoGPT's train.py they use no biases in Linear layers and LayerNorms
PRESETS = {
    "shakespeare_char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, bias=False,
                             learning_rate=1e-3, max_iters=5000, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                             eval_interval=250, eval_iters=200),
    "shakespeare_char_cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0,
                                 bias=False, learning_rate=1e-3, max_iters=2000, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                                 eval_interval=250, eval_iters=20),
    # issue 11's combination, chosen by the ablation in bench/RESULTS.md (bench/ablation.py): Muon on the
    # hidden matrices, RoPE, RMSNorm, ReLU^2, QK-norm, an untied head and zero-initialised projections,
    # a 3x learning rate; on CPU a 2x batch in 800 steps (Muon's fixed per-step cost spread over more
    # tokens) reaches val ~1.64 where nanoGPT's recipe gets ~1.90
    "shakespeare_char_cpu_modern": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=24, dropout=0.0,
                                        bias=False, optimizer="muon", pos="rope", norm="rmsnorm", mlp="relu2",
                                        qk_norm=True, tie_head=False, zero_init_proj=True, learning_rate=3e-3,
                                        max_iters=800, min_lr=3e-4, warmup_iters=50, beta2=0.99, eval_interval=200,
                                        eval_iters=20),
    # the same combination at nanoGPT's GPU size, by analogy only: no GPU was available to measure it
    "shakespeare_char_modern": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2,
                                    bias=False, optimizer="muon", pos="rope", norm="rmsnorm", mlp="relu2",
                                    qk_norm=True, tie_head=False, zero_init_proj=True, learning_rate=3e-3,
                                    max_iters=2500, min_lr=3e-4, warmup_iters=100, beta2=0.99, eval_interval=250,
                                    eval_iters=200),
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
        conv = _converter(_inner(tp))
        return lambda s: None if s.lower() == "none" else conv(s)
    if tp is bool:
        return _parse_bool
    if tp in (int, float):
        return number_arg(tp)
    return str


def number_arg(kind=float, lo=None, hi=None):
    """An argparse ``type``: an int or a finite float, optionally in [lo, hi]; a bad value
    gets a message with what was expected and what was given (the programs share it).

    >>> number_arg(int, 0, 9)("7"), number_arg(float)("1e-3")
    (7, 0.001)
    """
    what = ("an integer" if kind is int else "a finite number") + \
        (f" in [{lo}, {hi}]" if lo is not None and hi is not None else "")

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def build_parser(prog="python -m gpt.train", description=None, preset="shakespeare_char_cpu"):
    """One --key option per config field, spelled with dashes (underscores work too).

    The help shows ``preset``'s values as the defaults.
    """
    parser = argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False,
        usage=f"{prog} [--preset NAME] [--key value ...]  (--help lists every key)",
        epilog="Values shown are the defaults of the chosen preset (--preset NAME --help shows another's). "
               "Booleans take true/false; a bare --resume (or --overwrite, ...) means true.")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help=f"named configuration (default: {DEFAULT_PRESET['numpy']} on numpy, "
                             f"{DEFAULT_PRESET['cupy']} on cupy; showing: {preset})")
    defaults = dataclasses.replace(TrainConfig(), **PRESETS[preset])
    for f in fields(TrainConfig):
        kind, choices, default = _HINTS[f.name], f.metadata.get("choices"), getattr(defaults, f.name)
        help_text = f.metadata["help"] + ("" if default is None else f" (default: {default})")
        kwargs = dict(dest=f.name, type=_converter(kind), default=argparse.SUPPRESS,
                      metavar="{" + ",".join(choices) + "}" if choices
                      else f.metadata.get("metavar") or _METAVARS.get(_inner(kind)))
        if kind is bool:  # `--resume` alone means true
            kwargs.update(nargs="?", const=True)
        parser.add_argument(_flag(f.name), help=help_text, **kwargs)
        if "_" in f.name:  # nanoGPT's spelling works too, without doubling the help
            parser.add_argument(f"--{f.name}", help=argparse.SUPPRESS, **kwargs)
    return parser


def from_args(argv=None, description=None):
    """Defaults, then the preset, then the command line's overrides, validated.

    Returns ``(config, overrides)``: ``overrides`` names the fields the command line
    set (a resumed run keeps the checkpoint's values for the others). Errors exit
    with code 2 and one message (argparse's convention).
    """
    # the preset (and the backend that picks the default one) first, so --help shows its values
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--preset")
    pre.add_argument("--backend")
    known, _ = pre.parse_known_args(argv)
    shown = known.preset if known.preset in PRESETS else DEFAULT_PRESET.get(known.backend, DEFAULT_PRESET["numpy"])
    parser = build_parser(description=description, preset=shown)
    args = vars(parser.parse_args(argv))
    preset = args.pop("preset", None) or DEFAULT_PRESET[args.get("backend", "numpy")]
    cfg = dataclasses.replace(TrainConfig(), **PRESETS[preset])
    cfg = dataclasses.replace(cfg, **args)
    try:
        cfg.validate()
    except ValueError as exc:
        parser.error(str(exc))
    return cfg, frozenset(args)


def config_from_dict(saved: dict) -> dict:
    """The known fields of a checkpoint's ``train_config`` (untrusted: validate the result)."""
    if not isinstance(saved, dict):
        raise ValueError(f"train_config must be a JSON object, got {type(saved).__name__}")
    names = {f.name for f in fields(TrainConfig)}
    return {k: v for k, v in saved.items() if k in names}
