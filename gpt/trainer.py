"""Training: the run's configuration (a resumed run's included), resolved before anything is
built; a pure training step; the loop with its evaluations and checkpoints; one run log.

>>> cfg, overrides = config.from_args(["--preset", "tiny"])           # doctest: +SKIP
>>> with RunDir(cfg.out_dir).locked() as run:                          # doctest: +SKIP
...     Trainer(cfg, run).run(StopRequest())
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import numpy as np

import tinytensor as tt
from tinytensor.optim import warmup_cosine_lr, warmup_stable_decay_lr

from . import config as C
from .config import UsageError
from .atomic import atomic_write_bytes
from .checkpoint import CheckpointError, TrainingState, weights_are_finite
from .distributed import DataParallel, QuietLog
from .finetune import describe_finetune, load_sft, prepare_model
from .lora import save_adapter
from .data import SHAKESPEARE_SHA256, DataError, find_prepared, get_batch, prepare, resolve_data_dir
from .model import MODELS, GPTConfig
from .resources import check_fits
from .optimizers import build_optimizer, same_hyperparameters
from .rundir import RunDir, RunLog
from .signals import EXIT_INTERRUPTED, StopRequest
from .pretrained import load_initial_weights
from .tokenizer import TokenizerError, tokenizer_from_json


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says where."""


class LossNotFiniteError(TrainingError):
    """The step's loss is NaN/Inf: on several ranks the loss is all-reduced, so every rank sees it."""


# -- configuration: the command line, and on --resume the checkpoint ----------------------------------------
def check_resumable(run: RunDir) -> None:
    """--resume needs a checkpoint in the out-dir: checked before the folder is locked (and so
    created), so a mistyped --out-dir leaves nothing behind."""
    if not run.ckpt.is_file():
        raise CheckpointError(f"checkpoint not found: {run.ckpt}; nothing to --resume. Start a new run "
                              f"without --resume, or pass the --out-dir of the run to continue")


def resume_config(cfg: C.TrainConfig, overrides, run: RunDir):
    """On --resume the run's settings come from its checkpoint; the command line changes only
    what it sets (e.g. --max-iters), never the model or the data. Paths and switches are never
    taken from the checkpoint (untrusted: it must not choose which files are read or written).
    Returns (config, TrainingState), reading only the checkpoint's header."""
    check_resumable(run)
    state = TrainingState.read(run.ckpt)
    try:
        saved = C.config_from_dict(state.train_config)
    except ValueError as exc:
        raise CheckpointError(f"{run.ckpt}: {exc}") from None
    defaults = C.TrainConfig()  # a field newer than the checkpoint (e.g. dtype) has its default there
    for name in sorted(set(overrides) & set(C.fields_resumed_as("keep"))):
        if saved.get(name, getattr(defaults, name)) != getattr(cfg, name):
            raise UsageError(f"{C._flag(name)} {getattr(cfg, name)} differs from the checkpoint's "
                             f"{saved.get(name, getattr(defaults, name))}; a resumed run keeps its model, data, "
                             "seed and dtype")
    local = set(C.fields_resumed_as("local"))
    merged = {k: v for k, v in saved.items() if k not in local}
    merged.update({k: getattr(cfg, k) for k in local | set(overrides)})
    try:
        resumed = C.TrainConfig(**merged).validate()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{run.ckpt}: its training settings are invalid ({exc})") from None
    return resumed, state


def training_bytes(model_config: GPTConfig, cfg: C.TrainConfig) -> int:
    """A floor on the memory one training step needs: weights, gradients and two AdamW moments,
    plus the activations backward keeps for one micro-batch (float32). Checked before anything
    is allocated, so an impossible size fails in a second with a message, not in an allocator."""
    params = model_config.num_parameters(cfg.model)
    tokens, C_, L = cfg.batch_size * cfg.block_size, cfg.n_embd, cfg.n_layer
    if cfg.model == "gpt":
        # per layer ~16 widths per token (norms, qkv, attention out, MLP 4C twice, residuals)
        # and the attention weights, (B, H, T, T), kept for backward
        acts = L * (16 * tokens * C_ + cfg.batch_size * cfg.n_head * cfg.block_size ** 2)
    else:
        acts = 0
    acts += 3 * tokens * model_config.vocab_size  # logits, probabilities, their gradient
    return 4 * (4 * params + acts)


