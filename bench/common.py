"""What the benchmarks share: the command line, a preset's model, the PyTorch peer when
it is installed, the sides timed in turns, the machine the numbers come from, the result.

>>> cfg, batch = model_config("tiny")
>>> (cfg.n_layer, cfg.vocab_size, batch)
(2, 65, 8)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np

from gpt.config import PRESETS, TrainConfig
from gpt.model import GPTConfig

VOCAB = 65  # Tiny Shakespeare's characters
TORCH_PIN = "torch==2.13.0"  # setup.cfg's `torch` extra


def parser(prog: str, doc: str, preset: str, quick: str, backend: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark has: --preset, --backend (``backend``), --no-torch,
    --quick (``quick`` says what it runs) and --json; the program adds its own."""
    ap = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    ap.add_argument("--preset", default=preset, choices=sorted(PRESETS))
    if backend:
        ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--no-torch", action="store_true", help="measure tinytensor only")
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--json", help="also write the results to this file")
    return ap


def finish(result: dict, json_path: str | None) -> dict:
    """Write ``result`` to ``json_path`` (if given) and return it: the end of every main()."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def model_config(preset: str, vocab_size: int = VOCAB) -> tuple[GPTConfig, int]:
    """(the GPTConfig of a gpt.config preset, its batch size)."""
    train = dataclasses.replace(TrainConfig(), **PRESETS[preset])
    return train.model_config(vocab_size), train.batch_size


def import_torch(no_torch: bool = False):
    """The torch module, or None: with ``no_torch``, or after one line on stderr when it
    is not installed (the benchmark then measures tinytensor alone)."""
    if no_torch:
        return None
    try:
        import torch
    except ImportError:
        print(f"torch is not installed (pip install {TORCH_PIN}): measuring tinytensor only", file=sys.stderr)
        return None
    return torch


def take_turns(sides, rounds: int, pause: float = 0.5):
    """Yield ``(round, side)``: each side once a round, in reverse order every other round
    (A B, B A, A B, ...), each turn after ``pause`` seconds. Both libraries' worker threads
    spin for a while after their last call, and a side timed while the other's threads still
    spin on the same cores looks slower than it is (this once showed 0.63x PyTorch for 1.35x)."""
    sides = list(sides)
    for turn in range(rounds):
        for side in (sides if turn % 2 == 0 else sides[::-1]):
            time.sleep(pause)
            yield turn, side


# the environment variables that change how either side uses the cores
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "NUMBA_NUM_THREADS",
              "NUMBA_THREADING_LAYER", "TINYTENSOR_KERNELS", "TINYTENSOR_THREADS", "TINYTENSOR_PARALLEL_MIN")


def describe_machine(info: dict) -> str:
    """``machine()`` as the line a benchmark prints first."""
    env = " ".join(f"{k}={v}" for k, v in info["env"].items()) or "no thread variables set"
    return (f"{info['cpu']}, {info['cores']} cores; threads {info['threads']}; {env}; {info['kernels']}; "
            f"{info.get('allocator', '')} (both sides: one process)")


def machine(torch=None) -> dict:
    """What the numbers were measured on: the CPU model, its cores, the libraries' versions
    and the threads each computes with (a comparison needs them equal)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info
        blas = max((i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"), default=None)
    except ImportError:
        blas = None
    from tinytensor import kernels, memory
    k = kernels.module()
    info = {"cpu": cpu or "unknown", "cores": os.cpu_count(), "numpy": np.__version__,
            "threads": {"numpy_blas": blas}, "kernels": kernels.describe(), "allocator": memory.describe(),
            "env": {name: os.environ[name] for name in THREAD_ENV if name in os.environ}}
    if k is not None:
        import numba
        info["threads"]["numba"] = numba.get_num_threads()
    if torch is not None:
        info["torch"] = torch.__version__
        info["threads"]["torch"] = torch.get_num_threads()
    return info
