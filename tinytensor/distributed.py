"""Data-parallel communication: one interface over MPI (mpi4py) and NCCL (cupy.cuda.nccl).

Every process (a *rank*) holds the whole model and computes gradients on its own data; a
step averages them with ONE all-reduce of one flat buffer (:class:`GradientAverager`), so
every rank takes the same optimizer step. The transports are the well-kept engines, not a
home-made one: MPI through ``mpi4py`` (NumPy arrays directly; CuPy arrays staged through the
host), and NCCL through CuPy for GPUs (its unique id is broadcast over MPI, so MPI starts the
processes either way). Nothing here imports mpi4py or NCCL until a communicator is made:
a single process needs neither.

>>> comm = connect("none", "numpy")         # the single-process one: no MPI needed
>>> comm.rank, comm.size, comm.is_root
(0, 1, True)
>>> buf = np.ones(3, np.float32); comm.allreduce_mean_(buf); buf.tolist()
[1.0, 1.0, 1.0]

Under ``mpiexec -n 2 python ...``, ``connect("mpi", "numpy")`` gives rank 0 and 1 of 2.
A collective that gets no answer within ``timeout`` seconds (a rank died or hangs) ends
the whole job with a message instead of waiting forever (a watchdog thread, as PyTorch's
NCCL watchdog does).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import time

import numpy as np

from .backend import get_xp, to_numpy, xp_of

# environment variables by which MPI launchers announce the number of processes they started
# (MPICH/Intel MPI's Hydra, Open MPI, MVAPICH): decides --dist auto without importing MPI
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
EXIT_TIMEOUT = 1


class DistributedError(RuntimeError):
    """The ranks cannot work together (MPI missing, a mismatched launcher, NCCL unavailable)."""


def launched_size() -> int:
    """How many processes an MPI launcher says it started (1 when not under one)."""
    for var in LAUNCHER_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


class Communicator:
    """The interface, and the single-process communicator (every collective is the identity).

    ``allreduce_mean_(buf)`` averages a flat buffer over the ranks in place (on CuPy the
    result may still be in flight: read it inside ``watching``); ``bcast_object`` sends a
    Python object from rank 0 to all; ``wait_for_root`` is a barrier that the other ranks wait
    at without a deadline while rank 0 evaluates and saves; ``watching(what)`` bounds the time
    of the collectives inside it; ``abort(code)`` ends this rank, and so the job."""

    name = "none"
    rank, size, local_rank = 0, 1, 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_mean_(self, buf) -> None:
        pass

    def bcast_object(self, obj):
        return obj

    def wait_for_root(self) -> None:
        pass

    @contextlib.contextmanager
    def watching(self, what: str):
        yield

    def abort(self, code: int) -> None:
        sys.exit(code)


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(f"data-parallel training needs mpi4py and an MPI library ({exc}); "
                               'install them with pip install -e ".[mpi]" (mpi4py and the mpich wheel)') from None
    return MPI


class MpiCommunicator(Communicator):
    """MPI_COMM_WORLD through mpi4py. NumPy buffers are reduced in place; CuPy buffers are
    copied to the host, reduced there and copied back (host staging: works with any MPI, at
    the price of two copies over PCIe per step; NCCL avoids them)."""

    name = "mpi"

    def __init__(self, backend: str = "numpy", timeout: float = 600.0):
        self.rank, self.size = -1, launched_size()  # until MPI says
        # first: MPI's start-up waits for every rank too. (Not MPI_Init itself: mpi4py runs it while
        # importing, holding Python's lock, so no thread runs until it returns; a rank that hangs
        # before it has started MPI keeps the others waiting there. The launcher sees a rank that dies.)
        self._watchdog = _Watchdog(timeout, self)
        with self.watching("the MPI start-up"):
            MPI = _import_mpi()
            self._MPI, self.comm = MPI, MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
            # (other launchers, e.g. srun, set none of the variables: nothing to compare then)
            if launched_size() > 1 and launched_size() != self.size:
                raise DistributedError(
                    f"the launcher started {launched_size()} processes but MPI sees {self.size}: the mpiexec on PATH "
                    f"does not belong to the MPI library mpi4py loads ({MPI.Get_library_version().splitlines()[0]}); "
                    "use that library's mpiexec (pip's mpich wheel puts it next to python)")
            # ranks on this machine, for choosing a GPU each
            self.local_rank = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        if backend == "cupy":
            _use_gpu(self.local_rank)
        self.xp = get_xp(backend)

    def allreduce_mean_(self, buf) -> None:
        host = buf if self.xp is np else to_numpy(buf)
        self.comm.Allreduce(self._MPI.IN_PLACE, host, op=self._MPI.SUM)
        host *= host.dtype.type(1.0 / self.size)
        if host is not buf:
            buf[...] = self.xp.asarray(host)

    def bcast_object(self, obj):
        with self.watching("a broadcast from rank 0"):
            return self.comm.bcast(obj, root=0)

    def wait_for_root(self) -> None:
        # a barrier polled with sleeps, not a blocking one: MPI's blocking waits spin, which would
        # take a core from rank 0 for as long as its evaluation runs. Rank 0 arrives last, so
        # only its wait has a deadline (the others' lasts as long as its evaluation)
        request, pause = self.comm.Ibarrier(), 1e-4
        with self.watching("a barrier after rank 0's evaluation") if self.is_root else contextlib.nullcontext():
            while not request.Test():
                time.sleep(pause)
                pause = min(2 * pause, 0.01)

    def watching(self, what: str):
        return self._watchdog.watching(what)

    def abort(self, code: int) -> None:
        """End this rank at once; the launcher (mpiexec of MPICH or Open MPI) then ends the others,
        and where it would not, their watchdogs do. Not MPI_Abort: its request to the launcher
        travels beside the rank's output, which the launcher may drop in its clean-up (the one line
        saying why was lost so in a test), and in one run called from the watchdog while the main
        thread was inside MPI, the job went on spinning after it. A plain exit reaches the
        launcher after the output written before it."""
        _exit(code)


class NcclCommunicator(MpiCommunicator):
    """NCCL for the gradient buffer (GPU to GPU, no host copies), MPI for everything else
    (starting the processes, the unique id, objects, barriers). One GPU per rank: rank r on
    this machine uses device r modulo the devices it sees."""

    name = "nccl"

    def __init__(self, backend: str = "cupy", timeout: float = 600.0):
        super().__init__(backend, timeout)
        try:  # CuPy's module imports without NCCL too, then saying available = False
            nccl = importlib.import_module("cupy.cuda.nccl")
            if not getattr(nccl, "available", False):
                raise ImportError("cupy.cuda.nccl.available is False")
        except ImportError as exc:
            raise DistributedError(f"this CuPy has no NCCL ({exc}); install NCCL for CuPy (its install guide, "
                                   "'Additional CUDA Libraries'), or use --dist mpi") from None
        self.nccl = nccl
        uid = nccl.get_unique_id() if self.is_root else None
        with self.watching("the NCCL set-up"):
            uid = self.comm.bcast(uid, root=0)
            self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._dtypes = {np.dtype(name): getattr(nccl, code) for name, code in
                        (("float16", "NCCL_FLOAT16"), ("float32", "NCCL_FLOAT32"), ("float64", "NCCL_FLOAT64"))}

    def allreduce_mean_(self, buf) -> None:
        if buf.dtype not in self._dtypes or not buf.flags.c_contiguous:
            raise ValueError(f"NCCL all-reduce: a contiguous float16/32/64 buffer, got {buf.dtype}")
        stream = self.xp.cuda.get_current_stream()
        # queued on the stream after the backward kernels; the caller's read of the result waits for it
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtypes[buf.dtype],
                                 self.nccl.NCCL_SUM, stream.ptr)
        buf *= buf.dtype.type(1.0 / self.size)


class _Watchdog:
    """Ends the job when a collective inside ``watching`` takes longer than ``timeout``
    seconds: a rank that died or hangs would otherwise keep every other rank waiting
    forever. One daemon thread per process; arming it costs a lock, not a thread."""

    def __init__(self, timeout: float, comm: MpiCommunicator):
        self.timeout, self.comm = float(timeout), comm
        self._cond = threading.Condition()
        self._deadline, self._what = None, ""
        threading.Thread(target=self._run, name="tinytensor-watchdog", daemon=True).start()

    @contextlib.contextmanager
    def watching(self, what: str):
        with self._cond:
            self._deadline, self._what = time.monotonic() + self.timeout, what
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._deadline = None

    def _run(self):
        with self._cond:
            while True:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                break
        rank = self.comm.rank if self.comm.rank >= 0 else "?"
        os.write(2, (f"error: rank {rank} of {self.comm.size}: {self._what} got no answer within "
                     f"{self.timeout:g} s (--dist-timeout): another rank died or hangs; stopping all ranks. "
                     "The last checkpoint written is intact; continue with --resume\n").encode())
        # the process ends with its GPU context (a kernel stuck on a dead peer included); see abort()
        self.comm.abort(EXIT_TIMEOUT)


def _exit(code: int) -> None:
    """Flush what this process printed and end it now, MPI and all (no finalize, no atexit)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


