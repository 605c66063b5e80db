"""Data-parallel scaling here: step time and tokens/s of 1 and 2 ranks, and the all-reduce alone.

    python -m bench.dist_scaling --input ../shared/data/tinyshakespeare.txt      # shakespeare_char_cpu
    python -m bench.dist_scaling --quick --input FILE                            # a few steps, for CI

Each configuration is ``python -m gpt.train`` (under ``mpiexec -n N`` for N ranks) for --steps
steps; its step time is the median of rank 0's per-step ``ms`` in metrics.jsonl after the first
five steps (rank 0 times the whole step, the all-reduce and the wait for the slower rank
included). The threads per rank are set with OPENBLAS_NUM_THREADS/OMP_NUM_THREADS. The
configurations run in turns (A B C D, D C B A, ...) so that a busy machine skews them alike.
``--allreduce`` times MPI_Allreduce of float32 buffers of the small and the full preset's
parameter counts between 2 ranks (the bandwidth and latency the cost model in
bench/RESULTS.md starts from).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import VOCAB, finish, machine, model_config, parser, take_turns

REPO = Path(__file__).resolve().parents[1]


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


# (name, ranks, threads per rank, batch per rank as a multiple of the preset's)
# (one rank with two threads on batch 2B is the same global batch as two ranks of one thread each)
CONFIGS = [("1 rank x 1 thread, batch B", 1, 1, 1), ("2 ranks x 1 thread, batch B each", 2, 1, 1),
           ("1 rank x 2 threads, batch 2B", 1, 2, 2)]


def run_config(ranks, threads, batch, args, steps, tmp):
    out = Path(tmp) / f"r{ranks}t{threads}b{batch}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": str(threads),
           "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "gpt.train", *args, "--batch-size", str(batch), "--max-iters", str(steps),
           "--eval-interval", str(10**9), "--eval-iters", "1", "--sample-tokens", "0", "--save-checkpoints", "false",
           "--progress", "false", "--out-dir", str(out), "--overwrite"]
    if ranks > 1:
        cmd = [_mpiexec(), "-n", str(ranks)] + cmd
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr[-500:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ms = [r["ms"] for r in rows if r["kind"] == "train"][5:]
    return statistics.median(ms)


def allreduce_worker(reps: int):
    """Run under mpiexec: time Allreduce of the small and the full preset's gradient buffers."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    result = {}
    for preset in ("shakespeare_char_cpu", "shakespeare_char"):
        cfg, _ = model_config(preset, VOCAB)
        buf = np.ones(cfg.num_parameters("gpt") + 2, np.float32)
        times = []
        for _ in range(reps + 2):
            comm.Barrier()
            t = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - t)
        result[preset] = {"bytes": buf.nbytes, "ms": 1e3 * statistics.median(times[2:])}
    tiny = np.ones(2, np.float32)
    times = []
    for _ in range(200):
        comm.Barrier()
        t = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, tiny, op=MPI.SUM)
        times.append(time.perf_counter() - t)
    result["8 bytes"] = {"bytes": 8, "ms": 1e3 * statistics.median(times[10:])}
    if comm.Get_rank() == 0:
        print(json.dumps(result))


# -- the cost model of bench/RESULTS.md: every assumption named here ---------------------------------------------
# (bus bandwidth an all-reduce of ~43 MB reaches, latency per ring step); a ring all-reduce of S bytes over N ranks
# sends 2(N-1)/N * S through every link in 2(N-1) steps
LINKS = {"NVLink (H100 SXM, NVSwitch)": (350e9, 5e-6),
         "100 Gb/s Ethernet (RoCE, 1 NIC per node)": (10e9, 20e-6)}
PCIE_BYTES_PER_S = 25e9  # host staging (--dist mpi on CuPy): the buffer crosses PCIe twice per step


def ring_allreduce_s(nbytes: float, ranks: int, bandwidth: float, latency: float) -> float:
    """Seconds for a ring all-reduce: 2(N-1)/N * bytes / bandwidth + 2(N-1) * latency."""
    if ranks == 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency


