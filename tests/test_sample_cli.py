"""``python -m gpt.sample`` as a user runs it: closed or broken stdout, bad options, a
poisoned checkpoint, Ctrl-C and SIGTERM all end with the documented exit code and at most
one line on stderr, never a traceback. (The sampling results themselves are tested in
tests/test_train.py on a trained model.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt import sample as sample_cli
from tinytensor.backend import BACKENDS

from test_checkpoint import TEXT, training_checkpoint

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HANG_GUARD_S = 120  # only so that a broken test fails instead of hanging; never a timing check
pytestmark = pytest.mark.skipif(os.name != "posix", reason="pipes, signals and `sh` as on POSIX")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return training_checkpoint(tmp_path_factory.mktemp("sample") / "ckpt.safetensors")


def command(checkpoint, *args):
    return [sys.executable, "-m", "gpt.sample", "--checkpoint", str(checkpoint), "--prompt", "the", *map(str, args)]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, timeout=HANG_GUARD_S, **kw)


def assert_one_clean_line(stderr: bytes, needle: str):
    text = stderr.decode()
    assert "Traceback" not in text and "Exception ignored" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], text


def test_samples_to_stdout(checkpoint):
    proc = run(command(checkpoint, "--max-new-tokens", 7))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith("the") and len(proc.stdout.decode()) == 3 + 7 + 1
    assert "Traceback" not in proc.stderr.decode()


def test_closed_stdout_is_one_line_and_exit_1(checkpoint):
    cmd = " ".join(f"'{c}'" for c in command(checkpoint, "--max-new-tokens", 5)) + " >&-"
    proc = run(["sh", "-c", cmd])
    assert proc.returncode == 1
    assert_one_clean_line(proc.stderr, "stdout is closed")


def test_reader_that_stops_early_ends_it_quietly(checkpoint):
    """`python -m gpt.sample | head -c 5`: the reader closes the pipe; sampling stops, exit 0."""
    proc = subprocess.Popen(command(checkpoint, "--max-new-tokens", 1_000_000), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = proc.stdout.read(5)
        assert first.startswith(b"the") and len(first) == 5
        proc.stdout.close()  # like head after its 5 bytes
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    text = err.decode()
    assert "Traceback" not in text and "Exception ignored" not in text and "BrokenPipe" not in text, text


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_sampling_exits_130(checkpoint, sig):
    proc = subprocess.Popen(command(checkpoint, "--max-new-tokens", 1_000_000), cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(4)  # the prompt and a token are out: it is generating
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=HANG_GUARD_S)  # keep reading so its last writes cannot block
    finally:
        proc.kill()
    assert proc.returncode == 130
    text = err.decode()
    assert "Traceback" not in text and text.strip().splitlines()[-1] == "interrupted", text


def test_negative_seed_is_bad_usage(checkpoint):
    proc = run(command(checkpoint, "--seed", -1))
    assert proc.returncode == 2 and proc.stdout == b""
    text = proc.stderr.decode()
    assert "Traceback" not in text and "--seed" in text and "-1" in text


def test_non_finite_weights_exit_1_with_one_line(checkpoint, tmp_path):
    def poison(tensors):
        tensors["transformer.wte.weight"][0, 0] = np.nan
    bad = training_checkpoint(tmp_path / "nan.safetensors", edit_tensors=poison)
    proc = run(command(bad))
    assert proc.returncode == 1 and proc.stdout == b""
    assert_one_clean_line(proc.stderr, "non-finite weights (NaN/Inf) in transformer.wte.weight")


# --------------------------------------------------------------------------- in-process: options and prompt files
@pytest.mark.parametrize("args,needle", [
    (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"), (["--seed", "1.5"], "--seed"),
    (["--max-new-tokens", "1000001"], "--max-new-tokens"), (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--num-samples", "0"], "--num-samples"), (["--num-samples", "1001"], "--num-samples"),
    (["--temperature", "nan"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-1"], "temperature"), (["--top-p", "nan"], "--top-p"), (["--top-p", "1.5"], "top_p"),
    (["--top-p", "0"], "top_p"), (["--top-k", "0"], "--top-k"), (["--top-k", "2.5"], "--top-k"),
    (["--backend", "tpu"], "--backend"),
])
def test_bad_options_exit_2(checkpoint, capsys, args, needle):
    with pytest.raises(SystemExit) as ei:
        sample_cli.main(["--checkpoint", str(checkpoint), *args])
    assert ei.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err and needle in captured.err.splitlines()[-1]


def test_bad_prompt_files_are_one_line_errors(checkpoint, tmp_path, capsys):
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("the café".encode("latin-1"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, needle in [(tmp_path, "is a directory"), (not_utf8, "is not UTF-8 text (byte 0xe9 at offset 7)"),
                         (fifo, "not a regular file"), (tmp_path / "nope.txt", "does not exist")]:
        rc = sample_cli.main(["--checkpoint", str(checkpoint), "--prompt-file", str(path)])
        captured = capsys.readouterr()
        assert rc == 1 and captured.out == ""
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and str(path) in lines[0], captured.err


def test_help_describes_every_option_with_its_default(capsys):
    parser = sample_cli.build_parser()
    for action in parser._actions:
        if action.dest in ("help", "kv_cache"):  # a flag: its default is "off"
            continue
        assert action.help and "default" in action.help, action.option_strings
    backend = next(a for a in parser._actions if a.dest == "backend")
    assert tuple(backend.choices) == BACKENDS
    with pytest.raises(SystemExit) as ei:
        sample_cli.main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    assert "(default: 1337)" in out and "numpy, cupy" in out and "130" in out


def test_prompt_in_the_checkpoints_alphabet(checkpoint, capsys):
    """The in-process path with an explicit stream still works (what tests/test_train.py relies on)."""
    import io
    out = io.StringIO()
    assert sample_cli.main(["--checkpoint", str(checkpoint), "--prompt", TEXT[:5], "--max-new-tokens", "3",
                            "--temperature", "0"], out=out) == 0
    assert out.getvalue().startswith(TEXT[:5]) and len(out.getvalue()) == 5 + 3 + 1
