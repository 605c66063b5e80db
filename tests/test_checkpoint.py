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
    assert header["format"] == "tinytensor-ckpt-v2"
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
    p = tmp_path / "v0.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(1)}, str(p),
                                metadata={"format": "tinytensor-ckpt-v0", "tinytensor": "{}"})
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(p)
    q = tmp_path / "badjson.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(1)}, str(q),
                                metadata={"format": "tinytensor-ckpt-v1", "tinytensor": "{oops"})
    with pytest.raises(CheckpointError, match="JSON"):
        load_checkpoint(q)


def test_save_refuses_metadata_a_reader_would_refuse(tmp_path):
    path = tmp_path / "c.safetensors"
    for bad in ({"best_val_loss": float("nan")}, {"x": float("inf")}):
        with pytest.raises(CheckpointError, match="JSON"):
            save_checkpoint(path, {"a": np.zeros(1)}, bad)
    deep = []
    for _ in range(100):
        deep = [deep]
    with pytest.raises(CheckpointError, match="nested"):
        save_checkpoint(path, {"a": np.zeros(1)}, {"deep": deep})
    assert not path.exists()


# =========================================================================== untrusted checkpoints
# A checkpoint is untrusted input: every tampered file below must give a CheckpointError
# that names the problem, before anything is allocated for it.
import math  # noqa: E402
import struct  # noqa: E402

import tinytensor as tt  # noqa: E402
from gpt import checkpoint_validate as cv  # noqa: E402
from gpt import resources  # noqa: E402
from gpt.checkpoint import (pack_training_state, read_checkpoint_metadata,  # noqa: E402
                            unpack_training_state, validate_model_meta, validate_training_meta,
                            weights_are_finite)
from gpt.generate import load_model  # noqa: E402
from gpt.model import MODELS, BigramLM, GPT, GPTConfig  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402

TEXT = "the king hath come, sweet lady; good night fair queen\n"


def training_checkpoint(path, model_type="gpt", edit_meta=None, edit_tensors=None, history=False, **config):
    """A small checkpoint laid out as gpt.train writes it (weights, AdamW moments after one
    step, model/train config, tokenizer, step, both rng states); ``edit_*`` tamper with it."""
    tok = CharTokenizer.train(TEXT)
    cfg = GPTConfig(**{**dict(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8), **config})
    model = MODELS[model_type](cfg)
    opt = model.configure_optimizers(0.1, 1e-3)
    ids = tok.encode(TEXT)
    _, loss = model(np.array([ids[:16]]), np.array([ids[1:17]]))
    loss.backward()
    opt.step()
    meta = {"model_type": model_type, "model_config": cfg.to_dict(), "train_config": {"max_iters": 10},
            "tokenizer": tok.to_json(), "step": 1, "best_val_loss": 2.5, "elapsed_s": 1.0,
            "rng": {"batches": np.random.default_rng(1).bit_generator.state, "tinytensor": tt.get_rng_state()}}
    if history:  # checkpoints before metrics.jsonl carried the per-step history
        meta["history"] = {"step": [1], "loss": [4.2], "eval_step": [], "train_loss": [], "val_loss": []}
    tensors, meta = pack_training_state(model, opt, meta)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_checkpoint(path, tensors, meta)
    return path


def write_raw(path, header, data=b""):
    """A safetensors-shaped file from a header (dict, str or bytes) and data bytes, unchecked."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


OUR_META = {"format": "tinytensor-ckpt-v1", "tinytensor": "{}"}


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if a model is built or a tensor read: a bad file must be refused first."""
    def forbidden(*a, **k):
        raise AssertionError("a model was built or a tensor read for a checkpoint that should be refused")
    monkeypatch.setattr(GPT, "__init__", forbidden)
    monkeypatch.setattr(BigramLM, "__init__", forbidden)
    monkeypatch.setattr(ckpt, "_read_tensor", forbidden)


