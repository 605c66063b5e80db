"""End to end: ``gpt.train.main`` and ``gpt.sample.main`` in-process (and ``python -m
gpt.train`` as a subprocess for Ctrl-C) on a small generated text, with tiny models.

Nothing here uses the network or the repository's data/ folder: the text is written
to a temporary file and ``gpt.data.DEFAULT_DATA_DIR`` points into a temporary folder.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gpt.data
import tinytensor as tt
from gpt import config as C
from gpt import sample as sample_cli
from gpt import train as train_cli
from gpt import trainer
from gpt.checkpoint import load_checkpoint
from gpt.generate import load_model
from gpt.model import GPT
from textgen import make_text

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The corpus file and a data dir shared by the module (datasets are prepared once)."""
    root = tmp_path_factory.mktemp("train")
    corpus = root / "corpus.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpt.data, "DEFAULT_DATA_DIR", root / "data")
        yield root, corpus


@pytest.fixture
def corpus(workdir):
    return workdir[1]


@pytest.fixture(autouse=True)
def _data_dir_and_no_plot(request, workdir, monkeypatch):
    monkeypatch.setattr(gpt.data, "DEFAULT_DATA_DIR", workdir[0] / "data")
    monkeypatch.delenv("GPT_DATA_DIR", raising=False)
    if "with_plot" not in request.fixturenames:  # drawing loss.png costs ~0.5 s per eval
        monkeypatch.setattr(trainer.Trainer, "_plot", lambda self: None)


@pytest.fixture
def with_plot():
    return pytest.importorskip("matplotlib")


def train_args(corpus, out_dir, *extra):
    return ["--preset", "tiny", "--input", str(corpus), "--out-dir", str(out_dir), "--eval-iters", "2",
            "--sample-tokens", "0", "--progress", "false", *map(str, extra)]


def train(corpus, out_dir, *extra):
    return train_cli.main(train_args(corpus, out_dir, *extra))


def read_metrics(out_dir):
    lines = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if line]
    steps = [m for m in lines if m["kind"] == "train"]
    evals = [m for m in lines if m["kind"] == "eval"]
    assert len(steps) + len(evals) == len(lines)
    return steps, evals


def assert_clean_error(err, *needles):
    """One ``error:`` line with the message, and no traceback."""
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    for needle in needles:
        assert needle.lower() in error_lines[0].lower(), (needle, err)


# -- a training run ------------------------------------------------------------------------------------------------
def test_tiny_run_writes_checkpoints_metrics_and_plot(corpus, tmp_path, capsys, with_plot):
    out = tmp_path / "run"
    assert train(corpus, out, "--max-iters", 20, "--eval-interval", 10, "--sample-tokens", 10) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # diagnostics (and the eval samples) go to stderr
    assert "---- sample ----" in captured.err and "step 20:" in captured.err
    for name in ("ckpt.safetensors", "ckpt_best.safetensors", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))  # no temporary files left behind

    steps, evals = read_metrics(out)
    assert [m["step"] for m in steps] == list(range(1, 21))
    assert all(set(m) == {"kind", "step", "loss", "lr", "ms", "tok_per_s", "elapsed_s"} for m in steps)
    assert [m["step"] for m in evals] == [0, 10, 20]
    assert all(set(m) == {"kind", "step", "train_loss", "val_loss", "val_bpc", "elapsed_s"} for m in evals)
    assert all(math.isfinite(v) for m in steps + evals for k, v in m.items() if k != "kind")
    elapsed = [m["elapsed_s"] for m in steps]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    assert all(m["tok_per_s"] > 0 for m in steps)
    # bits per char: char tokens, so loss / ln 2
    for m in evals:
        assert m["val_bpc"] == pytest.approx(m["val_loss"] / math.log(2), rel=1e-9)
    # warmup 5 steps (tiny preset) then cosine decay to min_lr at max_iters
    lrs = [m["lr"] for m in steps]
    assert lrs[0] == pytest.approx(1e-3 / 6) and lrs[4] == pytest.approx(1e-3 * 5 / 6)
    assert lrs[5] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] > 1e-4
    # the loss goes down: at init it is about ln(vocab)
    tensors, meta = load_checkpoint(out / "ckpt.safetensors")
    vocab = meta["model_config"]["vocab_size"]
    assert steps[0]["loss"] == pytest.approx(math.log(vocab), abs=0.2)
    assert np.mean([m["loss"] for m in steps[-5:]]) < steps[0]["loss"] - 0.2
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 0.2

    assert meta["step"] == 20 and meta["model_type"] == "gpt"
    assert meta["best_val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert "history" not in meta  # per-step history lives in metrics.jsonl: the header stays small
    assert meta["elapsed_s"] == pytest.approx(steps[-1]["elapsed_s"], abs=1e-3)
    best_tensors, best_meta = load_checkpoint(out / "ckpt_best.safetensors")
    assert best_meta["step"] == 20
    model, tok, _ = load_model(out / "ckpt.safetensors")
    assert isinstance(model, GPT) and model.config.n_layer == 2 and model.config.block_size == 32
    assert tok.vocab_size == vocab
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, tensors[name])
    # the optimizer moments are saved too (exact resume)
    assert any(k.startswith("optimizer.") for k in tensors)