COMMUNICATORS = {"none": Communicator, "mpi": MpiCommunicator, "nccl": NcclCommunicator}


def connect(kind: str, backend: str, timeout: float = 600.0) -> Communicator:
    """The communicator ``kind`` ("none", "mpi" or "nccl") for arrays of ``backend``. On CuPy
    each rank first picks its own GPU (before anything is allocated on one)."""
    if kind not in COMMUNICATORS:
        raise DistributedError(f"unknown communicator {kind!r}; choose one of {', '.join(COMMUNICATORS)}")
    if kind == "none":
        return Communicator()
    if kind == "nccl" and backend != "cupy":
        raise DistributedError("NCCL reduces GPU arrays: --dist nccl needs --backend cupy (or use --dist mpi)")
    return COMMUNICATORS[kind](backend, timeout)


def _use_gpu(local_rank: int) -> None:
    """Rank r on a machine uses GPU r modulo the GPUs it sees (NCCL needs one GPU per rank).
    Chosen before ``backend.get_xp`` runs its start-up kernel, so that no rank makes a context
    on GPU 0 it does not use; the one place outside backend.py that imports CuPy itself."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError:
        get_xp("cupy")  # raises the backend's install hint
        raise
    cupy.cuda.Device(local_rank % cupy.cuda.runtime.getDeviceCount()).use()


class GradientAverager:
    """Averages the gradients of the parameters over the ranks with ONE all-reduce per step,
    of one flat buffer that also carries two numbers: the step's loss (so every rank logs
    the mean loss, and a NaN on any rank stops all of them at the same step) and each rank's
    stop request (so a Ctrl-C that reaches one rank, or reaches them at different moments,
    stops all of them after the same step). Afterwards each ``.grad`` is a view of the buffer.

    >>> avg = GradientAverager(connect("none", "numpy"))
    >>> loss_total, stop = avg(model.parameters(), loss_total, stop_requested=False)  # doctest: +SKIP
    """

    def __init__(self, comm: Communicator):
        self.comm = comm

    def __call__(self, params, loss_total, stop_requested: bool):
        params = [p for p in params if p.grad is not None]  # None on one rank is None on all
        if not params:
            raise ValueError("GradientAverager: no parameter has a gradient")
        xp, dtype = xp_of(params[0].grad), params[0].grad.dtype
        if any(p.grad.dtype != dtype for p in params):
            dtypes = sorted({str(p.grad.dtype) for p in params})
            raise ValueError(f"GradientAverager: gradients of one dtype, got {dtypes}")
        # the loss rides in the gradients' dtype: float32 rounds it by at most 6e-8 relative
        tail = xp.stack([xp.asarray(loss_total).astype(dtype), xp.asarray(float(bool(stop_requested)), dtype=dtype)])
        buf = xp.concatenate([p.grad.reshape(-1) for p in params] + [tail])
        with self.comm.watching("the gradient all-reduce"):
            self.comm.allreduce_mean_(buf)
            loss, stop = (float(v) for v in to_numpy(buf[-2:]))  # the one read back (it waits for NCCL)
        offset = 0
        for p in params:
            n = p.grad.size
            p.grad = buf[offset:offset + n].reshape(p.grad.shape)
            offset += n
        return loss, stop > 0
