"""The run directory (``--out-dir``): who may write there, and what a run leaves in it.

* ``ckpt.safetensors`` (last) and ``ckpt_best.safetensors`` (best val loss);
* ``metrics.jsonl``: one JSON row per step (``"kind": "train"``) and per evaluation
  (``"kind": "eval"``), each with ``elapsed_s`` (training wall time, summed over resumes).
  It is the run's history: checkpoints do not carry it, so their header stays small;
* ``loss.png``; ``.lock`` (held while a run is going: a second run in the same folder is refused).

:class:`RunLog` is the one place a run reports: messages, progress, metrics rows.

>>> run = RunDir("out")           # doctest: +SKIP
>>> with run.locked():            # doctest: +SKIP
...     run.check_fresh(overwrite=False)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

from .atomic import atomic_write_bytes, remove_stale_temps

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs there are not protected from each other
    fcntl = None

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class RunDirError(Exception):
    """The run directory cannot be used as asked (a usage error: exit 2); the message says why."""


class RunDir:
    def __init__(self, path):
        self.path = Path(path).expanduser()
        self.ckpt = self.path / "ckpt.safetensors"
        self.best = self.path / "ckpt_best.safetensors"
        self.metrics = self.path / "metrics.jsonl"
        self.plot = self.path / "loss.png"
        self.adapter = self.path / "adapter.safetensors"  # LoRA runs: the adapters alone
        self._lock = self.path / ".lock"

    @contextlib.contextmanager
    def locked(self):
        """Create the folder, hold its lock for the block, and remove what killed writers left."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create --out-dir {self.path}: {exc.strerror or exc}") from None
        if not self.path.is_dir():
            raise RunDirError(f"--out-dir {self.path} is not a directory")
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    owner = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                    raise RunDirError(f"another gpt.train (pid {owner}) is writing to {self.path}; wait for it "
                                      "to finish, or choose another --out-dir") from None
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            remove_stale_temps(self.path)  # no other writer can be here now
            yield self
        finally:
            os.close(fd)  # releases the lock (so does the process dying)
            if created and [p.name for p in self.path.iterdir()] == [self._lock.name]:
                # a run that failed before writing anything leaves no empty folder behind
                with contextlib.suppress(OSError):
                    self._lock.unlink()
                    self.path.rmdir()

    def checkpoints(self):
        """The checkpoints present (a symlink counts: replacing it would still lose what it names)."""
        return [p for p in (self.ckpt, self.best, self.adapter) if p.is_file() or p.is_symlink()]

    def check_fresh(self, overwrite: bool) -> None:
        """A new run starts here: refuse if another run's checkpoints are here, unless told to
        delete them; an old metrics.jsonl and loss.png go either way (they belong to no checkpoint)."""
        found = self.checkpoints()
        if found and not overwrite:
            raise RunDirError(
                f"{self.path} holds another run's checkpoint ({', '.join(p.name for p in found)}). Continue it "
                f"with --resume, start over with --overwrite (deletes it), or choose another --out-dir")
        for p in found + [self.metrics, self.plot]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def open_metrics(self, resume_step=None):
        """(the history rows kept, an append-only file for new rows). On resume the rows after the
        checkpoint's step are dropped: those steps are about to be trained again."""
        rows = []
        if self.metrics.is_symlink():  # never write through a link planted in the out-dir
            raise RunDirError(f"{self.metrics} is a symbolic link; remove it (the run writes its metrics there)")
        if resume_step is not None and self.metrics.is_file():
            with open(self.metrics, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        row = json.loads(line, parse_constant=_reject)
                    except ValueError:
                        continue  # a line cut short by a kill
                    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= resume_step:
                        rows.append(row)
            atomic_write_bytes(self.metrics, "".join(json.dumps(r) + "\n" for r in rows).encode())
        fd = os.open(self.metrics, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _NOFOLLOW, 0o644)
        return rows, MetricsFile(os.fdopen(fd, "a", encoding="utf-8"))


class MetricsFile:
    """metrics.jsonl: one JSON object a line; non-finite numbers written as null (valid JSON)."""

    def __init__(self, f):
        self._f = f

    def write(self, row: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._f.write(json.dumps(clean) + "\n")

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _reject(constant):
    raise ValueError(f"not a number: {constant}")


class RunLog:
    """Everything a run reports, in one place: messages (stderr, above the bar), progress (a
    tqdm bar on a terminal; one plain line every --log-interval steps otherwise, e.g. a log
    file), and the metrics rows (metrics.jsonl, kept in memory too for the plot)."""

    def __init__(self, cfg):
        self.cfg, self.bar, self.metrics, self.history = cfg, None, None, []

    def open(self, run: RunDir, start_step: int, resumed: bool):
        self.history, self.metrics = run.open_metrics(start_step if resumed else None)
        if self.cfg.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.cfg.max_iters, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr)

    def message(self, msg):
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _row(self, row):
        self.metrics.write(row)
        self.history.append(row)

    def step(self, row):
        self._row(row)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tok_per_s']:,.0f}",
                                 refresh=False)
        elif row["step"] % self.cfg.log_interval == 0:
            self.message(f"step {row['step']} | loss {row['loss']:.4f} | lr {row['lr']:.2e} | "
                         f"{row['ms']:.1f} ms/step | {row['tok_per_s']:,.0f} tok/s")

    def eval(self, row):
        self._row(row)
        self.flush()
        self.message(f"step {row['step']}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
                     f"val {row['val_bpc']:.3f} bits/char")

    def flush(self):
        if self.metrics is not None:
            self.metrics.flush()

    def close_bar(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self):
        self.close_bar()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