def test_bigram_model_trains(corpus, tmp_path):
    out = tmp_path / "bigram"
    assert train(corpus, out, "--model", "bigram", "--max-iters", 12, "--eval-interval", 12,
                 "--learning-rate", 1e-2) == 0
    steps, evals = read_metrics(out)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    text = io.StringIO()
    assert sample_cli.main(["--checkpoint", str(out / "ckpt.safetensors"), "--prompt", "the",
                            "--max-new-tokens", "15"], out=text) == 0
    assert text.getvalue().startswith("the") and len(text.getvalue()) == 3 + 15 + 1


def test_resume_is_exact(corpus, tmp_path):
    """12 steps in one go == 6 steps, then --resume to 12: the same losses and the same weights."""
    common = ("--lr-decay-iters", 12, "--eval-interval", 3, "--seed", 5)
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(corpus, a, "--max-iters", 12, *common) == 0
    assert train(corpus, b, "--max-iters", 6, *common) == 0
    assert load_checkpoint(b / "ckpt.safetensors")[1]["step"] == 6
    # only what changes on the command line: the rest comes from the checkpoint
    assert train_cli.main(["--resume", "--max-iters", "12", "--out-dir", str(b)]) == 0

    steps_a, evals_a = read_metrics(a)
    steps_b, evals_b = read_metrics(b)
    assert [m["step"] for m in steps_b] == list(range(1, 13))
    for ma, mb in zip(steps_a, steps_b):
        assert ma["step"] == mb["step"]
        assert ma["loss"] == mb["loss"], ma["step"]  # exactly
        assert ma["lr"] == mb["lr"], ma["step"]
    assert [(m["step"], m["val_loss"], m["train_loss"]) for m in evals_a] == \
        [(m["step"], m["val_loss"], m["train_loss"]) for m in evals_b]

    ta, meta_a = load_checkpoint(a / "ckpt.safetensors")
    tb, meta_b = load_checkpoint(b / "ckpt.safetensors")
    assert meta_a["step"] == meta_b["step"] == 12
    assert set(ta) == set(tb)
    for name in ta:  # weights and AdamW moments
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    assert meta_a["rng"] == meta_b["rng"]
    assert meta_b["train_config"]["max_iters"] == 12 and meta_b["train_config"]["lr_decay_iters"] == 12


@pytest.mark.parametrize("extra", [(), ("--dtype", "float16")], ids=["float32", "float16"])
def test_muon_trains_and_resumes_exactly(corpus, tmp_path, extra):
    """--optimizer muon (with the wsd schedule): the loss goes down, and 6 steps + --resume to 12 equal
    12 in one go, the Muon momentum and AdamW moments in the checkpoint included; also in float16."""
    common = ("--optimizer", "muon", "--lr-schedule", "wsd", "--lr-decay-iters", 12, "--eval-interval", 6,
              "--seed", 5, *extra)
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(corpus, a, "--max-iters", 12, *common) == 0
    assert train(corpus, b, "--max-iters", 6, *common) == 0
    assert train_cli.main(["--resume", "--max-iters", "12", "--out-dir", str(b)]) == 0
    steps_a, evals_a = read_metrics(a)
    steps_b, evals_b = read_metrics(b)
    assert [(m["step"], m["loss"], m["lr"]) for m in steps_a] == [(m["step"], m["loss"], m["lr"]) for m in steps_b]
    assert evals_a[-1]["val_loss"] < evals_a[0]["val_loss"] - 0.3
    # wsd: warmup 5 (tiny preset), constant, then a linear decay over the last 20 % (steps 10, 11)
    assert [m["lr"] for m in steps_a][5:10] == [1e-3] * 5 and steps_a[-1]["lr"] < 1e-3
    ta, meta_a = load_checkpoint(a / "ckpt.safetensors")
    tb, meta_b = load_checkpoint(b / "ckpt.safetensors")
    assert meta_a["optimizer"]["type"] == "Combined" and any(k.endswith(".momentum_buffer") for k in ta)
    assert set(ta) == set(tb)
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    # the Muon groups ran at --muon-lr's schedule: the saved lr is muon_lr times AdamW's factor
    muon_group, adamw_group = meta_a["optimizer"]["param_groups"][:2]
    assert muon_group["lr"] == pytest.approx(adamw_group["lr"] * 0.02 / 1e-3)


