"""Train a GPT: ``python -m gpt.train [--preset NAME] [--key value ...]``.

>>> main(["--preset", "tiny", "--max-iters", "20", "--out-dir", "/tmp/tiny"])  # doctest: +SKIP

Writes to ``--out-dir``: ``ckpt.safetensors`` (last), ``ckpt_best.safetensors``
(best val loss), ``metrics.jsonl`` and ``loss.png``. Ctrl-C saves and exits.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
from pathlib import Path

import numpy as np

import tinytensor as tt
from tinytensor.optim import warmup_cosine_lr

from . import config as C
from .checkpoint import CheckpointError, load_checkpoint, pack_training_state, save_checkpoint, unpack_training_state
from .data import DataError, get_batch, prepare
from .model import MODELS, GPTConfig
from .tokenizer import TokenizerError

MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
EXIT_INTERRUPTED = 130


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says where."""


class Trainer:
    def __init__(self, cfg: C.TrainConfig, log=print):
        self.cfg, self.log = cfg, log
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_path = self.out_dir / "ckpt.safetensors"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.step, self.best_val = 0, math.inf
        self.history = {"step": [], "loss": [], "eval_step": [], "train_loss": [], "val_loss": []}
        self._stop = False

        checkpoint = self._load_resume_checkpoint() if cfg.resume else None
        cfg = self.cfg  # on --resume: the checkpoint's settings plus the command line's overrides
        tt.backend.get_xp(cfg.backend)  # fail early with the install hint
        tt.manual_seed(cfg.seed)
        self.data = prepare(cfg.dataset, cfg.input, cfg.tokenizer, cfg.vocab_size, log=self._log_err)
        self.chars_per_token = self.data.meta.get("n_chars", 1) / max(1, self.data.meta.get("n_train", 1)
                                                                       + self.data.meta.get("n_val", 0))
        self.model_config = GPTConfig(vocab_size=self.data.vocab_size,
                                      **{f: getattr(cfg, f) for f in MODEL_FIELDS})
        self.model = MODELS[cfg.model](self.model_config).to(cfg.backend)
        self.optimizer = self.model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                                         (cfg.beta1, cfg.beta2))
        self.batch_rng = np.random.default_rng(cfg.seed)
        if checkpoint is not None:
            self._restore(*checkpoint)

    # -- checkpoints ------------------------------------------------------------------
    def _load_resume_checkpoint(self):
        """On --resume the run's settings come from the checkpoint; only options given
        on the command line (e.g. --max-iters) change it. The model shape cannot."""
        tensors, meta = load_checkpoint(self.ckpt_path)
        saved = meta["train_config"]
        for name in getattr(self.cfg, "overrides", []):
            if name in MODEL_FIELDS + ("model", "dataset", "input", "tokenizer", "vocab_size", "seed") \
                    and saved.get(name) != getattr(self.cfg, name):
                raise TrainingError(f"--{name.replace('_', '-')} {getattr(self.cfg, name)} differs from the "
                                    f"checkpoint's {saved.get(name)}; a resumed run keeps its model and data")
        explicit = {n: getattr(self.cfg, n) for n in getattr(self.cfg, "overrides", [])}
        explicit["out_dir"] = self.cfg.out_dir  # where the checkpoint was found (the run may have moved)
        known = {f.name for f in dataclasses.fields(C.TrainConfig)}
        merged = {k: v for k, v in saved.items() if k in known}
        merged.update(explicit)  # the command line wins (a key in both must not be passed twice)
        self.cfg = dataclasses.replace(C.TrainConfig(), **merged).validate()
        self.out_dir = Path(self.cfg.out_dir)
        return tensors, meta

    def _restore(self, tensors, meta):
        if self.data.tokenizer.to_json() != meta["tokenizer"]:
            raise TrainingError("the prepared dataset's tokenizer differs from the checkpoint's; "
                                "resume with the same --input/--tokenizer")
        model_state, opt_state = unpack_training_state(tensors, meta)
        self.model.load_state_dict(model_state)
        if opt_state is not None:
            self.optimizer.load_state_dict(opt_state)
        self.step = int(meta["step"])
        best = meta.get("best_val_loss")  # None until the first evaluation
        self.best_val = math.inf if best is None else float(best)
        self.batch_rng.bit_generator.state = meta["rng"]["batches"]
        tt.set_rng_state(meta["rng"]["tinytensor"])
        self.history = meta.get("history", self.history)
        self.log(f"resumed from {self.ckpt_path} at step {self.step}")

    def save(self, path=None):
        meta = {
            "model_type": self.cfg.model,
            "model_config": self.model_config.to_dict(),
            "train_config": dataclasses.asdict(self.cfg),
            "tokenizer": self.data.tokenizer.to_json(),
            "step": self.step,
            "best_val_loss": self.best_val if math.isfinite(self.best_val) else None,
            "rng": {"batches": self.batch_rng.bit_generator.state, "tinytensor": tt.get_rng_state()},
            "history": self.history,
        }
        tensors, meta = pack_training_state(self.model, self.optimizer, meta)
        save_checkpoint(path or self.ckpt_path, tensors, meta)

    # -- evaluation -------------------------------------------------------------------
    def evaluate(self):
        """Mean loss over eval_iters batches of each split. Its own generator, seeded by
        the step, so evaluating never changes the training batches (exact resume)."""
        cfg, out = self.cfg, {}
        rng = np.random.default_rng([cfg.seed, self.step, 1])
        self.model.eval()
        with tt.no_grad():
            for split, data in (("train", self.data.train), ("val", self.data.val)):
                losses = [self.model(*get_batch(data, cfg.batch_size, cfg.block_size, rng))[1].item()
                          for _ in range(cfg.eval_iters)]
                out[split] = float(np.mean(losses))
        self.model.train()
        return out

    def sample_text(self, n_tokens):
        tok = self.data.tokenizer
        try:
            prompt = tok.encode("\n")
        except TokenizerError:
            prompt = [0]
        ids = self.model.generate(np.array([prompt]), n_tokens, temperature=0.8, top_k=200,
                                  seed=self.cfg.seed + self.step)
        return tok.decode(ids[0, len(prompt):].tolist())

    # -- the loop -------------------------------------------------------------------------
    def lr_at(self, step):
        cfg = self.cfg
        if not cfg.decay_lr:
            return cfg.learning_rate
        decay = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
        return warmup_cosine_lr(step, cfg.learning_rate, cfg.warmup_iters, decay, cfg.min_lr)

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        cfg, model, opt = self.cfg, self.model, self.optimizer
        lr = self.lr_at(self.step)
        for group in opt.param_groups:
            group["lr"] = lr
        # all micro-batches drawn at once: grad_accum N is exactly an N-times batch
        x, y = get_batch(self.data.train, cfg.batch_size * cfg.grad_accum, cfg.block_size, self.batch_rng)
        opt.zero_grad()
        total = 0.0
        for xs, ys in zip(np.split(x, cfg.grad_accum), np.split(y, cfg.grad_accum)):
            _, loss = model(xs, ys)
            (loss * (1.0 / cfg.grad_accum)).backward()
            total += loss.item()
        loss = total / cfg.grad_accum
        if not math.isfinite(loss):
            raise TrainingError(f"loss is {loss} at step {self.step}; stopping. The last good checkpoint "
                                f"({self.ckpt_path}) is untouched. Try a lower --learning-rate or --grad-clip.")
        if cfg.grad_clip > 0:
            tt.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        self.step += 1
        return loss, lr

    def run(self) -> int:
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        n_params = self.model.num_parameters()
        self.log(f"{cfg.model}: {n_params / 1e6:.2f}M parameters, vocab {self.data.vocab_size}, "
                 f"backend {cfg.backend}, dataset {self.data.name}, {cfg.max_iters} steps")
        tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
        previous = signal.signal(signal.SIGINT, self._request_stop)
        bar = _progress(cfg.progress, self.step, cfg.max_iters)
        metrics = open(self.metrics_path, "a")
        try:
            evaluated_at = self.step if cfg.resume else None  # the checkpoint's step was evaluated
            while True:
                if self.step != evaluated_at and (self.step % cfg.eval_interval == 0 or self.step >= cfg.max_iters):
                    self._eval_and_save(metrics, bar)
                    evaluated_at = self.step
                if self.step >= cfg.max_iters:
                    break
                t0 = time.perf_counter()
                loss, lr = self.train_step()
                tok_s = tokens_per_step / (time.perf_counter() - t0)
                metrics.write(json.dumps({"step": self.step, "loss": loss, "lr": lr, "tok_per_s": tok_s}) + "\n")
                self.history["step"].append(self.step)
                self.history["loss"].append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if self._stop:
                    metrics.flush()
                    self.save()
                    bar.close()
                    self.log(f"interrupted: checkpoint saved at step {self.step} to {self.ckpt_path}; "
                             "continue with --resume")
                    return EXIT_INTERRUPTED
        finally:
            metrics.close()
            bar.close()
            signal.signal(signal.SIGINT, previous)
        self.log(f"done: step {self.step}, best val loss {self.best_val:.4f}; checkpoint {self.ckpt_path}")
        return 0

    def _eval_and_save(self, metrics, bar):
        losses = self.evaluate()
        bpc = losses["val"] / math.log(2) / self.chars_per_token
        metrics.write(json.dumps({"step": self.step, "train_loss": losses["train"], "val_loss": losses["val"],
                                  "val_bpc": bpc}) + "\n")
        metrics.flush()
        for key, value in (("eval_step", self.step), ("train_loss", losses["train"]), ("val_loss", losses["val"])):
            self.history[key].append(value)
        bar.write(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                  f"val {bpc:.3f} bits/char", file=sys.stderr)
        if self.cfg.sample_tokens:
            bar.write("---- sample ----\n" + self.sample_text(self.cfg.sample_tokens) + "\n----------------",
                      file=sys.stderr)
        if self.cfg.save_checkpoints and self.step > 0:
            if losses["val"] < self.best_val:
                self.best_val = losses["val"]
                self.save(self.out_dir / "ckpt_best.safetensors")
            self.save()
        self._plot()

    def _plot(self):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if not getattr(self, "_plot_note", False):
                self._log_err("note: matplotlib is not installed, so no loss.png (pip install matplotlib)")
                self._plot_note = True
            return
        h = self.history
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(h["step"], h["loss"], lw=0.6, alpha=0.5, label="train (step)")
        ax.plot(h["eval_step"], h["train_loss"], "o-", label="train (eval)")
        ax.plot(h["eval_step"], h["val_loss"], "o-", label="val")
        ax.set(xlabel="step", ylabel="loss", title=f"{self.data.name}: {self.cfg.model}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out_dir / "loss.png", dpi=100)
        plt.close(fig)

    def _request_stop(self, signum, frame):
        if self._stop:  # a second Ctrl-C: stop right now
            raise KeyboardInterrupt
        self._stop = True

    def _log_err(self, msg):
        print(msg, file=sys.stderr, flush=True)


def _progress(enabled, start, total):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)


def main(argv=None) -> int:
    cfg = C.from_args(argv)
    try:
        trainer = Trainer(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
        return trainer.run()
    except (DataError, CheckpointError, TrainingError, TokenizerError, tt.BackendError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, --out-dir not writable, ...: save_checkpoint keeps the old file
        print(f"error: {exc}; the last checkpoint written (if any) is intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint written (if any) is intact; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
