"""Data-parallel training: what each rank of ``mpiexec -n N python -m gpt.train`` does.

* Every rank builds the data, the model and the optimizer; rank 0 (which alone resolves the
  configuration, locks the out-dir and reads a checkpoint) then broadcasts its state (weights,
  optimizer state, step, RNG states, loss scale), so every rank starts identical.
* Each step every rank draws the SAME N·B·grad_accum window starts from the one batch generator
  and trains on its own share of them; one all-reduce averages the gradients (and the loss, and
  the ranks' stop requests; ``tinytensor.distributed.GradientAverager``). N ranks with batch B
  are therefore one process with batch N·B, to rounding, and the batch generator's state is the
  same on every rank and in a single-process run: a checkpoint resumes on any number of ranks
  (keep N·B: 2 ranks at --batch-size 4 continue as 1 at --batch-size 8, and back).
* Dropout masks: rank r draws from tinytensor's generator jumped r·2^127 draws ahead of rank 0's,
  so ranks drop different units; rank 0's state is the one saved, and resuming on the same
  number of ranks is exact. (With dropout, N ranks are not bit-equal to one process.)
* Only rank 0 prints, evaluates, samples, plots and writes checkpoints and metrics; the others
  wait for it at each evaluation (without a deadline: an evaluation may take long).
* A failure that every rank sees (a NaN loss: the loss is all-reduced) ends every rank with the
  same code, and rank 0 says why; any other failure is printed by the rank that met it, which
  then ends (the launcher ends the others). A rank that dies is noticed by the launcher, or by the
  others' watchdog after --dist-timeout seconds.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np

import tinytensor as tt
from tinytensor.backend import to_numpy
from tinytensor.distributed import Communicator, DistributedError, GradientAverager, connect, launched_size

from .config import UsageError

def resolve_dist(kind: str, backend: str) -> str:
    """--dist auto: data-parallel when an MPI launcher started more than one process (NCCL on
    GPUs, MPI on the CPU), else a single process; an explicit choice is kept."""
    if kind == "auto":
        return "none" if launched_size() == 1 else ("nccl" if backend == "cupy" else "mpi")
    return kind


def connect_ranks(cfg) -> Communicator:
    """The communicator of this run (``cfg.dist``, ``cfg.backend``, ``cfg.dist_timeout``)."""
    kind = resolve_dist(cfg.dist, cfg.backend)
    if kind == "none" and launched_size() > 1:
        raise UsageError(f"--dist none, but an MPI launcher started {launched_size()} processes: they would all "
                         "train alone in one --out-dir. Use --dist auto (or mpi/nccl), or run without mpiexec")
    try:
        return connect(kind, cfg.backend, cfg.dist_timeout)
    except DistributedError as exc:
        raise UsageError(str(exc)) from None


class QuietLog:
    """The run log of a rank other than 0: rank 0 reports the run, the others say nothing."""

    history = ()

    def open(self, *args, **kwargs):
        pass

    def message(self, msg):
        pass

    def step(self, row):
        pass

    def eval(self, row):
        pass

    def flush(self):
        pass

    def close_bar(self):
        pass

    def close(self):
        pass


class DataParallel:
    """The trainer's view of the ranks (one rank, size 1, when the run is a single process)."""

    def __init__(self, comm: Communicator | None = None):
        self.comm = comm or Communicator()
        self.rank, self.size, self.is_root = self.comm.rank, self.comm.size, self.comm.is_root
        self._averager = GradientAverager(self.comm) if self.size > 1 else None
        self.stop, self._stop_agreed = None, False  # the run's StopRequest (set by Trainer.run)

    def describe(self) -> str:
        return "" if self.size == 1 else f", data-parallel on {self.size} ranks ({self.comm.name})"

    @contextlib.contextmanager
    def root_first(self):
        """Rank 0 runs the block first (e.g. prepares the dataset in the shared data dir), then the others."""
        if not self.is_root:
            self.comm.wait_for_root()
        yield
        if self.is_root:
            self.comm.wait_for_root()

    def wait_for_root(self):
        self.comm.wait_for_root()

    def global_batch_size(self, batch_size: int) -> int:
        return batch_size * self.size

    def local_batch(self, x, y, grad_accum: int):
        """This rank's rows of a global batch of grad_accum·N·B rows: micro-batch k of rank r is
        part of the single process's micro-batch k (rows viewed as (grad_accum, N, B))."""
        if self.size == 1:
            return x, y
        shape = (grad_accum, self.size, -1, x.shape[-1])
        return tuple(np.ascontiguousarray(a.reshape(shape)[:, self.rank].reshape(-1, x.shape[-1])) for a in (x, y))

    def grad_sync(self):
        """``train_step``'s hook (None for one rank): averages gradients and loss, agrees on stopping."""
        if self._averager is None:
            return None

        def sync(params, loss_total):
            requested = self.stop is not None and self.stop.requested
            loss_total, self._stop_agreed = self._averager(params, loss_total, requested)
            return loss_total
        return sync

    def stop_requested(self, stop) -> bool:
        """Whether to stop after this step: on several ranks, what they agreed in its all-reduce."""
        return stop.requested if self.size == 1 else self._stop_agreed

    # -- the start: every rank gets rank 0's state ---------------------------------------------------------
    def start(self, trainer) -> None:
        if self.size == 1:
            return
        state = _training_state(trainer) if self.is_root else None
        state = self.comm.bcast_object(state)
        if not self.is_root:
            trainer.model.load_state_dict({k: tt.backend.to_backend(v, trainer.cfg.backend)
                                           for k, v in state["model"].items()})
            trainer.optimizer.load_state_dict(state["optimizer"])
            trainer.step, trainer.elapsed = state["step"], state["elapsed"]
            trainer.batch_rng.bit_generator.state = state["batches"]
            if trainer.mixed is not None:
                trainer.mixed.scaler.load_state_dict(state["loss_scale"])
                trainer.mixed.refresh()
            generator = np.random.PCG64()
            generator.state = state["tinytensor"]
            tt.set_rng_state(generator.jumped(self.rank).state)


def _training_state(trainer) -> dict:
    return {"model": {k: to_numpy(v) for k, v in trainer.model.state_dict().items()},
            "optimizer": _on_host(trainer.optimizer.state_dict()), "step": trainer.step, "elapsed": trainer.elapsed,
            "batches": trainer.batch_rng.bit_generator.state, "tinytensor": tt.get_rng_state(),
            "loss_scale": None if trainer.mixed is None else trainer.mixed.scaler.state_dict()}


def _on_host(obj):
    if isinstance(obj, dict):
        return {k: _on_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_on_host(v) for v in obj]
    return to_numpy(obj) if hasattr(obj, "shape") and not isinstance(obj, np.generic) else obj


def fail(comm: Communicator | None, message: str, code: int, all_ranks: bool = False) -> int:
    """Report an error and return the exit code. With several ranks: an error every rank met
    (``all_ranks``) is printed by rank 0 and every rank exits with ``code``; any other is printed
    by the rank that met it, which then ends all ranks, so none waits forever."""
    if comm is None or comm.size == 1:
        print(message, file=sys.stderr)
        return code
    if all_ranks:
        if comm.is_root:
            print(message, file=sys.stderr)
        return code
    print(message if comm.is_root else f"{message} (rank {comm.rank} of {comm.size})", file=sys.stderr, flush=True)
    comm.abort(code)
    return code