def test_optimizer_choice_is_checked(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    assert train(corpus, out, "--max-iters", 2, "--eval-interval", 2) == 0
    capsys.readouterr()
    # a resumed run keeps its optimizer
    assert train_cli.main(["--resume", "--max-iters", "4", "--out-dir", str(out), "--optimizer", "muon"]) == 2
    assert_clean_error(capsys.readouterr().err, "--optimizer")
    assert train(corpus, tmp_path / "bigram", "--model", "bigram", "--optimizer", "muon") == 2
    assert_clean_error(capsys.readouterr().err, "muon", "bigram")


def test_resume_checks(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    assert train(corpus, out, "--max-iters", 3, "--eval-interval", 3) == 0
    capsys.readouterr()
    # a different model shape cannot continue this checkpoint
    assert train_cli.main(["--resume", "--max-iters", "6", "--out-dir", str(out), "--n-layer", "3"]) == 2
    assert_clean_error(capsys.readouterr().err, "n-layer")
    # no checkpoint to resume from
    assert train_cli.main(["--resume", "--out-dir", str(tmp_path / "nothing")]) == 1
    assert_clean_error(capsys.readouterr().err, "not found")
    assert not (tmp_path / "nothing").exists()  # a mistyped --out-dir leaves nothing behind
    # a moved run directory resumes in its new place
    moved = tmp_path / "moved"
    out.rename(moved)
    assert train_cli.main(["--resume", "--max-iters", "6", "--out-dir", str(moved)]) == 0
    assert load_checkpoint(moved / "ckpt.safetensors")[1]["step"] == 6
    assert not out.exists()
    # a run copied to ./out resumes there with the default --out-dir, and writes nothing (best
    # checkpoint, plot) into the directory recorded in the checkpoint
    work = tmp_path / "work"
    shutil.copytree(moved, work / "out")
    before = {p.name: p.read_bytes() for p in moved.iterdir()}
    monkeypatch.chdir(work)
    assert train_cli.main(["--resume", "--max-iters", "9"]) == 0
    assert load_checkpoint(work / "out" / "ckpt.safetensors")[1]["step"] == 9
    assert load_checkpoint(work / "out" / "ckpt_best.safetensors")[1]["step"] == 9
    assert {p.name: p.read_bytes() for p in moved.iterdir()} == before


def test_grad_accumulation_equals_a_bigger_batch(corpus, tmp_path):
    common = ("--max-iters", 5, "--eval-interval", 100, "--save-checkpoints", "false")
    assert train(corpus, tmp_path / "acc", "--batch-size", 4, "--grad-accum", 2, *common) == 0
    assert train(corpus, tmp_path / "big", "--batch-size", 8, "--grad-accum", 1, *common) == 0
    acc, _ = read_metrics(tmp_path / "acc")
    big, _ = read_metrics(tmp_path / "big")
    assert len(acc) == len(big) == 5
    np.testing.assert_allclose([m["loss"] for m in acc], [m["loss"] for m in big], rtol=1e-5, atol=1e-6)
    assert [m["lr"] for m in acc] == [m["lr"] for m in big]
    assert not (tmp_path / "acc" / "ckpt.safetensors").exists()  # --save-checkpoints false


def test_checkpoint_save_is_atomic(corpus, tmp_path, monkeypatch, capsys):
    """A save that fails (here: the final rename) leaves the previous checkpoint loadable."""
    out = tmp_path / "atomic"
    real_replace = os.replace
    state = {"saves": 0, "old": None}

    def failing_replace(src, dst, *args, **kwargs):
        if Path(dst).name == "ckpt.safetensors":
            state["saves"] += 1
            if state["saves"] == 2:  # the second save of the last checkpoint fails
                state["old"] = Path(dst).read_bytes()
                raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing_replace)
    rc = train(corpus, out, "--max-iters", 9, "--eval-interval", 3)
    assert rc == 1 and state["saves"] == 2
    assert_clean_error(capsys.readouterr().err, "No space left")
    assert (out / "ckpt.safetensors").read_bytes() == state["old"]
    tensors, meta = load_checkpoint(out / "ckpt.safetensors")
    assert meta["step"] == 3
    model, _, _ = load_model(out / "ckpt.safetensors")
    assert model.config.n_layer == 2
    assert not list(out.glob(".*tmp*"))  # the half-written temporary file is removed


def test_nan_loss_stops_with_a_clear_error(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "nan"
    original = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = original(self, idx, targets, **kwargs)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # the 5th training step (index 4)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    assert train(corpus, out, "--max-iters", 20, "--eval-interval", 3) == 1
    assert_clean_error(capsys.readouterr().err, "nan", "step 4")
    tensors, meta = load_checkpoint(out / "ckpt.safetensors")
    assert meta["step"] == 3  # the last good checkpoint, untouched
    steps, _ = read_metrics(out)
    assert [m["step"] for m in steps] == [1, 2, 3, 4] and all(math.isfinite(m["loss"]) for m in steps)


def test_divergence_with_a_huge_learning_rate_is_caught(corpus, tmp_path, capsys):
    with np.errstate(all="ignore"):
        rc = train(corpus, tmp_path / "lr", "--max-iters", 30, "--eval-interval", 100, "--learning-rate", 1e6,
                   "--grad-clip", 0, "--warmup-iters", 0)
    assert rc == 1
    assert_clean_error(capsys.readouterr().err, "loss is nan", "at step")


# -- Ctrl-C ---------------------------------------------------------------------------------------------------------------
def start_training_process(corpus, out, data_dir, *extra, stderr, stdout=subprocess.DEVNULL):
    """``python -m gpt.train`` in a subprocess (through runpy, after pointing DEFAULT_DATA_DIR at
    ``data_dir``), for tests that send real signals or kills."""
    launcher = ("import pathlib, runpy, sys, gpt.data; gpt.data.DEFAULT_DATA_DIR = pathlib.Path(sys.argv.pop(1)); "
                "runpy.run_module('gpt.train', run_name='__main__', alter_sys=True)")
    cmd = [sys.executable, "-c", launcher, str(data_dir), *train_args(corpus, out, *extra)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("GPT_DATA_DIR", None)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=stdout, stderr=stderr)


def wait_for(path, proc, err_path, timeout=60):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, err_path.read_text()
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.02)


@pytest.mark.parametrize("sig,twice", [(signal.SIGINT, False), (signal.SIGTERM, False), (signal.SIGTERM, True)],
                         ids=["ctrl-c", "sigterm", "sigterm-twice"])
def test_a_signal_saves_and_exits_130(corpus, tmp_path, workdir, sig, twice):
    """Ctrl-C or SIGTERM (`kill`, `docker stop`) while training: the step finishes, the run saves
    and exits 130 quietly. A second signal stops at once, the last checkpoint intact."""
    out, err_path = tmp_path / "run", tmp_path / "stderr.txt"
    with open(err_path, "w") as err, open(tmp_path / "stdout.txt", "w") as stdout:
        proc = start_training_process(corpus, out, workdir[0] / "data", "--max-iters", 100000, "--eval-interval", 2,
                                      "--eval-iters", 1, stderr=err, stdout=stdout)
        try:
            wait_for(out / "ckpt.safetensors", proc, err_path)
            proc.send_signal(sig)
            if twice:
                proc.send_signal(sig)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err_path.read_text()
    assert rc == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted" in stderr and "--resume" in stderr
    assert (tmp_path / "stdout.txt").read_text() == ""
    tensors, meta = load_checkpoint(out / "ckpt.safetensors")  # intact whichever way it stopped
    assert meta["step"] > 0
    if twice:
        return
    assert signal.Signals(sig).name in stderr
    steps, _ = read_metrics(out)
    assert steps[-1]["step"] == meta["step"]  # saved right after the step it stopped at
    # and it continues from there
    assert train_cli.main(["--resume", "--max-iters", str(meta["step"] + 2), "--out-dir", str(out)]) == 0
    assert load_checkpoint(out / "ckpt.safetensors")[1]["step"] == meta["step"] + 2


def test_interrupt_before_the_first_eval_then_resume(corpus, tmp_path, monkeypatch):
    """A stop requested mid-run (as the SIGINT handler does) saves at once, even before any
    evaluation (no best val loss yet), and --resume carries on from there."""
    out = tmp_path / "run"
    real_step = trainer.Trainer.train_step

    def step_then_interrupt(self):
        result = real_step(self)
        if self.step == 3:
            signal.raise_signal(signal.SIGTERM)  # as `kill` or `docker stop` does
        return result
    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_interrupt)
    assert train(corpus, out, "--max-iters", 8, "--eval-interval", 100) == train_cli.EXIT_INTERRUPTED
    _, meta = load_checkpoint(out / "ckpt.safetensors")
    assert meta["step"] == 3 and meta["best_val_loss"] is None
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    assert train(corpus, out, "--resume", "--max-iters", 8, "--eval-interval", 100) == 0
    steps, _ = read_metrics(out)
    assert [m["step"] for m in steps] == list(range(1, 9))


