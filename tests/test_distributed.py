"""Data-parallel training (gpt/distributed.py, tinytensor/distributed.py): real ranks started
by ``mpiexec -n 2`` (the mpich wheel of the test extras), on a tiny model and generated text.

* 2 ranks at batch B train exactly like 1 process at batch 2B (losses to 1e-6 over 20 steps), on
  NumPy over MPI, and on the CuPy stand-in over MPI (host staging) and over NCCL (the stand-in's
  NCCL reduces over MPI: it checks the calls, not a GPU; see tests/nccl_standin.py);
* a checkpoint resumes on another number of ranks (2 -> 1 -> 2) exactly;
* Ctrl-C (to mpiexec, or to one rank only), a killed rank and a hung rank stop every rank in
  bounded time, and the last checkpoint stays intact and resumable.
Each test bounds its processes' time and kills what is left. Without mpiexec or mpi4py the
tests skip; the checks that need no MPI (options, no mpi4py import in one process) always run.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cupy_standin
import gpt.data
import tinytensor as tt
from gpt import train as train_cli
from gpt.checkpoint import TrainingState
from textgen import make_text
from tinytensor.distributed import LAUNCHER_SIZE_VARS, Communicator, GradientAverager, launched_size

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
LIMIT_S = 120  # no launch here needs more than a few seconds; a hang fails the test instead of the suite


def _mpiexec():
    """The mpiexec that belongs to this Python's mpi4py (the wheel puts it next to python)."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


def _mpi_or_skip():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install -e '.[mpi]')")
    if _mpiexec() is None:
        pytest.skip("no mpiexec on PATH or beside python (pip install mpich)")
    return _mpiexec()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    return root, corpus