def test_training_checkpoint_round_trip_and_history_still_loads(tmp_path):
    for history in (False, True):
        path = training_checkpoint(tmp_path / f"h{history}.safetensors", history=history)
        meta, specs = read_checkpoint_metadata(path)
        model_type, config, tok = validate_model_meta(meta, path, specs)
        validate_training_meta(meta, path, specs)
        assert model_type == "gpt" and config.n_embd == 8 and tok.vocab_size == config.vocab_size
        assert specs["transformer.wte.weight"].shape == (config.vocab_size, 8)
        model, tok2, meta2 = load_model(path)
        assert meta2 == meta and tok2.to_json() == tok.to_json()
        tensors, _ = load_checkpoint(path)
        model_state, opt_state = unpack_training_state(tensors, meta)
        assert all(np.array_equal(model.state_dict()[k], v) for k, v in model_state.items())
        assert opt_state["param_groups"][0]["betas"] == (0.9, 0.95)


def test_bigram_checkpoint_loads(tmp_path):
    model, tok, meta = load_model(training_checkpoint(tmp_path / "b.safetensors", "bigram"))
    assert isinstance(model, BigramLM) and meta["model_type"] == "bigram"


def test_load_model_reads_only_the_weights(tmp_path, monkeypatch):
    path = training_checkpoint(tmp_path / "c.safetensors")
    read = []
    real = ckpt._read_tensor
    monkeypatch.setattr(ckpt, "_read_tensor", lambda f, spec, base, name, p: read.append(name) or
                        real(f, spec, base, name, p))
    model, _, _ = load_model(path)
    assert read == list(model.state_dict())  # never optimizer.*
    read.clear()
    tensors, _ = load_checkpoint(path, names=["transformer.wpe.weight"])
    assert list(tensors) == read == ["transformer.wpe.weight"]
    read.clear()
    meta, specs = read_checkpoint_metadata(path)
    assert read == [] and any(n.startswith("optimizer.") for n in specs)
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        load_checkpoint(path, names=["nope"])


def test_files_written_by_safetensors_itself_read_the_same(tmp_path):
    path = tmp_path / "st.safetensors"
    tensors = sample_tensors()
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "tinytensor-ckpt-v1",
                                                              "tinytensor": json.dumps(METADATA)})
    got, meta = load_checkpoint(path)
    assert_same(tensors, got) and meta == METADATA


# --------------------------------------------------------------------------- the header
def nested(depth):
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("header,needle", [
    ('{"a": ' + nested(100_000) + "}", "nested"),
    ('{"__metadata__": {"format": "x"}, "a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}}',
     "non-finite"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], '
     '"data_offsets": [0, 4]}}', "twice"),
    ('[1, 2]', "not a JSON object"),
    ('{"__metadata__": {"format": 3}}', "__metadata__"),
    ('{"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}', "dtype"),
    ('{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', "shape"),
    ('{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "shape"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}', "tensor description"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}}', "outside"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}', "outside"),
    ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "needs 8 bytes"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     '"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "overlap"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "gap"),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "holds 8 data bytes"),
    ('{"a": {"dtype": "F32", "shape": [100000, 100000, 100000], "data_offsets": [0, 8]}}', "needs"),
])
def test_tampered_header(tmp_path, no_allocation, header, needle):
    path = write_raw(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match="not a valid tinytensor checkpoint") as ei:
        load_checkpoint(path)
    assert needle in str(ei.value)
    with pytest.raises(CheckpointError):
        read_checkpoint_metadata(path)


def test_header_length_too_large_or_past_the_end(tmp_path, no_allocation):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(CheckpointError, match="more than the 16777216"):
        load_checkpoint(huge)
    big = tmp_path / "big.safetensors"  # really that long: refused for its size, not for a short file
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", cv.MAX_HEADER_BYTES + 1))
        f.truncate(8 + cv.MAX_HEADER_BYTES + 1)
    with pytest.raises(CheckpointError, match="more than the 16777216"):
        load_checkpoint(big)
    short = tmp_path / "short.safetensors"
    short.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(CheckpointError, match="claims 1000 bytes but only 2 follow"):
        load_checkpoint(short)