# -- command-line validation ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--no-such-key", "1"], "unrecognized"),
    (["--max-iters", "abc"], "integer"),
    (["--learning-rate", "fast"], "number"),
    (["--n-embd", "30", "--n-head", "4"], "divisible"),
    (["--max-iters", "-5"], "max-iters"),
    (["--batch-size", "0"], "batch-size"),
    (["--dropout", "1.0"], "dropout"),
    (["--tokenizer", "words"], "tokenizer"),
    (["--resume", "maybe"], "true or false"),
    (["--preset", "huge"], "preset"),
    # absurd values: not finite, negative seeds, sizes far beyond any machine
    (["--seed", "-1"], "seed"),
    (["--learning-rate", "nan"], "finite"),
    (["--learning-rate", "inf"], "finite"),
    (["--min-lr", "nan"], "finite"),
    (["--grad-clip", "nan"], "finite"),
    (["--weight-decay", "inf"], "finite"),
    (["--n-embd", "1000000"], "n-embd"),
    (["--batch-size", "1000000000"], "batch-size"),
    (["--optimizer", "sgd"], "optimizer"),
    (["--lr-schedule", "linear"], "lr-schedule"),
    (["--decay-frac", "1.5"], "decay-frac"),
    (["--muon-momentum", "1"], "muon-momentum"),
    (["--muon-lr", "-0.1"], "muon-lr"),
])
def test_cli_errors_exit_2_with_one_message(args, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(args + ["--out-dir", str(tmp_path / "never")])
    assert exc.value.code == 2
    assert_clean_error(capsys.readouterr().err, needle)
    assert not (tmp_path / "never").exists()


def test_cli_accepts_underscores(corpus, tmp_path):
    cfg, _ = C.from_args(["--max_iters", "3", "--eval_interval", "3", "--n_embd", "16", "--n-head", "2"])
    assert (cfg.max_iters, cfg.eval_interval, cfg.n_embd) == (3, 3, 16)
    out = tmp_path / "underscores"
    assert train_cli.main(["--preset", "tiny", "--input", str(corpus), "--out_dir", str(out), "--max_iters", "3",
                           "--eval_interval", "3", "--eval_iters", "1", "--sample_tokens", "0",
                           "--progress", "false"]) == 0
    steps, _ = read_metrics(out)
    assert [m["step"] for m in steps] == [1, 2, 3]


def test_missing_input_file_is_a_clean_error(tmp_path, capsys):
    assert train_cli.main(["--preset", "tiny", "--input", str(tmp_path / "nope.txt"),
                           "--out-dir", str(tmp_path / "o"), "--progress", "false"]) == 1
    assert_clean_error(capsys.readouterr().err, "not found")
    assert not (tmp_path / "o").exists()  # a run that wrote nothing leaves no empty folder


# -- sampling -------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(workdir):
    """One tiny trained model for the sampling tests."""
    out = workdir[0] / "for_sampling"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.Trainer, "_plot", lambda self: None)
        assert train(workdir[1], out, "--max-iters", 10, "--eval-interval", 10) == 0
    return out / "ckpt.safetensors"