def args(work, out, *extra, steps=STEPS):
    root, corpus = work
    # the decay is pinned so that runs with different --max-iters (resumes) share one schedule
    return ["--preset", "tiny", "--input", str(corpus), "--data-dir", str(root / "data"), "--out-dir", str(out),
            "--max-iters", str(steps), "--lr-decay-iters", str(STEPS), "--eval-interval", "5", "--eval-iters", "2",
            "--sample-tokens", "0", "--progress", "false", "--log-interval", "1000", *map(str, extra)]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("GPT_DATA_DIR",)}
    return {**env, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def launch(work, out, *extra, n=2, steps=STEPS, standin=False):
    """``mpiexec -n N python -m gpt.train ...`` (or the CuPy stand-in's entry point) as a Popen."""
    program = [str(REPO / "tests" / "standin_train.py")] if standin else ["-m", "gpt.train"]
    return subprocess.Popen([_mpi_or_skip(), "-n", str(n), sys.executable, *program,
                             *args(work, out, *extra, steps=steps)],
                            cwd=work[0], env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=LIMIT_S):
    """(exit code, stderr); the processes are killed if they outlive ``timeout``."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_all(proc)
        _, err = proc.communicate()
        pytest.fail(f"the ranks did not stop within {timeout} s (a hang); stderr:\n{err}")
    return proc.returncode, err


def run_ranks(work, out, *extra, **kw):
    code, err = finish(launch(work, out, *extra, **kw))
    assert code == 0, err
    return err


def losses(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def assert_same_losses(out, reference, rel=1e-6):
    got, want = losses(out), losses(reference)
    assert len(got) == len(want) == STEPS
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want))
    assert worst <= rel, f"losses differ by {worst:.2e} relative: {got} vs {want}"


@pytest.fixture(scope="module")
def reference(work):
    """One process at batch 8, in-process (the batch the 2-rank runs at --batch-size 4 make)."""
    out = work[0] / "one"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpt.data, "DEFAULT_DATA_DIR", work[0] / "data")
        mp.setattr(train_cli.Trainer, "_plot", lambda self: None)
        assert train_cli.main(args(work, out, "--batch-size", 8)) == 0
    return out


# -- exactness ---------------------------------------------------------------------------------------------------
def test_two_ranks_equal_one_process_with_twice_the_batch(work, reference):
    out = work[0] / "two"
    err = run_ranks(work, out, "--batch-size", 4)
    assert_same_losses(out, reference)
    assert "data-parallel on 2 ranks (mpi)" in err
    assert err.count("done: step 20") == 1, err  # only rank 0 reports
    assert sorted(p.name for p in out.iterdir()) == [".lock", "ckpt.safetensors", "ckpt_best.safetensors",
                                                    "loss.png", "metrics.jsonl"]


@pytest.mark.parametrize("dist", ["mpi", "nccl"])
def test_two_ranks_on_the_cupy_standin(work, reference, dist):
    """CuPy arrays over MPI (staged through the host) and over NCCL (the stand-in's)."""
    out = work[0] / f"cupy-{dist}"
    err = run_ranks(work, out, "--batch-size", 4, "--backend", "cupy", "--dist", dist, standin=True)
    assert f"data-parallel on 2 ranks ({dist})" in err
    assert_same_losses(out, reference)


def test_resume_on_another_number_of_ranks(work, reference):
    out = work[0] / "resumed"
    run_ranks(work, out, "--batch-size", 4, steps=8)
    run_ranks(work, out, "--batch-size", 8, "--resume", n=1, steps=14)
    run_ranks(work, out, "--batch-size", 4, "--resume", steps=STEPS)
    assert_same_losses(out, reference)


# -- stopping: Ctrl-C, a dead rank, a hung rank ---------------------------------------------------------------------
def _descendants(pid):
    """The processes below ``pid`` (Linux /proc), e.g. mpiexec's ranks."""
    children = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _rank_pid(proc, rank):
    for pid in _descendants(proc.pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env and b"PYTHONPATH=" + str(REPO).encode() in env:
            return pid
    raise AssertionError(f"rank {rank} of mpiexec {proc.pid} not found")


def _kill_all(proc):
    for pid in _descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _training(work, out, *extra):
    """A long 2-rank run, returned once it has saved a checkpoint (so there is one to keep)."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("finding the ranks' processes needs Linux /proc")
    proc = launch(work, out, "--batch-size", 4, *extra, steps=10**6)
    deadline = time.monotonic() + LIMIT_S
    while not (out / "ckpt.safetensors").is_file():
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_all(proc)
            pytest.fail(f"the run ended or stalled before its first checkpoint: {proc.communicate()[1]}")
        time.sleep(0.05)
    time.sleep(0.3)  # a few more steps
    return proc


@pytest.mark.parametrize("target", ["mpiexec", "one rank"])
def test_ctrl_c_stops_every_rank_at_one_step_and_saves(work, tmp_path, target):
    out = tmp_path / "run"
    proc = _training(work, out)
    try:
        os.kill(proc.pid if target == "mpiexec" else _rank_pid(proc, 1), signal.SIGINT)
        code, err = finish(proc)
    finally:
        _kill_all(proc)
    assert code == 130, err
    said = "SIGINT" if target == "mpiexec" else "a signal to another rank"  # rank 0 reports
    assert err.count(f"interrupted ({said}): checkpoint saved at step") == 1, err
    saved = int(err.split("checkpoint saved at step ")[1].split()[0])
    assert TrainingState.read(out / "ckpt.safetensors").step == saved
    if target == "mpiexec":  # and it resumes
        run_ranks(work, out, "--batch-size", 4, "--resume", steps=saved + 2)
        assert len(losses(out)) == saved + 2


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_rank_stops_every_rank_and_keeps_the_checkpoint(work, tmp_path, fault):
    out = tmp_path / "run"
    proc = _training(work, out, "--dist-timeout", 2)
    try:
        rank1 = _rank_pid(proc, 1)
        os.kill(rank1, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        started = time.monotonic()
        code, err = finish(proc, timeout=60)
        took = time.monotonic() - started
    finally:
        _kill_all(proc)
    assert code != 0 and took < 60, err
    if fault == "hung":  # the launcher cannot see a hang: rank 0's watchdog ends the job
        assert "got no answer within 2 s (--dist-timeout)" in err, err
        assert code == 1
    state = TrainingState.read(out / "ckpt.safetensors")  # whole: written at an evaluation, every array readable
    assert state.step % 5 == 0 and state.step > 0
    model, optimizer = state.load_arrays(out / "ckpt.safetensors")
    assert model and optimizer["state"]


# -- options, and one process without MPI --------------------------------------------------------------------------
def test_one_process_needs_no_mpi4py(work, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # any import of it raises ImportError
    monkeypatch.setattr(gpt.data, "DEFAULT_DATA_DIR", work[0] / "data")
    assert train_cli.main(args(work, tmp_path / "run", steps=2)) == 0


def test_dist_options_are_checked(work, tmp_path, monkeypatch, capsys):
    def usage(*extra):
        with pytest.raises(SystemExit) as exc:
            train_cli.main(args(work, tmp_path / "run", *extra, steps=2))
        assert exc.value.code == 2
        return capsys.readouterr().err
    assert "needs --backend cupy" in usage("--dist", "nccl")
    assert "--dist-timeout must be in" in usage("--dist-timeout", "0")
    assert "must be one of auto, none, mpi, nccl" in usage("--dist", "gloo")
    # mpiexec started several processes, but --dist none: each would train alone in one out-dir
    monkeypatch.setenv("PMI_SIZE", "2")
    assert train_cli.main(args(work, tmp_path / "run", "--dist", "none", steps=2)) == 2
    assert "--dist none, but an MPI launcher started 2 processes" in capsys.readouterr().err
    # --dist mpi without mpi4py: one line saying what to install
    monkeypatch.delenv("PMI_SIZE")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    assert train_cli.main(args(work, tmp_path / "run", "--dist", "mpi", steps=2)) == 2
    assert 'pip install -e ".[mpi]"' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- the all-reduce buffer, in one process (a stand-in for the other rank) --------------------------------------------
class OtherRank(Communicator):
    """Two ranks seen from rank 0: the other rank's buffer is ``other``; the mean is computed here."""

    size = 2

    def __init__(self, other):
        self.other, self.calls = other, 0

    def allreduce_mean_(self, buf):
        self.calls += 1
        buf[...] = (buf + self.other) * buf.dtype.type(0.5)


def test_one_all_reduce_averages_gradients_loss_and_stop_requests(xp):
    a, b, unused = (tt.nn.Parameter(xp.zeros(shape, dtype=np.float32)) for shape in ((2, 3), (4,), (5,)))
    a.grad, b.grad = xp.full((2, 3), 2.0, dtype=np.float32), xp.arange(4, dtype=np.float32)
    other = np.concatenate([np.full(6, 4.0), np.full(4, 10.0), [3.0, 1.0]]).astype(np.float32)
    comm = OtherRank(xp.asarray(other))
    counting = cupy_standin.count_syncs() if cupy_standin.installed() and xp is not np else contextlib.nullcontext()
    with counting as syncs:
        loss, stop = GradientAverager(comm)([a, b, unused], xp.asarray(np.float64(5.0)), stop_requested=False)
    if syncs is not None:  # on a GPU: the loss and the stop flag come back in one read (it waits for NCCL)
        assert syncs.n == 1, syncs
    assert comm.calls == 1
    assert (loss, stop) == (4.0, True)  # the other rank asked to stop
    assert tt.backend.to_numpy(a.grad).tolist() == [[3.0] * 3] * 2 and a.grad.shape == (2, 3)
    assert tt.backend.to_numpy(b.grad).tolist() == [5.0, 5.5, 6.0, 6.5]
    assert a.grad.dtype == np.float32 and unused.grad is None  # a missing gradient stays missing
    b.grad = b.grad.astype(np.float64)
    with pytest.raises(ValueError, match="one dtype"):
        GradientAverager(comm)([a, b], xp.asarray(np.float64(1.0)), False)


def test_launched_size_reads_the_launchers_variables(monkeypatch):
    for var in LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    assert launched_size() == 1
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_size() == 4