# -- the trainer ------------------------------------------------------------------------------------------------
class Trainer:
    """Builds the data, model and optimizer from a resolved config (restoring a checkpoint's
    ``resumed`` state when given) and runs the loop. Messages go to stderr. With ``comm`` (several
    ranks, gpt/distributed.py) only rank 0 reads the checkpoint, reports and writes."""

    def __init__(self, cfg: C.TrainConfig, run: RunDir, resumed: TrainingState | None = None, init=None,
                 comm=None):
        self.cfg, self.run_dir = cfg, run
        self.parallel = DataParallel(comm)
        self.runlog = RunLog(cfg) if self.parallel.is_root else QuietLog()  # messages until run() opens metrics
        self.step, self.best_val, self.elapsed = 0, math.inf, 0.0
        tt.backend.get_xp(cfg.backend)  # fail early with the install hint
        compute_dtype = tt.optim.resolve_dtype(cfg.dtype, cfg.backend)  # (bfloat16: ml_dtypes' hint)
        tt.manual_seed(cfg.seed)
        with self.parallel.root_first():  # rank 0 prepares the dataset, the others find it prepared
            self.data = self._dataset(resumed, init)
        meta = self.data.meta
        self.chars_per_token = meta.get("n_chars", 1) / max(1, meta.get("n_train", 1) + meta.get("n_val", 0))
        self.model_config = cfg.model_config(self.data.vocab_size)
        if cfg.backend == "numpy":  # (CuPy's limit is the GPU's memory, which only CuPy can tell)
            check_fits(training_bytes(self.model_config, cfg), "this configuration",
                       "lower --batch-size, --block-size, --n-embd or --n-layer")
        # the float32 model: the optimizer's (master weights) and the checkpoints'
        self.model = MODELS[cfg.model](self.model_config).to(cfg.backend)
        if init is not None:  # --init-from (a gpt.pretrained.Pretrained): its weights, a fresh optimizer
            load_initial_weights(self.model, init)
            self.log(f"initialised from {init.path} ({init.kind})")
        self.lora = prepare_model(self.model, cfg)  # LoRA adapters (base frozen), --grad-checkpoint
        self.sft = load_sft(cfg, self.data.tokenizer, resumed)  # --sft-data: its batches replace the text's
        self.optimizer = build_optimizer(self.model, cfg)
        self.peak_lrs = [g["lr"] for g in self.optimizer.param_groups]  # each group's schedule peaks there
        # --dtype float16/bfloat16: forward and backward on a low-precision copy (None: float32)
        self.mixed = None if cfg.dtype == "float32" else tt.optim.MixedPrecision(self.model, compute_dtype)
        self.compute_model = self.model if self.mixed is None else self.mixed.model
        self.batch_rng = np.random.default_rng(cfg.seed)
        if resumed is not None and self.parallel.is_root:
            self._restore(resumed)
        self.parallel.start(self)  # the other ranks take rank 0's weights, optimizer state, step and RNGs

    def _dataset(self, resumed, init=None):
        cfg, data = self.cfg, None
        info = resumed.data if resumed is not None else {}  # empty in older checkpoints
        # a run that fine-tunes a model tokenizes with the model's tokenizer (on --resume, the checkpoint's)
        given = init.tokenizer if init is not None else None
        if resumed is not None and C.config_from_dict(resumed.train_config).get("init_from"):
            given = tokenizer_from_json(resumed.tokenizer)
        if resumed is not None and cfg.input is None:
            # a resumed run: the prepared copy in the data directory, found by name and hash
            data = find_prepared(info.get("name"), info.get("source_sha256"), cfg.tokenizer, cfg.vocab_size,
                                 cfg.data_dir)
            if data is not None:
                self.log(f"using prepared dataset at {data.dir}")
            elif info.get("source_sha256", SHAKESPEARE_SHA256) != SHAKESPEARE_SHA256:
                raise DataError(f"the prepared dataset {str(info.get('name'))[:80]!r} of this run is not in "
                                f"{resolve_data_dir(cfg.data_dir)}; pass --input PATH (the text the run trained "
                                "on) or the --data-dir it used")
        if data is None:  # Tiny Shakespeare is prepared again (downloaded if need be), any other text from --input
            data = prepare(cfg.dataset, cfg.input, cfg.tokenizer, cfg.vocab_size, data_dir=cfg.data_dir,
                           log=self.log, given_tokenizer=given)
        if info.get("source_sha256", data.meta["source_sha256"]) != data.meta["source_sha256"]:
            raise UsageError("--input is not the text this run trained on (its sha256 differs); "
                             "a resumed run keeps its data")
        return data

    def log(self, msg):
        self.runlog.message(msg)

    # -- checkpoints --------------------------------------------------------------------------------------
    def _restore(self, state: TrainingState):
        if self.data.tokenizer.to_json() != state.tokenizer:
            raise UsageError("the prepared dataset's tokenizer differs from the checkpoint's; "
                             "resume with the same --input and --tokenizer")
        model_state, opt_state = state.load_arrays(self.run_dir.ckpt)
        own = self.optimizer
        if opt_state is not None and (opt_state["type"] != type(own).__name__ or len(opt_state["param_groups"]) !=
                                      len(own.param_groups) or not all(map(same_hyperparameters,
                                                                           opt_state["param_groups"], own.param_groups))):
            raise CheckpointError(f"{self.run_dir.ckpt}: its optimizer state ({opt_state['type']}, groups "
                                  f"{[sorted(g) for g in opt_state['param_groups']]}) is not this run's "
                                  f"{type(own).__name__}'s; start a new run")
        try:
            self.model.load_state_dict(model_state)
            if opt_state is not None:
                own.load_state_dict(opt_state)
        except (KeyError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{self.run_dir.ckpt}: its state does not fit this model ({exc})") from None
        self.step = state.step
        self.best_val = math.inf if state.best_val_loss is None else float(state.best_val_loss)
        self.elapsed = float(state.elapsed_s)
        if self.mixed is not None:
            if state.loss_scale is None:
                raise CheckpointError(f"{self.run_dir.ckpt}: it has no loss_scale, which a --dtype {self.cfg.dtype} "
                                      "run needs to resume exactly; start a new run")
            self.mixed.scaler.load_state_dict(state.loss_scale)
            self.mixed.refresh()
        self.batch_rng.bit_generator.state = state.rng["batches"]
        tt.set_rng_state(state.rng["tinytensor"])
        self.log(f"resumed from {self.run_dir.ckpt} at step {self.step}")

    def save(self, path=None):
        """Write a checkpoint; never one with non-finite weights (it would replace a good one). Rank 0 only."""
        if not self.parallel.is_root:
            return
        finite, bad = weights_are_finite(self.model)
        if not finite:
            raise TrainingError(f"{bad} holds NaN/Inf at step {self.step}; not saving it. The last "
                                f"checkpoint ({self.run_dir.ckpt}) is untouched. Try a lower --learning-rate")
        TrainingState(
            model_type=self.cfg.model, model_config=self.model_config.to_dict(),
            train_config=dataclasses.asdict(self.cfg), tokenizer=self.data.tokenizer.to_json(),
            data={"name": self.data.name, "source_sha256": self.data.meta["source_sha256"],
                  **({"sft_sha256": self.sft.sha256} if self.sft else {})}, step=self.step,
            best_val_loss=self.best_val if math.isfinite(self.best_val) else None, elapsed_s=self.elapsed,
            rng={"batches": self.batch_rng.bit_generator.state, "tinytensor": tt.get_rng_state()},
            loss_scale=None if self.mixed is None else self.mixed.scaler.state_dict(),
            lora=None if self.lora is None else self.lora.to_dict(),
        ).save(path or self.run_dir.ckpt, self.model, self.optimizer)
        if self.lora is not None and path is None:  # the adapters alone, to apply to the base (gpt.sample --adapter)
            save_adapter(self.run_dir.adapter, self.model, self.lora, self.cfg.model)

    # -- evaluation -----------------------------------------------------------------------------------------
    def evaluate(self):
        """Mean loss over eval_iters batches of each split. Its own generator, seeded by
        the step, so evaluating never changes the training batches (exact resume)."""
        cfg, out = self.cfg, {}
        rng = np.random.default_rng([cfg.seed, self.step, 1])
        self.compute_model.eval()
        with tt.no_grad():
            for split in ("train", "val"):
                losses = [self.compute_model(*self.batch(split, cfg.batch_size, rng))[1].item()
                          for _ in range(cfg.eval_iters)]
                out[split] = float(np.mean(losses))
        self.compute_model.train()
        return out

    def batch(self, split, n, rng):
        """(x, y) of n sequences from the split: windows of the text, or SFT examples (targets of
        prompts and padding ignored)."""
        if self.sft is not None:
            return self.sft.batch(split, n, rng)
        return get_batch(getattr(self.data, split), n, self.cfg.block_size, rng)

    def sample_text(self, n_tokens):
        tok = self.data.tokenizer
        try:
            prompt = tok.encode(self.sft.sample_prompt if self.sft else "\n")
        except TokenizerError:
            prompt = [0]
        # from the float32 master weights, whatever --dtype
        ids = self.model.generate(np.array([prompt]), n_tokens, temperature=0.8, top_k=200,
                                  seed=self.cfg.seed + self.step)
        return tok.decode(ids[0, len(prompt):].tolist())

    # -- the loop ---------------------------------------------------------------------------------------------
    def lr_at(self, step, peak=None):
        """The learning rate at ``step`` of a group whose peak is ``peak`` (default --learning-rate, the
        one logged): one schedule for every group, ending at the fraction min_lr / learning_rate of its peak."""
        cfg = self.cfg
        peak, floor = (cfg.learning_rate, cfg.min_lr) if peak is None or peak == cfg.learning_rate else \
            (peak, peak * cfg.min_lr / cfg.learning_rate if cfg.learning_rate else 0.0)
        if not cfg.decay_lr:
            return peak
        decay = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
        if cfg.lr_schedule == "wsd":
            return warmup_stable_decay_lr(step, peak, cfg.warmup_iters, decay, cfg.decay_frac, floor)
        return warmup_cosine_lr(step, peak, cfg.warmup_iters, decay, floor)

    def train_step(self):
        """One optimizer step on the next batch; returns (mean loss, learning rate)."""
        cfg = self.cfg
        lr = self.lr_at(self.step)
        lrs = [self.lr_at(self.step, peak) for peak in self.peak_lrs]
        # all micro-batches (of all ranks) drawn at once: grad_accum N is exactly an N-times batch,
        # and so are N ranks; each rank trains on its share
        x, y = self.batch("train", self.parallel.global_batch_size(cfg.batch_size) * cfg.grad_accum, self.batch_rng)
        x, y = self.parallel.local_batch(x, y, cfg.grad_accum)
        loss = train_step(self.model, self.optimizer, x, y, lrs, cfg.grad_accum, cfg.grad_clip, self.mixed,
                          self.parallel.grad_sync())
        if not math.isfinite(loss):
            raise LossNotFiniteError(f"loss is {loss} at step {self.step}; stopping. The last good checkpoint "
                                     f"({self.run_dir.ckpt}) is untouched. Try a lower --learning-rate or --grad-clip.")
        self.step += 1
        return loss, lr

    def run(self, stop: StopRequest) -> int:
        """Train to max_iters (evaluating, sampling and saving on the way). Returns the exit code."""
        cfg = self.cfg
        dtype = "" if self.mixed is None else f", dtype {cfg.dtype}"
        self.log(f"{cfg.model}: {self.model.num_parameters() / 1e6:.2f}M parameters, vocab {self.data.vocab_size}, "
                 f"backend {cfg.backend}{dtype}{self.parallel.describe()}, dataset {self.data.name}, "
                 f"{cfg.max_iters} steps")
        if self.lora is not None or self.sft is not None:
            self.log(describe_finetune(self.model, self.lora, self.sft))
        tokens_per_step = self.parallel.global_batch_size(cfg.batch_size) * cfg.grad_accum * cfg.block_size
        evaluated_at = self.step if cfg.resume else None  # the checkpoint's step was evaluated
        self.runlog.open(self.run_dir, self.step, resumed=cfg.resume)
        stop.deferred = True  # from here a signal finishes the step and saves
        self.parallel.stop = stop
        try:
            while True:
                if self.step != evaluated_at and (self.step % cfg.eval_interval == 0 or self.step >= cfg.max_iters):
                    if self.parallel.is_root:
                        self._eval_and_save()
                    self.parallel.wait_for_root()
                    evaluated_at = self.step
                if self.step >= cfg.max_iters:
                    break
                t0 = time.perf_counter()
                loss, lr = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed += dt
                self.runlog.step({"kind": "train", "step": self.step, "loss": loss, "lr": lr, "ms": dt * 1e3,
                                  "tok_per_s": tokens_per_step / dt, "elapsed_s": round(self.elapsed, 3)})
                if self.parallel.stop_requested(stop):
                    self.runlog.flush()
                    self.save()
                    self.runlog.close_bar()
                    signame = stop.signame or "a signal to another rank"
                    self.log(f"interrupted ({signame}): checkpoint saved at step {self.step} to "
                             f"{self.run_dir.ckpt}; continue with --resume")
                    return EXIT_INTERRUPTED
        finally:
            stop.deferred = False
            self.runlog.close()
        self.log(f"done: step {self.step}, best val loss {self.best_val:.4f}; checkpoint {self.run_dir.ckpt}")
        return 0

    def _eval_and_save(self):
        losses = self.evaluate()
        bpc = losses["val"] / math.log(2) / self.chars_per_token
        self.runlog.eval({"kind": "eval", "step": self.step, "train_loss": losses["train"], "val_loss": losses["val"],
                          "val_bpc": bpc, "elapsed_s": round(self.elapsed, 3)})
        if not all(map(math.isfinite, losses.values())):
            raise TrainingError(f"the evaluation loss is not finite at step {self.step} (train {losses['train']}, "
                                f"val {losses['val']}); stopping without saving. The last checkpoint "
                                f"({self.run_dir.ckpt}) is untouched. Try a lower --learning-rate")
        if self.cfg.sample_tokens:
            self.log("---- sample ----\n" + self.sample_text(self.cfg.sample_tokens) + "\n----------------")
        if self.cfg.save_checkpoints and self.step > 0:
            if losses["val"] < self.best_val:
                self.best_val = losses["val"]
                self.save(self.run_dir.best)
            self.save()
        self._plot()

    def _plot(self):
        # matplotlib caches fonts under ~/.cache unless told otherwise: a run writes only to
        # its out-dir and the data dir, so its cache goes to the data dir
        os.environ.setdefault("MPLCONFIGDIR", str(resolve_data_dir(self.cfg.data_dir) / ".matplotlib"))
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # a dependency, but a stripped-down install may lack it: say so once
            if not getattr(self, "_plot_note", False):
                self.log("note: matplotlib is not installed, so no loss.png (pip install matplotlib)")
                self._plot_note = True
            return
        train = [(r["step"], r["loss"]) for r in self.runlog.history if r.get("kind") == "train"]
        evals = [r for r in self.runlog.history if r.get("kind") == "eval"]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), lw=0.6, alpha=0.5, label="train (step)")
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", label="train (eval)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val")
        ax.set(xlabel="step", ylabel="loss", title=f"{self.data.name}: {self.cfg.model}")
        ax.legend()
        fig.tight_layout()
        data = _png_bytes(fig)
        plt.close(fig)
        atomic_write_bytes(self.run_dir.plot, data)