def test_bool_tensor_bytes_must_be_0_or_1(tmp_path):
    path = write_raw(tmp_path / "b.safetensors", {"__metadata__": OUR_META,
                                                  "m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}},
                     b"\x01\x07")
    with pytest.raises(CheckpointError, match="0 and 1"):
        load_checkpoint(path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "ckpt.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(fifo)


# --------------------------------------------------------------------------- the metadata
@pytest.mark.parametrize("text,needle", [
    (nested(100_000), "nested"),
    ('{"step": NaN}', "NaN"),
    ('{"best_val_loss": Infinity}', "Infinity"),
    ('{"best_val_loss": -Infinity}', "Infinity"),
    ('{"best_val_loss": 1e999}', "float range"),
    ('{"step": 1, "step": 2}', "twice"),
    ('[]', "not a JSON object"),
])
def test_tampered_metadata_json(tmp_path, no_allocation, text, needle):
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(1, np.float32)}, str(path),
                                metadata={"format": "tinytensor-ckpt-v1", "tinytensor": text})
    for load in (load_checkpoint, read_checkpoint_metadata, load_model):
        with pytest.raises(CheckpointError, match=needle):
            load(path)


def _set(path_in_meta, value):
    def edit(meta):
        *parents, last = path_in_meta
        target = meta
        for key in parents:
            target = target[key]
        if value is KeyError:
            del target[last]
        else:
            target[last] = value
    return edit


BIG = 10**9
MODEL_META_CASES = [
    (("model_config", "n_embd"), "128", "n_embd must be an integer"),
    (("model_config", "n_layer"), True, "n_layer must be an integer"),
    (("model_config", "n_embd"), 1.5, "n_embd must be an integer"),
    (("model_config", "n_embd"), None, "n_embd must be an integer"),
    (("model_config", "n_embd"), BIG, "n_embd must be an integer in [1, 65536], got 1000000000"),
    (("model_config", "vocab_size"), BIG, "vocab_size must be an integer in [1, 1048576]"),
    (("model_config", "block_size"), -3, "block_size"),
    (("model_config", "n_head"), 3, "divisible"),
    (("model_config", "dropout"), 1.0, "dropout"),
    (("model_config", "dropout"), "0.1", "dropout"),
    (("model_config", "bias"), "yes", "bias must be true or false"),
    (("model_config", "bias"), 1, "bias must be true or false"),
    (("model_config", "norm_eps"), 0.0, "norm_eps must be a number in (0, 1]"),
    (("model_config", "norm_eps"), "1e-5", "norm_eps"),
    (("model_config", "n_layer"), KeyError, "missing n_layer"),
    (("model_config", "lora_rank"), 4, "unknown 'lora_rank'"),
    (("model_config",), [1, 2], "model_config' must be an object"),
    (("model_type",), "resnet", "model_type"),
    (("model_type",), ["gpt"], "model_type"),
    (("model_type",), KeyError, "model_type"),
    (("step",), -1, "'step' must be a non-negative integer"),
    (("step",), "5", "'step'"),
    (("step",), True, "'step'"),
    (("tokenizer",), 42, "tokenizer"),
    (("tokenizer",), "{oops", "tokenizer JSON is not valid JSON"),
    (("tokenizer",), nested(100_000), "nested"),
    (("tokenizer",), '{"kind": "char", "chars": "ab"}', "tokenizer has 2 tokens but model_config.vocab_size"),
    (("tokenizer",), '{"kind": "wordpiece"}', "unknown tokenizer kind"),
    (("tokenizer",), '{"kind": "char", "chars": 7}', "tokenizer is invalid"),
    # each merge doubles the longest token: 60 merges would spell 2**60 bytes if built
    (("tokenizer",), json.dumps({"kind": "bpe", "merges": [[0, 0]] + [[255 + i, 255 + i] for i in range(1, 60)]}),
     "merges spell out"),
    (("tokenizer",), json.dumps({"kind": "bpe", "merges": [[0, 0]] * 70000}), "merges"),
    (("tokenizer",), json.dumps({"kind": "gpt2", "byte_order": [0] * 256, "merges": [], "special": []}),
     "tokenizer is invalid"),
]