def sample(checkpoint, *args):
    """(return code, stdout text) of gpt.sample.main with an in-memory stdout."""
    out = io.StringIO()
    rc = sample_cli.main(["--checkpoint", str(checkpoint), *map(str, args)], out=out)
    return rc, out.getvalue()


def sample_exit(checkpoint, *args):
    """The exit code whether main returns it or argparse raises SystemExit."""
    try:
        return sample(checkpoint, *args)[0]
    except SystemExit as exc:
        return exc.code


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_sample_streams_text_after_the_prompt(checkpoint, capsys):
    out = Recorder()
    assert sample_cli.main(["--checkpoint", str(checkpoint), "--prompt", "ROMEO:\n", "--max-new-tokens", "25",
                            "--seed", "3"], out=out) == 0
    text = out.getvalue()
    assert text.startswith("ROMEO:\n") and text.endswith("\n")
    assert len(text) == len("ROMEO:\n") + 25 + 1  # char tokens: one character each, then a newline
    assert len([w for w in out.writes if w]) >= 25  # written token by token, not at the end
    err = capsys.readouterr().err
    assert "loaded" in err and "tokens/s" in err


def test_only_generated_text_goes_to_stdout(checkpoint, capsys):
    args = ["--checkpoint", str(checkpoint), "--prompt", "the", "--max-new-tokens", "12", "--seed", "9"]
    assert sample_cli.main(args) == 0
    captured = capsys.readouterr()
    rc, text = sample(checkpoint, "--prompt", "the", "--max-new-tokens", 12, "--seed", 9)
    assert rc == 0 and captured.out == text
    assert "loaded" not in captured.out and "loaded" in captured.err


