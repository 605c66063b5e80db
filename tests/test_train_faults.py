"""Nothing lost, whatever happens: a second run in the same out-dir, two at once, NaN at an
evaluation, SIGTERM, a second signal, kills during saves, tampered checkpoints, absurd options.

Each test names the contract it checks; `python -m gpt.train` runs as a subprocess where a real
signal or kill is involved.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import gpt.data
from gpt import train as train_cli
from gpt import trainer
from gpt.checkpoint import FORMAT, METADATA_KEY, load_checkpoint
from gpt.rundir import RunDir
# the run fixtures (module corpus, temporary data dir, no plotting) are test_train's
from test_train import (_data_dir_and_no_plot, assert_clean_error, corpus, read_metrics,  # noqa: F401
                        start_training_process, train_args, wait_for, workdir)
from textgen import make_text

REPO = Path(__file__).resolve().parents[1]


def train(corpus, out, *extra):
    return train_cli.main(train_args(corpus, out, *extra))


def usage_exit(fn, *args):
    """The exit code whether main returns it or argparse raises SystemExit."""
    try:
        return fn(*args)
    except SystemExit as exc:
        return exc.code


# -- the out-dir belongs to one run ----------------------------------------------------------------------------
def test_a_new_run_refuses_an_out_dir_with_a_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert train(corpus, out, "--max-iters", 3, "--eval-interval", 3) == 0
    before = {p: p.read_bytes() for p in (out / "ckpt.safetensors", out / "ckpt_best.safetensors")}
    capsys.readouterr()
    assert train(corpus, out, "--max-iters", 2, "--eval-interval", 2, "--seed", 9) == 2
    assert_clean_error(capsys.readouterr().err, "--resume", "--overwrite")
    assert {p: p.read_bytes() for p in before} == before  # both checkpoints untouched
    # --overwrite starts over: the old checkpoints and metrics are gone, the new run's are there
    assert train(corpus, out, "--max-iters", 2, "--eval-interval", 2, "--seed", 9, "--overwrite") == 0
    assert load_checkpoint(out / "ckpt.safetensors")[1]["step"] == 2
    steps, _ = read_metrics(out)
    assert [m["step"] for m in steps] == [1, 2]
    # --resume and --overwrite contradict each other
    assert usage_exit(train, corpus, out, "--resume", "--overwrite") == 2


def test_two_runs_in_one_out_dir_at_once_are_refused(corpus, tmp_path, capsys):
    out = tmp_path / "busy"
    with RunDir(out).locked():  # another run holds the folder
        assert train(corpus, out, "--max-iters", 2) == 2
    assert_clean_error(capsys.readouterr().err, "another gpt.train", str(os.getpid()))
    assert not (out / "ckpt.safetensors").exists()
    assert train(corpus, out, "--max-iters", 2, "--eval-interval", 2) == 0  # free again


def test_stale_temp_files_are_removed_on_the_nextstart_training_process(corpus, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    dead_pid = 2 ** 22 + 12345  # above the default pid_max: no such process
    for name in (f".ckpt.safetensors.tmp-{dead_pid}", f".ckpt.safetensors.tmp-{dead_pid}-0123456789abcdef"):
        (out / name).write_bytes(b"x" * 1000)
    (out / "notes.txt").write_text("mine")
    assert train(corpus, out, "--max-iters", 2, "--eval-interval", 2) == 0
    assert not list(out.glob(".*tmp*"))
    assert (out / "notes.txt").read_text() == "mine"


# -- non-finite values never replace a checkpoint ---------------------------------------------------------------
def test_nan_at_an_evaluation_keeps_the_last_good_checkpoints(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "naneval"
    real_evaluate = trainer.Trainer.evaluate

    def evaluate(self):
        losses = real_evaluate(self)
        if self.step == 6:  # the weights diverged between two evaluations
            with np.errstate(all="ignore"):
                for p in self.model.parameters():
                    p.data *= np.float32("inf")
            return {"train": float("nan"), "val": float("nan")}
        return losses
    monkeypatch.setattr(trainer.Trainer, "evaluate", evaluate)
    assert train(corpus, out, "--max-iters", 9, "--eval-interval", 3) == 1
    assert_clean_error(capsys.readouterr().err, "not finite", "step 6", "untouched")
    for name in ("ckpt.safetensors", "ckpt_best.safetensors"):
        tensors, meta = load_checkpoint(out / name)
        assert meta["step"] == 3
        assert all(np.isfinite(v).all() for v in tensors.values())


def test_an_interrupt_with_non_finite_weights_does_not_save(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "naninterrupt"
    real_step = trainer.Trainer.train_step

    def step(self):
        result = real_step(self)
        if self.step == 4:
            self.model.parameters()[0].data[...] = np.nan
            signal.raise_signal(signal.SIGINT)
        return result
    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    assert train(corpus, out, "--max-iters", 9, "--eval-interval", 3) == 1
    assert_clean_error(capsys.readouterr().err, "NaN", "untouched")
    assert load_checkpoint(out / "ckpt.safetensors")[1]["step"] == 3


# -- signals and kills (real processes) ----------------------------------------------------------------------------
def test_a_signal_while_numpy_loads_exits_quietly(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "gpt.train", "--preset", "tiny", "--out-dir", str(tmp_path / "o")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    time.sleep(0.15)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err


def test_kills_during_saves_never_leave_a_broken_checkpoint(corpus, tmp_path, workdir):
    """SIGKILL at arbitrary moments of a run that saves at every step: the checkpoint always
    loads, and the next start (--resume) removes the temp files the kills left behind."""
    out, err_path = tmp_path / "kill", tmp_path / "stderr.txt"
    rng = np.random.default_rng(0)
    extra = ("--max-iters", 10 ** 6, "--eval-interval", 1, "--eval-iters", 1)
    for round_ in range(4):
        with open(err_path, "w") as err:
            args = extra + (("--resume",) if round_ else ())
            proc = start_training_process(corpus, out, workdir[0] / "data", *args, stderr=err)
            wait_for(out / "ckpt.safetensors", proc, err_path)
            time.sleep(float(rng.uniform(0.05, 0.6)))
            proc.kill()
            proc.wait()
        tensors, meta = load_checkpoint(out / "ckpt.safetensors")
        assert meta["step"] >= 1 and all(np.isfinite(v).all() for v in tensors.values())
    assert train(corpus, out, "--resume", "--max-iters", meta["step"] + 1, "--eval-interval", 1) == 0
    assert not list(out.glob(".*tmp*"))


# -- a checkpoint is untrusted input on --resume ------------------------------------------------------------------------
def _tamper(path, **changes):
    """Rewrite a checkpoint with its train_config changed, as an attacker would: by hand
    (save_checkpoint refuses to write what a reader would refuse)."""
    from safetensors.numpy import save
    tensors, meta = load_checkpoint(path)
    meta["train_config"].update(changes)
    path.write_bytes(save(tensors, metadata={"format": FORMAT, METADATA_KEY: json.dumps(meta)}))


@pytest.mark.parametrize("changes,needle", [
    ({"warmup_iters": "many"}, "warmup-iters"),
    ({"learning_rate": 1e400}, "Infinity"),  # json writes Infinity: refused when read
    ({"n_embd": 10 ** 9}, "n-embd"),
    ({"seed": -1}, "seed"),
    ({"tokenizer": "words"}, "tokenizer"),
])
def test_tampered_train_config_is_a_clean_error(corpus, tmp_path, capsys, changes, needle):
    out = tmp_path / "tampered"
    assert train(corpus, out, "--max-iters", 2, "--eval-interval", 2) == 0
    _tamper(out / "ckpt.safetensors", **changes)
    capsys.readouterr()
    assert train_cli.main(["--resume", "--max-iters", "4", "--out-dir", str(out), "--progress", "false"]) in (1, 2)
    assert_clean_error(capsys.readouterr().err, needle)


@pytest.mark.parametrize("edit", [
    lambda opt: opt["param_groups"][0].update(betas=[0.9]),       # AdamW needs two
    lambda opt: opt["param_groups"][0].update(momentum=0.9),      # a hyperparameter AdamW lacks
    lambda opt: opt.update(type="SGD"),
], ids=["betas", "extra-key", "type"])
def test_an_optimizer_state_that_is_not_this_runs_is_a_clean_error(corpus, tmp_path, capsys, edit):
    from safetensors.numpy import save
    out = tmp_path / "opt"
    assert train(corpus, out, "--max-iters", 2, "--eval-interval", 2) == 0
    tensors, meta = load_checkpoint(out / "ckpt.safetensors")
    edit(meta["optimizer"])
    (out / "ckpt.safetensors").write_bytes(save(tensors, metadata={"format": FORMAT, METADATA_KEY: json.dumps(meta)}))
    capsys.readouterr()
    assert train_cli.main(["--resume", "--max-iters", "4", "--out-dir", str(out), "--progress", "false"]) == 1
    assert_clean_error(capsys.readouterr().err, "optimizer")


def test_resume_never_reads_a_path_the_checkpoint_names(corpus, tmp_path, capsys, monkeypatch):
    out = tmp_path / "paths"
    assert train(corpus, out, "--max-iters", 2, "--eval-interval", 2) == 0
    secret = tmp_path / "secret.txt"
    secret.write_text(make_text(seed=5))
    elsewhere = tmp_path / "elsewhere"
    _tamper(out / "ckpt.safetensors", input=str(secret), data_dir=str(tmp_path / "evil"), out_dir=str(elsewhere))
    read = []
    real = gpt.data._read_text
    monkeypatch.setattr(gpt.data, "_read_text", lambda path, *a, **k: read.append(Path(path)) or real(path, *a, **k))
    assert train_cli.main(["--resume", "--max-iters", "4", "--out-dir", str(out), "--progress", "false"]) == 0
    assert secret not in read and read == []  # the prepared dataset, found by name and hash
    assert not elsewhere.exists() and not (tmp_path / "evil").exists()
    assert load_checkpoint(out / "ckpt.safetensors")[1]["step"] == 4


# -- options --------------------------------------------------------------------------------------------------------------
def test_a_config_too_big_for_memory_exits_2_before_allocating(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(trainer.MODELS["gpt"], "__init__", lambda *a, **k: pytest.fail("allocated a model"))
    assert train(corpus, tmp_path / "big", "--batch-size", 100000, "--block-size", 4096) == 2
    assert_clean_error(capsys.readouterr().err, "memory", "--batch-size")


# -- logs and help ----------------------------------------------------------------------------------------------------
def test_log_file_gets_plain_lines_not_bars(corpus, tmp_path, capsys):
    args = train_args(corpus, tmp_path / "log", "--max-iters", 20, "--eval-interval", 20, "--log-interval", 5)
    args[args.index("--progress") + 1] = "true"  # the default; stderr is not a terminal here
    assert train_cli.main(args) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("step ") and "|" in line]
    assert [line.split(" |")[0] for line in lines] == ["step 5", "step 10", "step 15", "step 20"]
    assert all(" | loss " in line and "ms/step" in line and "tok/s" in line for line in lines)


def test_help_describes_every_option_with_the_presets_values(capsys):
    with pytest.raises(SystemExit) as exc:
        train_cli.main(["--preset", "tiny", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--n-layer N transformer blocks (default: 2)" in text  # tiny's value, not the dataclass's
    assert "--bias [BOOL] biases in Linear layers and LayerNorms, as GPT-2 (default: True)" in text
    assert "--tokenizer {char,bpe,gpt2}" in text and "--model {gpt,bigram}" in text and "--backend {numpy,cupy}" in text
    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--bias [BOOL] biases in Linear layers and LayerNorms, as GPT-2 (default: False)" in text  # the CPU preset's
    assert "--n_layer" not in text  # the underscore spelling works but does not double the help
