"""gpt.atomic: a write is complete or absent, never follows a planted symlink, and the temp
files of killed writers are cleaned up (only theirs)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt import atomic
from gpt.atomic import atomic_write_bytes, remove_stale_temps

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name != "posix", reason="symlinks, umask and signals as on POSIX")


def temps(directory):
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp-" in p.name)


def test_write_replace_and_nothing_left_behind(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    atomic_write_bytes(path, b"first")
    atomic_write_bytes(str(path), memoryview(b"second"))
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o027])
def test_permissions_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
        (tmp_path / "ref").write_bytes(b"")  # what any other program would create
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "f").stat().st_mode & 0o777 == (tmp_path / "ref").stat().st_mode & 0o777


def test_symlink_at_the_old_predictable_temp_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    planted = out / f".ckpt.safetensors.tmp-{os.getpid()}"  # the name older versions wrote through
    planted.symlink_to(victim)
    atomic_write_bytes(out / "ckpt.safetensors", b"new checkpoint")
    assert victim.read_bytes() == b"precious"
    assert (out / "ckpt.safetensors").read_bytes() == b"new checkpoint"
    assert planted.is_symlink()  # left alone: not ours


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_planted_at_the_drawn_temp_name_is_not_followed(tmp_path, monkeypatch, dangling):
    """Even a link at exactly the random name drawn (as if guessed) is never written through:
    the temp file is created exclusively, and another name is drawn."""
    victim = tmp_path / ("missing.txt" if dangling else "victim.txt")
    if not dangling:
        victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    planted = out / f".ckpt.safetensors.tmp-{os.getpid()}-{'0' * 16}"
    planted.symlink_to(victim)
    names = iter(["0" * 16, "1" * 16])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    atomic_write_bytes(out / "ckpt.safetensors", b"new")
    assert (out / "ckpt.safetensors").read_bytes() == b"new"
    assert planted.is_symlink()
    if dangling:
        assert not victim.exists()  # not created through the link
    else:
        assert victim.read_bytes() == b"precious"
    assert temps(out) == [planted.name]


def test_a_symlink_at_the_target_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tmp_path / "ckpt").symlink_to(victim)
    atomic_write_bytes(tmp_path / "ckpt", b"new")
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "ckpt").is_symlink() and (tmp_path / "ckpt").read_bytes() == b"new"


@pytest.mark.parametrize("error", [OSError("disk full (simulated)"), KeyboardInterrupt()])
def test_failure_at_rename_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch, error):
    path = tmp_path / "ckpt"
    atomic_write_bytes(path, b"old")

    def fail(*args):
        raise error
    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(type(error)):
        atomic_write_bytes(path, b"new" * 1000)
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ckpt"]


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "nope" / "ckpt", b"x")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- killed writers
WRITER = textwrap.dedent("""
    import os, sys, time
    from gpt import atomic
    hook = sys.argv[2]
    real = getattr(os, hook)
    def stop_here(*args):
        print("ready", flush=True)  # the parent kills us now: data written, not yet renamed
        time.sleep(600)
        return real(*args)
    setattr(atomic.os, hook, stop_here)
    atomic.atomic_write_bytes(sys.argv[1], b"n" * (32 << 20))
""")


@pytest.mark.parametrize("hook", ["fsync", "replace"])
def test_sigkill_during_a_save_keeps_the_previous_file(tmp_path, hook):
    path = tmp_path / "ckpt.safetensors"
    atomic_write_bytes(path, b"previous checkpoint")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), hook], cwd=REPO, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.kill()
    finally:
        proc.wait()
        proc.stdout.close()
    assert path.read_bytes() == b"previous checkpoint"
    left = temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".ckpt.safetensors.tmp-{proc.pid}-")
    assert remove_stale_temps(tmp_path) == [tmp_path / left[0]]  # its writer is gone
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


# --------------------------------------------------------------------------- remove_stale_temps
@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_remove_stale_temps_removes_only_dead_writers_temps(tmp_path, dead_pid, live_pid):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    d = tmp_path / "out"
    d.mkdir()
    stale = [f".ckpt.safetensors.tmp-{dead_pid}-{'a' * 16}", f".ckpt.safetensors.tmp-{dead_pid}",
             f".meta.json.tmp-{dead_pid}-{'b' * 16}"]
    kept = [f".ckpt.safetensors.tmp-{live_pid}-{'c' * 16}",  # a writer still running
            f".ckpt.safetensors.tmp-{os.getpid()}-{'d' * 16}",  # ours, being written now
            "ckpt.safetensors", ".hidden", "notes.tmp-123", f".ckpt.tmp-{dead_pid}-not-hex",
            f"ckpt.safetensors.tmp-{dead_pid}"]  # no leading dot: not a name we make
    for name in stale + kept:
        (d / name).write_bytes(b"x")
    link = d / f".train.bin.tmp-{dead_pid}"  # a stale name that is a symlink: unlink it, never its target
    link.symlink_to(victim)
    stale.append(link.name)
    folder = d / f".data.tmp-{dead_pid}-{'e' * 16}"  # a directory: not ours to delete
    folder.mkdir()
    kept.append(folder.name)

    removed = remove_stale_temps(d)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert all(p.parent == d for p in removed)
    assert sorted(os.listdir(d)) == sorted(kept)
    assert victim.read_bytes() == b"precious"
    assert remove_stale_temps(d) == []


def test_remove_stale_temps_of_our_pid_left_by_an_earlier_process(tmp_path):
    """pids repeat (pid 1 in every container start): a temp with our pid that is older than
    this process was left by a predecessor."""
    old = tmp_path / f".ckpt.tmp-{os.getpid()}-{'f' * 16}"
    new = tmp_path / f".ckpt.tmp-{os.getpid()}-{'0' * 16}"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    past = atomic._IMPORTED_AT - 3600
    os.utime(old, (past, past))
    assert remove_stale_temps(tmp_path) == [old]
    assert new.exists()


def test_remove_stale_temps_filters_by_name_and_tolerates_missing_dirs(tmp_path, dead_pid):
    a = tmp_path / f".ckpt.safetensors.tmp-{dead_pid}-{'1' * 16}"
    b = tmp_path / f".train.bin.tmp-{dead_pid}-{'2' * 16}"
    a.write_bytes(b"")
    b.write_bytes(b"")
    assert remove_stale_temps(tmp_path, names=["train.bin", "val.bin"]) == [b]
    assert a.exists()
    assert remove_stale_temps(tmp_path / "nope") == []
    assert remove_stale_temps(a) == []  # not a directory