def test_greedy_is_deterministic_and_the_same_without_kv_cache(checkpoint):
    args = ("--prompt", "KING HENRY:\nThe", "--max-new-tokens", 40, "--temperature", 0)
    rc1, a = sample(checkpoint, *args, "--seed", 1)
    rc2, b = sample(checkpoint, *args, "--seed", 2)  # the seed does not matter when greedy
    rc3, c = sample(checkpoint, *args, "--no-kv-cache")
    rc4, d = sample(checkpoint, *args, "--no_kv_cache", "--top-k", 1)
    assert rc1 == rc2 == rc3 == rc4 == 0
    assert a == b == c == d
    assert len(a) == len("KING HENRY:\nThe") + 40 + 1


def test_seeded_sampling_is_reproducible(checkpoint):
    args = ("--prompt", "the", "--max-new-tokens", 40, "--temperature", 1.5)
    assert sample(checkpoint, *args, "--seed", 4) == sample(checkpoint, *args, "--seed", 4)
    assert sample(checkpoint, *args, "--seed", 4) != sample(checkpoint, *args, "--seed", 5)
    assert sample(checkpoint, *args, "--seed", 4, "--top-p", 0.9) == \
        sample(checkpoint, *args, "--seed", 4, "--top-p", 0.9)


def test_num_samples_are_separated(checkpoint):
    rc, text = sample(checkpoint, "--prompt", "the", "--max-new-tokens", 10, "--num-samples", 2, "--seed", 7)
    assert rc == 0
    first, second = text.split("---------------\n")
    assert first.startswith("the") and second.startswith("the")
    assert len(first) == len(second) == 3 + 10 + 1
    # sample i uses seed + i
    assert first == sample(checkpoint, "--prompt", "the", "--max-new-tokens", 10, "--seed", 7)[1]
    assert second == sample(checkpoint, "--prompt", "the", "--max-new-tokens", 10, "--seed", 8)[1]


def test_prompt_longer_than_block_size(checkpoint, capsys, tmp_path):
    prompt = "the king hath come, sweet lady; good night fair queen\n" * 2  # > 32 tokens
    rc, text = sample(checkpoint, "--prompt", prompt, "--max-new-tokens", 10, "--temperature", 0)
    assert rc == 0 and text.startswith(prompt) and len(text) == len(prompt) + 10 + 1
    err = capsys.readouterr().err
    assert "note:" in err and "block_size" in err and "Traceback" not in err
    # the same from a file
    path = tmp_path / "prompt.txt"
    path.write_text(prompt, encoding="utf-8")
    rc, from_file = sample(checkpoint, "--prompt-file", path, "--max-new-tokens", 10, "--temperature", 0)
    assert rc == 0 and from_file == text


