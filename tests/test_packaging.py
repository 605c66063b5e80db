"""A user's install: `pip install .` (not editable) puts only `tinytensor` and `gpt` into
site-packages, and running `python -m gpt.train` from another folder writes its data to the
per-user cache (or --data-dir), never into site-packages."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path):
    return {p.relative_to(root) for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The package installed with pip into a folder of its own (its site-packages)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           str(REPO)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"pip could not build the package here: {proc.stderr.strip()[-300:]}")
    return target


def test_only_the_two_libraries_are_installed(installed):
    tops = {p.name for p in installed.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    assert tops == {"tinytensor", "gpt"}, tops


def test_training_from_another_folder_writes_nothing_into_site_packages(installed, tmp_path):
    before = _files(installed)
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    text = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(300))
    (work / "my.txt").write_text(text, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("GPT_DATA_DIR", "XDG_CACHE_HOME", "PYTHONPATH")}
    env.update(PYTHONPATH=str(installed), HOME=str(home), OPENBLAS_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "gpt.train", "--preset", "tiny", "--input", "my.txt", "--max-iters", "2",
           "--eval-interval", "2", "--eval-iters", "1", "--sample-tokens", "0"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(installed) == before  # nothing written into site-packages
    prepared = home / ".cache" / "tinytensor-gpt" / "my_char" / "meta.json"
    assert prepared.is_file(), proc.stderr  # the per-user cache
    # nothing else in the user's home: matplotlib's font cache goes to the data dir too
    assert {p.relative_to(home) for p in home.glob("*/*")} == {Path(".cache/tinytensor-gpt")}
    assert (work / "out" / "loss.png").is_file()
    assert (work / "out" / "ckpt.safetensors").is_file()
    # --data-dir wins
    proc = subprocess.run(cmd + ["--data-dir", "d", "--out-dir", "o"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (work / "d" / "my_char" / "meta.json").is_file()