@pytest.mark.parametrize("where,value,needle", MODEL_META_CASES)
def test_tampered_model_metadata(tmp_path, where, value, needle):
    path = training_checkpoint(tmp_path / "t.safetensors", edit_meta=_set(where, value))
    with pytest.MonkeyPatch.context() as mp:  # refused before any model or tensor exists
        mp.setattr(GPT, "__init__", lambda *a: pytest.fail("GPT built for a bad checkpoint"))
        mp.setattr(BigramLM, "__init__", lambda *a: pytest.fail("BigramLM built for a bad checkpoint"))
        mp.setattr(ckpt, "_read_tensor", lambda *a: pytest.fail("tensor read for a bad checkpoint"))
        with pytest.raises(CheckpointError) as ei:
            load_model(path)
    assert needle in str(ei.value) and str(path) in str(ei.value)


def test_a_model_too_large_for_memory_is_refused_before_allocating(tmp_path, no_allocation):
    # within the hard limits, but 12 * 65536**2 * 1024 parameters fit in no machine
    meta = {"model_type": "gpt", "step": 0, "tokenizer": CharTokenizer.train(TEXT).to_json(),
            "model_config": dict(vocab_size=1000, block_size=1024, n_layer=1024, n_head=64, n_embd=65536,
                                 dropout=0.0, bias=True)}
    path = tmp_path / "huge.safetensors"
    safetensors.numpy.save_file({"a": np.zeros(1, np.float32)}, str(path),
                                metadata={"format": "tinytensor-ckpt-v1", "tinytensor": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"needs [\d.]+ GiB of memory but only"):
        load_model(path)


def test_a_small_model_is_refused_when_memory_is_short(tmp_path, monkeypatch):
    small = training_checkpoint(tmp_path / "small.safetensors")
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 1000)  # pretend
    monkeypatch.setattr(ckpt, "_read_tensor", lambda *a: pytest.fail("tensor read although memory is short"))
    with pytest.raises(CheckpointError, match=r"\(\d[\d,]* parameters\) needs 0.00 GiB of memory but only"):
        load_model(small)


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.pop("transformer.ln_f.bias"), "missing weights: transformer.ln_f.bias"),
    (lambda t: t.update(extra=np.zeros(3, np.float32)), "unexpected tensors: extra"),
    (lambda t: t.update({"transformer.wpe.weight": np.zeros((17, 8), np.float32)}),
     "wrong shapes: transformer.wpe.weight (17, 8) (expected (16, 8))"),
    (lambda t: t.update({"transformer.wpe.weight": np.zeros((16, 8), np.int32)}), "non-float weights"),
])
def test_weights_must_match_the_config(tmp_path, edit, needle):
    path = training_checkpoint(tmp_path / "w.safetensors", edit_tensors=edit)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, "_read_tensor", lambda *a: pytest.fail("tensor read for a bad checkpoint"))
        with pytest.raises(CheckpointError, match="do not fit its model_config") as ei:
            load_model(path)
    assert needle in str(ei.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_cannot_be_sampled(tmp_path, bad):
    def poison(t):
        t["transformer.h.0.mlp.c_fc.weight"][3, 1] = bad
    path = training_checkpoint(tmp_path / "nan.safetensors", edit_tensors=poison)
    with pytest.raises(CheckpointError) as ei:
        load_model(path)
    msg = str(ei.value)
    assert "non-finite weights (NaN/Inf) in transformer.h.0.mlp.c_fc.weight" in msg
    assert str(path) in msg and "ckpt_best.safetensors" in msg


def test_weights_are_finite():
    assert weights_are_finite({"a": np.ones(3), "ids": np.arange(3)}) == (True, None)
    assert weights_are_finite({"a": np.ones(3), "b": np.array([1.0, np.inf]), "c": np.array([np.nan])}) == \
        (False, "b")
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=4))
    assert weights_are_finite(model) == (True, None)
    model.transformer.ln_f.weight.data[0] = np.nan
    assert weights_are_finite(model) == (False, "transformer.ln_f.weight")


