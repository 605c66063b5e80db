"""gpt.serve's engine without HTTP (no extra needed): loading from memory, the loaders, jobs
interleaved on one worker, cancelling, limits, shutdown; and the program without its extra."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from gpt.checkpoint import CheckpointError, InMemoryCheckpoint
from gpt.generate import generate_tokens, load_model
from gpt import serve_engine
from gpt.serve_engine import Busy, Engine, Job, Loader, Sampling, ServeLimits, load_served, prompt_ids
from test_checkpoint import training_checkpoint

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60  # bound on waiting for the worker; never a timing check


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return training_checkpoint(tmp_path_factory.mktemp("engine") / "ckpt.safetensors")


@pytest.fixture(scope="module")
def served(checkpoint):
    return load_served(InMemoryCheckpoint(checkpoint.read_bytes(), "mem.safetensors"))


class Recorder:
    """Collects a job's events, numbered in the order the worker emitted them across all jobs."""
    counter = iter(range(10 ** 9))
    lock = threading.Lock()

    def __init__(self):
        self.events, self.over = [], threading.Event()

    def __call__(self, event):
        with self.lock:
            self.events.append((next(self.counter), *event))
        if event[0] != "token":
            self.over.set()

    @property
    def text(self):
        return "".join(text for _, kind, text in self.events if kind != "error")

    def wait(self):
        assert self.over.wait(WAIT_S), "the job never ended"
        return self


def job(served, n, seed, prompt="the king", **kw):
    rec = Recorder()
    return Job(served, prompt_ids(served, prompt), n, Sampling(1.0, None, None, seed), rec), rec


def alone(checkpoint, n, seed, prompt="the king"):
    model, tok, _ = load_model(checkpoint)
    return tok.decode([int(t[0]) for t in generate_tokens(model, np.array([tok.encode(prompt)]), n, 1.0, seed=seed)])


def test_upload_bytes_load_like_the_file(served, checkpoint):
    assert served.id == "mem.safetensors" and served.info["bytes"] == checkpoint.stat().st_size
    model, _, meta = load_model(checkpoint)
    assert served.info["parameters"] == sum(p.data.size for p in model.parameters())
    assert served.info["config"] == model.config.to_dict() and served.info["step"] == meta["step"]
    assert not served.model.training  # once, for every job
    with pytest.raises(CheckpointError, match="upload.safetensors is not a valid"):
        load_served(InMemoryCheckpoint(checkpoint.read_bytes()[:-1], "upload.safetensors"))


def test_a_second_loader_plugs_in(served, monkeypatch):
    from safetensors.numpy import save
    seen = []

    def load(source, backend):
        seen.append(str(source))
        return dataclasses.replace(served, info={})
    monkeypatch.setitem(serve_engine.LOADERS, "other", Loader(lambda header: header.get("format") == "pt", load))
    foreign = save({"w": np.zeros(2, np.float32)}, metadata={"format": "pt"})
    assert load_served(InMemoryCheckpoint(foreign, "gpt2.safetensors")).model is served.model
    assert seen == ["gpt2.safetensors"]
    with pytest.raises(CheckpointError, match="not written by gpt.train"):  # unclaimed: ours says why
        load_served(InMemoryCheckpoint(save({"w": np.zeros(2, np.float32)}), "x.safetensors"))


def test_jobs_interleave_and_each_makes_its_own_text(served, checkpoint):
    engine = Engine(max_active=2, max_queued=5, start=False)
    (a, ra), (b, rb), (c, rc) = job(served, 30, 1), job(served, 30, 2), job(served, 5, 3)
    for j in (a, b, c):
        engine.submit(j)
    assert engine.stats()["queued"] == 3
    engine.start()
    for r in (ra, rb, rc):
        r.wait()
    engine.close()
    assert (ra.text, rb.text, rc.text) == (alone(checkpoint, 30, 1), alone(checkpoint, 30, 2), alone(checkpoint, 5, 3))
    order_a, order_b = [e[0] for e in ra.events], [e[0] for e in rb.events]
    assert max(order_a) > min(order_b) and max(order_b) > min(order_a)  # interleaved, not one after the other
    assert min(e[0] for e in rc.events) > min(max(order_a), max(order_b))  # the third waited for a free stream
    assert engine.stats()["completed"] == 3


def test_limits_cancel_and_shutdown(served):
    engine = Engine(max_active=1, max_queued=1, start=False)
    (running, r1), (waiting, r2), (extra, _) = job(served, 10 ** 6, 1), job(served, 10 ** 6, 2), job(served, 1, 3)
    engine.submit(running)
    engine.submit(waiting)
    with pytest.raises(Busy, match="1 streams are busy and 1 requests are waiting"):
        engine.submit(extra)
    engine.cancel(waiting)  # leaves the queue at once (its client went away: it hears nothing more)
    assert engine.stats()["queued"] == 1
    engine.submit(extra)
    engine.start()
    assert r1.events == [] or r1.events[0][1] == "token"
    engine.close()
    r1.wait()
    assert r1.events[-1][1:] == ("error", "the server is shutting down") and r2.events == []
    with pytest.raises(Busy, match="shutting down"):
        engine.submit(job(served, 1, 4)[0])


def test_a_failing_job_does_not_stop_the_others(served, checkpoint):
    engine = Engine(max_active=4, max_queued=0)
    bad, rbad = job(served, 5, 1)
    bad.ids = [10 ** 6]  # out of the vocabulary: the model refuses it
    good, rgood = job(served, 5, 1)
    engine.submit(bad)
    engine.submit(good)
    rbad.wait(), rgood.wait()
    engine.close()
    assert rbad.events[-1][1] == "error" and "generation failed" in rbad.events[-1][2]
    assert rgood.text == alone(checkpoint, 5, 1)


def test_limits_are_checked():
    ServeLimits().check()
    with pytest.raises(ValueError, match="max_streams must be an integer in"):
        ServeLimits(max_streams=0).check()


def test_without_the_extra_the_program_says_how_to_install_it():
    code = ("import sys; sys.modules['uvicorn'] = None\n"  # as if uvicorn were not installed
            "from gpt.serve import main; sys.exit(main(['--port', '0']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=WAIT_S,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert 'pip install -e ".[serve]"' in proc.stderr and "uvicorn" in proc.stderr


def test_help_and_bad_options(capsys):
    from gpt.serve import main
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0 and "--max-streams" in capsys.readouterr().out
    for args, needle in ((["--max-streams", "0"], "--max-streams"), (["--port", "70000"], "--port"),
                         (["--no-upload"], "--no-upload serves --checkpoint only")):
        with pytest.raises(SystemExit) as exc:
            main(args)
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_the_server_loads_the_cpu_kernels_before_it_listens(monkeypatch, capsys):
    """The first request's first token must not pay for loading (or compiling) the kernels."""
    pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
    import gpt.serve as serve
    import tinytensor as tt
    calls = []
    monkeypatch.setattr(tt.kernels, "warm_up", lambda: calls.append("warm_up") or 0.0)

    def refuse(host, port):
        calls.append("listen")
        raise OSError(98, "Address already in use")
    monkeypatch.setattr(serve, "_listen", refuse)
    assert serve.main(["--port", "0"]) == 1
    assert calls == ["warm_up", "listen"]
    assert "cannot listen" in capsys.readouterr().err
