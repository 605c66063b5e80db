"""Tests for gpt.checkpoint: round trips, atomic saves, and clear errors on bad files."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy

from gpt import checkpoint as ckpt
from gpt.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def sample_tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "wte": rng.standard_normal((17, 8)).astype(np.float32),
        "h.0.attn.c_attn.weight": rng.standard_normal((8, 24)),  # float64
        "tokens": rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64),
        "ids": rng.integers(0, 65535, size=(3, 4), dtype=np.uint16),
        "step": np.array(1234, dtype=np.int64),  # 0-d
        "lr": np.array(3e-4, dtype=np.float32),  # 0-d
        "empty": np.zeros((0, 3), dtype=np.float32),
        "mask": np.array([True, False, True]),
    }


METADATA = {
    "config": {"n_layer": 2, "n_head": 4, "n_embd": 8, "dropout": 0.0, "bias": True},
    "tokenizer": '{"kind": "char", "chars": "ab\\n\\u00e9"}',
    "step": 1234,
    "best_val_loss": 1.4821,
    "history": [[0, 4.2], [100, 2.5]],
    "note": "naïve ünïcödé",
    "none": None,
}


def assert_same(a, b):
    assert set(a) == set(b)
    for k in a:
        assert b[k].dtype == np.asarray(a[k]).dtype, k
        assert b[k].shape == np.asarray(a[k]).shape, k
        assert np.array_equal(b[k], a[k]), k


def test_round_trip(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    tensors = sample_tensors()
    returned = save_checkpoint(path, tensors, METADATA)
    assert returned == path
    got, meta = load_checkpoint(path)
    assert_same(tensors, got)
    assert meta == METADATA
    assert got["step"].shape == () and got["step"].item() == 1234
    # loaded arrays are ordinary writable arrays (callers copy them into parameters)
    for arr in got.values():
        assert isinstance(arr, np.ndarray) and arr.flags.writeable
    got["wte"][0, 0] = 99.0


def test_header_layout(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"a": np.ones(2, np.float32)}, {"x": [1, {"y": 2}]})
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        header = f.metadata()
    assert header["format"] == "tinytensor-ckpt-v1"
    assert json.loads(header["tinytensor"]) == {"x": [1, {"y": 2}]}


def test_non_contiguous_and_device_like_arrays(tmp_path):
    class FakeCupyArray:
        """Stands in for a cupy array: .get() copies to the host."""

        def __init__(self, arr):
            self._arr = arr

        def get(self):
            return self._arr

    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, {"t": base.T, "slice": base[:, ::2], "dev": FakeCupyArray(base * 2)}, {})
    got, meta = load_checkpoint(path)
    assert np.array_equal(got["t"], base.T)
    assert np.array_equal(got["slice"], base[:, ::2])
    assert np.array_equal(got["dev"], base * 2)
    assert meta == {}


def test_overwrite_and_parent_dirs(tmp_path):
    path = tmp_path / "out" / "run1" / "ckpt.safetensors"
    save_checkpoint(path, sample_tensors(0), {"step": 1})
    save_checkpoint(path, sample_tensors(1), {"step": 2})
    got, meta = load_checkpoint(path)
    assert meta == {"step": 2}
    assert_same(sample_tensors(1), got)
    assert os.listdir(path.parent) == ["ckpt.safetensors"]


def test_file_permissions_follow_umask(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"a": np.zeros(1)}, {})
    ref = tmp_path / "ref"
    ref.write_bytes(b"")
    assert (path.stat().st_mode & 0o777) == (ref.stat().st_mode & 0o777)


# --------------------------------------------------------------------------- atomicity


def _fail_replace(monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full (simulated) at rename")

    monkeypatch.setattr(ckpt.os, "replace", boom)


def _fail_serialise(monkeypatch):
    def boom(*a, **k):
        raise MemoryError("simulated failure while serialising")

    monkeypatch.setattr(safetensors.numpy, "save", boom)


def _fail_after_partial_write(monkeypatch):
    # the temp file has (all) its bytes but the process dies before fsync/rename
    def boom(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "fsync", boom)


@pytest.mark.parametrize("fail", [_fail_replace, _fail_serialise, _fail_after_partial_write])
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail):
    path = tmp_path / "ckpt.safetensors"
    old = sample_tensors(0)
    save_checkpoint(path, old, {"step": 100})
    before = path.read_bytes()

    fail(monkeypatch)
    with pytest.raises((OSError, MemoryError, KeyboardInterrupt)):
        save_checkpoint(path, sample_tensors(1), {"step": 200})
    monkeypatch.undo()

    assert path.read_bytes() == before
    got, meta = load_checkpoint(path)
    assert meta == {"step": 100}
    assert_same(old, got)
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]  # no temp files left behind


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    _fail_replace(monkeypatch)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ckpt.safetensors", sample_tensors(), {})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- bad inputs to save


def test_save_rejects_bad_input(tmp_path):
    path = tmp_path / "c.safetensors"
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(path, {"a": np.zeros(1)}, {"bad": object()})
    with pytest.raises(CheckpointError, match="dtype"):
        save_checkpoint(path, {"a": np.array(["x", "y"], dtype=object)}, {})
    with pytest.raises(CheckpointError, match="names"):
        save_checkpoint(path, {3: np.zeros(1)}, {})
    with pytest.raises(CheckpointError, match="directory"):
        save_checkpoint(tmp_path, {"a": np.zeros(1)}, {})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- bad files to load


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "ckpt.safetensors"
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert str(path) in msg
    assert "python -m gpt.train" in msg and "--checkpoint" in msg


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.99, 4 / 1e9, 0.0])
def test_truncated_file(tmp_path, keep):
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, sample_tensors(), METADATA)
    raw = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError, match="not a valid tinytensor checkpoint"):
        load_checkpoint(bad)


def test_random_bytes(tmp_path):
    bad = tmp_path / "random.safetensors"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="not a valid tinytensor checkpoint"):
        load_checkpoint(bad)


def test_other_formats(tmp_path):
    npz = tmp_path / "model.npz"
    np.savez(npz, a=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a valid tinytensor checkpoint"):
        load_checkpoint(npz)
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match="not a valid tinytensor checkpoint"):
        load_checkpoint(txt)


def test_foreign_safetensors_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(3, np.float32)}, str(plain))
    with pytest.raises(CheckpointError, match="not written by gpt.train"):
        load_checkpoint(plain)
    other_meta = tmp_path / "hf.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(3, np.float32)}, str(other_meta), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not written by gpt.train"):
        load_checkpoint(other_meta)


def test_wrong_format_version_or_bad_json(tmp_path):
    p = tmp_path / "v2.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(1)}, str(p),
                                metadata={"format": "tinytensor-ckpt-v2", "tinytensor": "{}"})
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(p)
    q = tmp_path / "badjson.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(1)}, str(q),
                                metadata={"format": "tinytensor-ckpt-v1", "tinytensor": "{oops"})
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(q)