# --------------------------------------------------------------------------- resuming
def _pcg(**change):
    state = np.random.default_rng(0).bit_generator.state
    state["state"].update({k: v for k, v in change.items() if k in state["state"]})
    state.update({k: v for k, v in change.items() if k not in state["state"]})
    return state


TRAINING_META_CASES = [
    (("train_config",), "fast", "'train_config' must be an object"),
    (("step",), -2, "'step'"),
    (("best_val_loss",), "low", "'best_val_loss' must be null or a finite number"),
    (("elapsed_s",), -1.0, "'elapsed_s'"),
    (("data",), ["x"], "'data'"),
    (("rng",), {"batches": _pcg()}, "'rng'"),
    (("rng", "batches"), _pcg(bit_generator="MT19937"), "rng.batches"),
    (("rng", "batches"), _pcg(state=-1), "rng.batches"),
    (("rng", "tinytensor"), _pcg(inc=2**130 + 1), "rng.tinytensor"),
    (("rng", "tinytensor"), _pcg(inc=4), "rng.tinytensor"),
    (("rng", "tinytensor"), _pcg(has_uint32=5), "rng.tinytensor"),
    (("rng", "tinytensor"), _pcg(uinteger=2**40), "rng.tinytensor"),
    (("rng", "tinytensor"), "seed 3", "rng.tinytensor"),
    (("optimizer",), KeyError, "no optimizer state"),
    (("optimizer", "state"), {"0": {"step": "one"}}, "'state'"),
    (("optimizer", "state"), {"999": {"step": 1}}, "'state'"),
    (("optimizer", "state"), {"x": {"step": 1}}, "'state'"),
    (("optimizer", "type"), "../AdamW", "'type'"),
    (("optimizer", "param_groups"), [], "non-empty"),
    (("optimizer", "param_groups", 0, "betas"), ["x", 0.9], "betas"),
    (("optimizer", "param_groups", 0, "lr"), "fast", "lr"),
    (("optimizer", "param_groups", 0, "params"), [0, 0], "0..n-1"),
    (("optimizer", "param_groups", 0, "Bad Key"), True, "named hyperparameters"),
]


@pytest.mark.parametrize("where,value,needle", TRAINING_META_CASES)
def test_tampered_training_metadata(tmp_path, where, value, needle):
    path = training_checkpoint(tmp_path / "r.safetensors", edit_meta=_set(where, value))
    meta, specs = read_checkpoint_metadata(path)
    with pytest.raises(CheckpointError) as ei:
        validate_training_meta(meta, path, specs)
    assert needle in str(ei.value) and str(path) in str(ei.value)
    if where[0] == "optimizer" and value is not KeyError:  # unpacking says the same, not KeyError
        tensors, _ = load_checkpoint(path)
        with pytest.raises(CheckpointError):
            unpack_training_state(tensors, meta, path)


def test_missing_or_mismatched_optimizer_tensors(tmp_path):
    path = training_checkpoint(tmp_path / "o.safetensors", edit_tensors=lambda t: t.pop("optimizer.0.exp_avg_sq"))
    meta, specs = read_checkpoint_metadata(path)
    with pytest.raises(CheckpointError, match="optimizer.0.exp_avg_sq are missing"):
        validate_training_meta(meta, path, specs)
    tensors, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="optimizer.0.exp_avg_sq are missing"):
        unpack_training_state(tensors, meta, path)
    path2 = training_checkpoint(tmp_path / "o2.safetensors",
                               edit_tensors=lambda t: t.update({"optimizer.1.exp_avg": np.zeros(3, np.float32)}))
    meta, specs = read_checkpoint_metadata(path2)
    with pytest.raises(CheckpointError, match="of one shape"):
        validate_training_meta(meta, path2, specs)


# --------------------------------------------------------------------------- GPTConfig, resources
@pytest.mark.parametrize("model_type", list(MODELS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("sizes", [dict(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=16),
                                   dict(vocab_size=7, block_size=3, n_layer=3, n_head=4, n_embd=12)])
@pytest.mark.parametrize("options", [{}, dict(pos="rope"), dict(norm="rmsnorm"), dict(norm_gain=False),
                                     dict(norm="rmsnorm", norm_gain=False), dict(mlp="relu2"),
                                     dict(mlp="swiglu"), dict(qk_norm=True), dict(tie_head=False),
                                     dict(zero_init_proj=True),
                                     dict(pos="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True,
                                          tie_head=False, zero_init_proj=True)], ids=str)
def test_param_shapes_and_count_match_the_real_models(model_type, bias, sizes, options):
    if options.get("pos") == "rope" and (sizes["n_embd"] // sizes["n_head"]) % 2:
        sizes = {**sizes, "n_head": 2}  # rope needs an even head size
    config = GPTConfig(**sizes, bias=bias, **options)
    model = MODELS[model_type](config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(config.param_shapes(model_type).items()) == list(shapes.items())
    assert config.num_parameters(model_type) == model.num_parameters()


def test_gpt_config_types():
    assert GPTConfig(n_embd=np.int64(384), dropout=0, bias=np.bool_(False)).to_dict() == \
        dict(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0, bias=False,
             pos="learned", norm="layernorm", norm_gain=True, mlp="gelu", qk_norm=False, tie_head=True,
             zero_init_proj=False, norm_eps=1e-5)
    assert type(GPTConfig(n_embd=np.int64(384)).n_embd) is int  # JSON-serialisable
    for bad in (dict(n_layer=True), dict(n_embd=384.0), dict(vocab_size="65"), dict(dropout=math.nan),
                dict(dropout=math.inf), dict(dropout=True), dict(bias=None), dict(block_size=2**21),
                dict(pos="alibi"), dict(norm="batchnorm"), dict(mlp="tanh"), dict(norm_gain=1),
                dict(qk_norm="yes"), dict(tie_head=None), dict(zero_init_proj=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GPTConfig(**bad)
    with pytest.raises(ValueError, match="rope .* must be even"):
        GPTConfig(pos="rope", n_embd=30, n_head=2)
    huge = GPTConfig(vocab_size=2**20, block_size=2**20, n_layer=1024, n_head=1, n_embd=2**16)
    assert huge.num_parameters() > 5 * 10**13  # counted, not allocated


def test_check_fits(monkeypatch):
    assert resources.available_memory_bytes() is None or resources.available_memory_bytes() > 0
    resources.check_fits(1, "one byte")
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: 2 << 30)
    with pytest.raises(resources.ResourceError, match=r"the thing needs 3.00 GiB of memory but only 2.00 GiB "
                                                      r"is available; buy more"):
        resources.check_fits(3 << 30, "the thing", "buy more")
    monkeypatch.setattr(resources, "available_memory_bytes", lambda: None)
    resources.check_fits(10**18, "anything")  # unknown: do not refuse


# --------------------------------------------------------------------------- the format: any optimizer, v1 read
def _stepped(optimizer_factory):
    model = MODELS["gpt"](GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
    opt = optimizer_factory(model)
    for _ in range(2):
        opt.zero_grad()
        _, loss = model(np.arange(8)[None] % 11, np.arange(1, 9)[None] % 11)
        loss.backward()
        opt.step()
    return model, opt


def _muon_and_adamw(model):
    """gpt.train's --optimizer muon: Muon on the blocks' matrices, AdamW on the rest."""
    from gpt import config as C
    from gpt.optimizers import build_optimizer
    return build_optimizer(model, C.TrainConfig(optimizer="muon"))


@pytest.mark.parametrize("factory", [lambda m: m.configure_optimizers(0.1, 1e-3),
                                     lambda m: tt.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                     lambda m: tt.optim.Muon([p for p in m.parameters() if p.ndim == 2]),
                                     _muon_and_adamw],
                         ids=["adamw", "sgd-momentum", "muon", "muon+adamw"])
def test_any_optimizers_state_round_trips(tmp_path, factory):
    """The format names no optimizer's state: arrays become optimizer.<i>.<name> tensors,
    scalars go to the metadata, and the state dict comes back equal."""
    model, opt = _stepped(factory)
    path = save_checkpoint(tmp_path / "o.safetensors", *pack_training_state(model, opt, {"step": 2}))
    tensors, meta = load_checkpoint(path)
    assert meta["optimizer"]["type"] == type(opt).__name__
    _, state = unpack_training_state(tensors, meta, path)
    want = opt.state_dict()
    assert set(state["state"]) == set(want["state"]) and len(want["state"]) > 0
    for i, s in want["state"].items():
        assert set(state["state"][i]) == set(s)
        for name, value in s.items():
            np.testing.assert_array_equal(state["state"][i][name], value)
    fresh_model, fresh = _stepped(factory)
    fresh.load_state_dict(state)
    for i, s in fresh.state_dict()["state"].items():
        for name, value in s.items():
            np.testing.assert_array_equal(value, want["state"][i][name])
    # the whole file passes the checks a resume makes (the tensors of each group alike)
    validate_training_meta({**meta, "train_config": {}, "step": 2, "best_val_loss": None,
                            "rng": {"batches": np.random.default_rng(1).bit_generator.state,
                                    "tinytensor": tt.get_rng_state()}}, path, read_checkpoint_metadata(path)[1])


def test_a_combined_optimizers_groups_each_need_their_own_tensors(tmp_path):
    """Muon's groups hold momentum_buffer, AdamW's exp_avg and exp_avg_sq: each parameter must have
    those of its group, and a tensor name foreign to the group is refused."""
    model, opt = _stepped(_muon_and_adamw)
    tensors, meta = pack_training_state(model, opt, {"step": 2, "train_config": {}, "best_val_loss": None,
                                                     "rng": {"batches": np.random.default_rng(1).bit_generator.state,
                                                             "tinytensor": tt.get_rng_state()}})
    muon_index = opt.state_dict()["param_groups"][0]["params"][1]
    adamw_index = opt.state_dict()["param_groups"][1]["params"][0]
    for edit, needle in [(lambda t: t.pop(f"optimizer.{muon_index}.momentum_buffer"), "momentum_buffer are missing"),
                         (lambda t: t.update({f"optimizer.{adamw_index}.momentum_buffer":
                                              t[f"optimizer.{adamw_index}.exp_avg"]}), "momentum_buffer are missing")]:
        edited = dict(tensors)
        edit(edited)
        path = save_checkpoint(tmp_path / "c.safetensors", edited, meta)
        with pytest.raises(CheckpointError, match=needle):
            validate_training_meta(read_checkpoint_metadata(path)[0], path, read_checkpoint_metadata(path)[1])


def test_a_v1_checkpoint_still_reads(tmp_path):
    """Files written before the optimizer-agnostic format (AdamW's moments plus "steps")."""
    model, opt = _stepped(lambda m: m.configure_optimizers(0.1, 1e-3))
    tensors = dict(model.state_dict())
    sd = opt.state_dict()
    for i, s in sd["state"].items():
        tensors[f"optimizer.{i}.exp_avg"], tensors[f"optimizer.{i}.exp_avg_sq"] = s["exp_avg"], s["exp_avg_sq"]
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"optimizer": {"param_groups": groups, "steps": {str(i): s["step"] for i, s in sd["state"].items()}}}
    path = tmp_path / "v1.safetensors"
    path.write_bytes(safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                            metadata={"format": "tinytensor-ckpt-v1", "tinytensor": json.dumps(meta)}))
    loaded, meta = load_checkpoint(path)
    _, state = unpack_training_state(loaded, meta, path)
    assert state["type"] == "AdamW"
    assert {i: s["step"] for i, s in state["state"].items()} == {i: s["step"] for i, s in sd["state"].items()}
    np.testing.assert_array_equal(state["state"][0]["exp_avg_sq"], sd["state"][0]["exp_avg_sq"])