def cost_model(gpu_step_ms: float, preset: str = "shakespeare_char") -> list[dict]:
    """Predicted step time and tokens/s of ``preset`` on 1, 8 and 64 GPUs per link, weak scaling
    (the preset's batch on every GPU), one all-reduce after backward (no overlap), plus the
    evaluation that only rank 0 runs, spread over the steps between evaluations."""
    cfg, batch = model_config(preset)
    train = dict(eval_iters=200, eval_interval=250)  # the preset's (gpt/config.py)
    nbytes = 4 * (cfg.num_parameters("gpt") + 2)
    tokens = batch * cfg.block_size
    # an evaluation: 2 splits x eval_iters forward passes, a forward ~ 1/3 of a training step
    eval_ms = 2 * train["eval_iters"] * gpu_step_ms / 3 / train["eval_interval"]
    rows = []
    for link, (bandwidth, latency) in LINKS.items():
        for n in (1, 8, 64):
            ar_ms = 1e3 * ring_allreduce_s(nbytes, n, bandwidth, latency)
            step = gpu_step_ms + ar_ms
            rows.append({"link": link, "gpus": n, "allreduce_ms": round(ar_ms, 2), "step_ms": round(step, 1),
                         "tokens_per_s": round(n * tokens / step * 1e3), "efficiency": round(gpu_step_ms / step, 3),
                         "step_ms_with_eval": round(step + eval_ms, 1),
                         # --dist mpi on CuPy: the same network, plus the copies to and from the host (over
                         # NVLink it would not be the same network: MPI's host path does not use NVLink)
                         "staged_step_ms": round(step + 2e3 * nbytes / PCIE_BYTES_PER_S, 1)
                         if n > 1 and "Ethernet" in link else None})
    return rows


def main(argv=None):
    ap = parser("python -m bench.dist_scaling", __doc__, "shakespeare_char_cpu", "5+10 steps, one round",
                backend=False)
    ap.add_argument("--input", help="text to train on (default: the preset's dataset)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--allreduce", action="store_true", help="also time the all-reduce alone (2 ranks)")
    ap.add_argument("--allreduce-worker", type=int, help=argparse_hidden())
    ap.add_argument("--model", type=float, metavar="GPU_STEP_MS",
                    help="print the cost model for 8 and 64 GPUs, given one GPU's step time of the full preset")
    a = ap.parse_args(argv)
    if a.model:
        rows = cost_model(a.model)
        print(json.dumps(rows, indent=1))
        return finish({"gpu_step_ms": a.model, "rows": rows}, a.json) and 0
    if a.allreduce_worker:
        return allreduce_worker(a.allreduce_worker)
    if _mpiexec() is None:
        print("no mpiexec: pip install -e '.[mpi]'", file=sys.stderr)
        return 1
    steps, rounds = (15, 1) if a.quick else (a.steps, a.rounds)
    _, batch = model_config(a.preset)
    args = ["--preset", a.preset] + (["--input", a.input] if a.input else [])
    times = {name: [] for name, *_ in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for _, (name, ranks, threads, mult) in take_turns(CONFIGS, rounds):
            ms = run_config(ranks, threads, batch * mult, args, steps, tmp)
            times[name].append(ms)
            print(f"{name}: {ms:.1f} ms/step", file=sys.stderr)
    cfg, _ = model_config(a.preset)
    result = {"preset": a.preset, "steps": steps, "rounds": rounds, "machine": machine(), "configs": {}}
    for name, ranks, threads, mult in CONFIGS:
        ms = statistics.median(times[name])
        tokens = ranks * batch * mult * cfg.block_size
        result["configs"][name] = {"ranks": ranks, "threads_per_rank": threads, "batch_per_rank": batch * mult,
                                   "ms_per_step": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3),
                                   "all_ms": [round(t, 2) for t in times[name]]}
    if a.allreduce:
        proc = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-m", "bench.dist_scaling",
                               "--allreduce-worker", "20"], env={**os.environ, "PYTHONPATH": str(REPO)},
                              capture_output=True, text=True, timeout=600)
        result["allreduce_2_ranks"] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(result, indent=1))
    return finish(result, a.json) and 0


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