def _png_bytes(fig) -> bytes:
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def train_step(model, optimizer, x, y, lr, grad_accum: int = 1, grad_clip: float = 0.0,
               mixed: tt.optim.MixedPrecision | None = None, grad_sync=None) -> float:
    """One optimizer step on the batch (x, y), split into ``grad_accum`` micro-batches whose
    gradients add up to the whole batch's; returns the mean loss. ``lr``: one learning rate for
    every parameter group, or a list of one per group. The optimizer is not stepped when the
    loss is not finite (the caller stops the run).

    With ``mixed`` (mixed precision: ``model`` is its float32 master), the forward and backward
    run on ``mixed.model`` from a gradient seeded with the loss scale; the gradients are
    unscaled into the masters in float32, and a step whose gradients hold Inf/NaN is skipped
    (the weights unchanged) while the scaler halves its scale.

    ``grad_sync(params, loss_total) -> loss_total`` (data-parallel, gpt/distributed.py) averages
    the float32 gradients and the loss over the ranks before the step uses them.

    >>> loss = train_step(model, opt, x, y, lr=1e-3, grad_clip=1.0)   # doctest: +SKIP
    """
    groups = optimizer.param_groups
    lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr] * len(groups)
    if len(lrs) != len(groups):
        raise ValueError(f"train_step: {len(lrs)} learning rates for {len(groups)} parameter groups")
    for group, group_lr in zip(groups, lrs):
        group["lr"] = group_lr
    optimizer.zero_grad()
    if mixed is not None:
        mixed.zero_grad()
    total = None
    for xs, ys in zip(np.split(x, grad_accum), np.split(y, grad_accum)):
        if mixed is None:
            _, loss = model(xs, ys)
            (loss * (1.0 / grad_accum)).backward()
        else:
            # an overflow in float16 is expected now and then (the scaler's signal to back off): no warnings
            with np.errstate(over="ignore", invalid="ignore"):
                _, loss = mixed.model(xs, ys)
                loss.backward(mixed.scaler.seed(loss, grad_accum))
        # summed where the loss is (float64, as Python floats were) and read once below: on a GPU
        # every read waits for all queued work, so one per step, not one per micro-batch
        part = loss.data.astype(np.float64)
        total = part if total is None else total + part
    if mixed is not None:
        mixed.unscale_grads()
    if grad_sync is not None:
        total = grad_sync(model.parameters(), total)
    loss = float(total) / grad_accum
    if not math.isfinite(loss):
        return loss
    if mixed is not None:
        # the one read back besides the loss, clipping or not: Inf/NaN when any gradient is
        norm = tt.nn.utils.global_grad_norm(model.parameters())
        mixed.scaler.update(math.isfinite(norm))
        if not math.isfinite(norm):
            optimizer.zero_grad()
            return loss  # skipped: an overflow in the scaled gradients, not in the model
        if grad_clip > 0:
            tt.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, norm=norm)
        optimizer.step()
        mixed.refresh()
        return loss
    if grad_clip > 0:
        tt.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss
