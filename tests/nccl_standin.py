"""``cupy.cuda.nccl`` for the CuPy stand-in (tests/cupy_standin.py installs it): the calls
``tinytensor.distributed.NcclCommunicator`` makes, held to NCCL's contract, reducing over MPI.

What it checks, as NCCL would (an error, or wrong numbers, where NCCL would give them):
- ``get_unique_id()`` is a tuple of 128 signed chars (as CuPy returns it), and every rank
  passes the SAME id to ``NcclCommunicator(ndev, id, rank)``, with ``ndev`` the number of ranks and
  ``rank`` this process's MPI rank: it compares the ids across ranks (NCCL would hang or mix jobs).
- ``allReduce(sendbuf, recvbuf, count, datatype, op, stream)`` gets raw pointers: it reads
  ``count`` elements of ``datatype`` at the address, as NCCL reads device memory, so a wrong
  pointer, count or dtype code gives wrong sums here too; only ``NCCL_SUM`` is offered.

What it cannot show (only a GPU can): NCCL's own transport (NVLink, PCIe, InfiniBand), the
ordering of the all-reduce on the CUDA stream after the backward kernels (here every call
completes at once), one GPU per rank, ``abort()`` freeing a kernel stuck on a dead peer, speed.
"""
from __future__ import annotations

import ctypes
import os

import numpy as np

NCCL_UNIQUE_ID_BYTES = 128
NCCL_SUM = 0
# ncclDataType_t as nccl.h numbers them
NCCL_FLOAT16, NCCL_FLOAT32, NCCL_FLOAT64 = 6, 7, 8
_DTYPES = {NCCL_FLOAT16: np.float16, NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}
available = True


class NcclError(RuntimeError):
    """As cupy.cuda.nccl.NcclError."""


def get_unique_id():
    return tuple(b - 256 if b > 127 else b for b in os.urandom(NCCL_UNIQUE_ID_BYTES))


def _mpi():
    from mpi4py import MPI
    return MPI


def _view(ptr: int, count: int, datatype: int) -> np.ndarray:
    dtype = np.dtype(_DTYPES[datatype])
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count)


class NcclCommunicator:
    def __init__(self, ndev: int, commId: tuple, rank: int):
        MPI = _mpi()
        self._comm = MPI.COMM_WORLD
        if not (isinstance(commId, tuple) and len(commId) == NCCL_UNIQUE_ID_BYTES
                and all(isinstance(c, int) and -128 <= c < 128 for c in commId)):
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: commId must be get_unique_id()'s 128 signed chars")
        if ndev != self._comm.Get_size() or rank != self._comm.Get_rank():
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: ndev {ndev}, rank {rank} for MPI rank "
                            f"{self._comm.Get_rank()} of {self._comm.Get_size()}")
        if len(set(self._comm.allgather(commId))) != 1:
            raise NcclError("NCCL_ERROR_INVALID_USAGE: the ranks passed different unique ids")
        self.aborted = False

    def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int, stream: int):
        if self.aborted:
            raise NcclError("NCCL_ERROR_INVALID_USAGE: the communicator was aborted")
        if datatype not in _DTYPES or op != NCCL_SUM or not isinstance(stream, int) or count < 0:
            raise NcclError(f"NCCL_ERROR_INVALID_ARGUMENT: datatype {datatype}, op {op}, count {count}")
        MPI = _mpi()
        total = _view(sendbuf, count, datatype).copy()
        self._comm.Allreduce(MPI.IN_PLACE, total, op=MPI.SUM)
        _view(recvbuf, count, datatype)[...] = total

    def size(self):
        return self._comm.Get_size()

    def rank_id(self):
        return self._comm.Get_rank()

    def abort(self):
        self.aborted = True

    def destroy(self):
        pass