@pytest.mark.parametrize("args", [["--temperature", "-1"], ["--top-k", "0"], ["--top-p", "0"], ["--top-p", "1.5"],
                                  ["--num-samples", "0"], ["--max-new-tokens", "-1"], ["--temperature", "hot"]])
def test_sample_rejects_bad_arguments(checkpoint, args, capsys):
    code = sample_exit(checkpoint, "--prompt", "the", *args)
    assert code not in (0, None)
    assert code == 2  # argparse's convention for a bad command line
    captured = capsys.readouterr()
    assert_clean_error(captured.err)
    assert captured.out == ""


def test_sample_errors_are_clean(checkpoint, tmp_path, capsys):
    cases = []
    cases.append((tmp_path / "missing.safetensors", "the", "not found"))
    half = tmp_path / "half.safetensors"
    data = checkpoint.read_bytes()
    half.write_bytes(data[:len(data) // 2])
    cases.append((half, "the", "not a valid"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    cases.append((junk, "the", "not a valid"))
    foreign = tmp_path / "foreign.safetensors"
    import safetensors.numpy
    safetensors.numpy.save_file({"w": np.zeros(3, np.float32)}, str(foreign))
    cases.append((foreign, "the", "not written by gpt.train"))
    cases.append((tmp_path, "the", "directory"))
    cases.append((checkpoint, "the €uro @home", "not in this char tokenizer"))
    cases.append((checkpoint, "", "empty"))
    cases.append((tmp_path / "nope.txt", None, "nope.txt"))  # --prompt-file that does not exist
    for path, prompt, needle in cases:
        if prompt is None:
            rc, text = sample(checkpoint, "--prompt-file", path)
        else:
            rc, text = sample(path, "--prompt", prompt)
        captured = capsys.readouterr()
        assert rc == 1, (path, prompt)
        assert_clean_error(captured.err, needle)
        assert text == "" and captured.out == ""


@pytest.mark.skipif(tt.cupy_available(), reason="CuPy is installed here")
def test_cupy_backend_without_cupy(checkpoint, capsys):
    rc, text = sample(checkpoint, "--backend", "cupy", "--prompt", "the")
    assert rc == 1 and text == ""
    assert_clean_error(capsys.readouterr().err, "cupy")


@pytest.mark.skipif(tt.cupy_available(), reason="CuPy is installed here")
def test_train_cupy_backend_without_cupy(corpus, tmp_path, capsys):
    assert train(corpus, tmp_path / "cupy", "--backend", "cupy", "--max-iters", 1) == 1
    assert_clean_error(capsys.readouterr().err, "cupy")


# -- BPE ------------------------------------------------------------------------------------------------------------------
def test_bpe_run_trains_and_samples_any_unicode(corpus, tmp_path, workdir, capsys):
    out = tmp_path / "bpe"
    assert train(corpus, out, "--tokenizer", "bpe", "--vocab-size", 300, "--max-iters", 8,
                 "--eval-interval", 4, "--sample-tokens", 10) == 0
    assert (workdir[0] / "data" / "corpus_bpe300" / "meta.json").is_file()
    steps, evals = read_metrics(out)
    assert len(steps) == 8 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    # bits per *character*: BPE tokens cover several characters each
    meta = json.loads((workdir[0] / "data" / "corpus_bpe300" / "meta.json").read_text())
    chars_per_token = meta["n_chars"] / (meta["n_train"] + meta["n_val"])
    assert chars_per_token > 1.5
    assert evals[-1]["val_bpc"] == pytest.approx(evals[-1]["val_loss"] / math.log(2) / chars_per_token)
    model, tok, ckpt_meta = load_model(out / "ckpt.safetensors")
    assert model.config.vocab_size == tok.vocab_size == 300
    capsys.readouterr()
    prompt = "Naïve café — 日本語 🐈 ROMEO:"
    rc, text = sample(out / "ckpt.safetensors", "--prompt", prompt, "--max-new-tokens", 20, "--seed", 1)
    assert rc == 0 and text.startswith(prompt)
    assert "Traceback" not in capsys.readouterr().err
    rc, greedy = sample(out / "ckpt.safetensors", "--prompt", prompt, "--max-new-tokens", 20, "--temperature", 0)
    rc2, greedy2 = sample(out / "ckpt.safetensors", "--prompt", prompt, "--max-new-tokens", 20, "--temperature", 0,
                          "--no-kv-cache")
    assert rc == rc2 == 0 and greedy == greedy2
