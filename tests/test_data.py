"""Tests for gpt.data: preparation, caching, download handling, batching.

No network: every download goes through a stubbed urllib.request.urlopen.
"""

import hashlib
import io
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gpt import data as gdata
from gpt.data import DataError, Dataset, get_batch, prepare
from gpt.tokenizer import BPETokenizer, CharTokenizer
from textgen import VARIED_WORDS, make_text

TEXT = make_text(n_lines=700, words=VARIED_WORDS)  # ~22 KB, some of it non-ASCII


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "story.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the way an offline machine does; records the calls."""
    calls = []

    def urlopen(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def serve_bytes(monkeypatch, payload):
    calls = []

    def urlopen(url, *args, **kwargs):
        calls.append(url)
        return io.BytesIO(payload)  # supports `with` and .read(n) like a response

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return calls


def tokens(ds: Dataset) -> np.ndarray:
    return np.concatenate([np.asarray(ds.train), np.asarray(ds.val)])


# --------------------------------------------------------------------------- preparation


def test_text_fixture_is_about_20kb():
    assert 15_000 < len(TEXT.encode("utf-8")) < 30_000


def test_prepare_char(text_file, data_dir, no_network):
    ds = prepare(input_path=text_file, data_dir=data_dir, log=None)
    n = len(TEXT)
    assert ds.name == "story_char"
    assert ds.dir == data_dir / "story_char"
    assert ds.tokenizer.kind == "char"
    assert ds.vocab_size == len(set(TEXT))
    assert isinstance(ds.train, np.memmap) and isinstance(ds.val, np.memmap)
    assert ds.train.dtype == np.uint16 and ds.val.dtype == np.uint16
    assert len(ds.train) == int(0.9 * n)
    assert len(ds.val) == n - int(0.9 * n)
    assert ds.tokenizer.decode(tokens(ds).tolist()) == TEXT
    # the split is contiguous: train is the beginning of the text, val the end
    assert ds.tokenizer.decode(ds.val.tolist()) == TEXT[int(0.9 * n):]
    for f in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (ds.dir / f).is_file()
    assert no_network == []  # a local input never touches the network

    meta = json.loads((ds.dir / "meta.json").read_text())
    assert meta["source_sha256"] == hashlib.sha256(TEXT.encode("utf-8")).hexdigest()
    assert meta["tokenizer"] == "char"
    assert meta["vocab_size"] == ds.vocab_size
    assert meta["n_train"] == len(ds.train) and meta["n_val"] == len(ds.val)
    assert meta["n_chars"] == n
    # the bins are plain uint16 files
    assert np.array_equal(np.fromfile(ds.dir / "val.bin", dtype=np.uint16), np.asarray(ds.val))


def test_prepare_bpe(text_file, data_dir):
    ds = prepare(input_path=text_file, tokenizer="bpe", vocab_size=280, data_dir=data_dir,
                 log=None, progress=False)
    assert ds.name == "story_bpe280"
    assert ds.tokenizer.kind == "bpe"
    assert 256 < ds.vocab_size <= 280
    ids = tokens(ds)
    n = len(ids)
    assert n < len(TEXT.encode("utf-8"))  # merges actually compress
    assert len(ds.train) == int(0.9 * n)
    assert ds.tokenizer.decode(ids.tolist()) == TEXT
    assert ids.tolist() == ds.tokenizer.encode(TEXT)
    assert int(ids.max()) < ds.vocab_size
    meta = json.loads((ds.dir / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == ds.vocab_size


def test_bpe_default_vocab_and_distinct_dirs(text_file, data_dir):
    a = prepare(input_path=text_file, tokenizer="bpe", vocab_size=260, data_dir=data_dir, log=None,
                progress=False)
    b = prepare(input_path=text_file, tokenizer="bpe", vocab_size=270, data_dir=data_dir, log=None,
                progress=False)
    assert a.dir != b.dir and a.vocab_size != b.vocab_size
    assert a.name == "story_bpe260" and b.name == "story_bpe270"


def test_default_logger_writes_to_stderr(text_file, data_dir, capsys):
    prepare(input_path=text_file, data_dir=data_dir)
    prepare(input_path=text_file, data_dir=data_dir)
    out, err = capsys.readouterr()
    assert out == ""
    assert "using prepared dataset at" in err


def test_cache_is_reused(text_file, data_dir, monkeypatch):
    first = prepare(input_path=text_file, data_dir=data_dir, log=None)
    mtimes = {f: os.stat(first.dir / f).st_mtime_ns for f in os.listdir(first.dir)}

    def boom(*a, **k):
        raise AssertionError("tokenizer must not be retrained for a cached dataset")

    monkeypatch.setattr(CharTokenizer, "train", classmethod(boom))
    monkeypatch.setattr(CharTokenizer, "encode_array", boom)
    logs = []
    second = prepare(input_path=text_file, data_dir=data_dir, log=logs.append)
    assert any("using prepared dataset at" in m for m in logs)
    assert np.array_equal(tokens(first), tokens(second))
    assert second.vocab_size == first.vocab_size
    assert second.tokenizer.decode(tokens(second).tolist()) == TEXT
    assert {f: os.stat(first.dir / f).st_mtime_ns for f in os.listdir(first.dir)} == mtimes


def test_bpe_cache_is_reused(text_file, data_dir, monkeypatch):
    first = prepare(input_path=text_file, tokenizer="bpe", vocab_size=270, data_dir=data_dir,
                    log=None, progress=False)

    def boom(*a, **k):
        raise AssertionError("BPE must not be retrained for a cached dataset")

    monkeypatch.setattr(BPETokenizer, "train", classmethod(boom))
    second = prepare(input_path=text_file, tokenizer="bpe", vocab_size=270, data_dir=data_dir,
                     log=None, progress=False)
    assert np.array_equal(tokens(first), tokens(second))
    assert second.tokenizer.to_json() == first.tokenizer.to_json()


def test_changed_source_is_reprepared(text_file, data_dir):
    first = prepare(input_path=text_file, data_dir=data_dir, log=None)
    new_text = make_text(n_lines=500, seed=1, words=VARIED_WORDS) + "Zebra Xylophone Quartz\n"
    text_file.write_text(new_text, encoding="utf-8")
    logs = []
    second = prepare(input_path=text_file, data_dir=data_dir, log=logs.append)
    assert second.dir == first.dir
    assert not any("using prepared dataset" in m for m in logs)
    assert second.tokenizer.decode(tokens(second).tolist()) == new_text
    assert second.vocab_size > first.vocab_size  # Z and X are new characters (Q is in "Queen")
    meta = json.loads((second.dir / "meta.json").read_text())
    assert meta["source_sha256"] == hashlib.sha256(new_text.encode()).hexdigest()
    assert meta["n_chars"] == len(new_text)


@pytest.mark.parametrize("damage", ["no_meta", "short_train_bin", "bad_tokenizer_json"])
def test_incomplete_preparation_is_not_reused(text_file, data_dir, damage):
    first = prepare(input_path=text_file, data_dir=data_dir, log=None)
    expected = tokens(first).copy()
    del first
    if damage == "no_meta":  # crash before meta.json was written
        (data_dir / "story_char" / "meta.json").unlink()
    elif damage == "short_train_bin":
        p = data_dir / "story_char" / "train.bin"
        p.write_bytes(p.read_bytes()[:100])
    else:
        (data_dir / "story_char" / "tokenizer.json").write_text("{not json")
    logs = []
    ds = prepare(input_path=text_file, data_dir=data_dir, log=logs.append)
    assert not any("using prepared dataset" in m for m in logs)
    assert np.array_equal(tokens(ds), expected)
    assert ds.tokenizer.decode(tokens(ds).tolist()) == TEXT


def test_no_temp_files_left(text_file, data_dir):
    ds = prepare(input_path=text_file, data_dir=data_dir, log=None)
    assert sorted(os.listdir(ds.dir)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"]


# --------------------------------------------------------------------------- Tiny Shakespeare


def test_shakespeare_without_network_gives_one_clear_error(data_dir, no_network):
    with pytest.raises(DataError) as ei:
        prepare("shakespeare_char", data_dir=data_dir, log=None)
    msg = str(ei.value)
    assert "--input" in msg
    assert str(data_dir / "shakespeare_char" / "input.txt") in msg
    assert "download" in msg and "name resolution" in msg  # says why it failed
    assert no_network == [gdata.SHAKESPEARE_URL]
    assert not (data_dir / "shakespeare_char" / "input.txt").exists()


def test_shakespeare_download_with_wrong_hash_is_deleted(data_dir, monkeypatch):
    serve_bytes(monkeypatch, b"<html>captive portal</html>" * 100)
    with pytest.raises(DataError, match="sha256"):
        prepare("shakespeare_char", data_dir=data_dir, log=None)
    d = data_dir / "shakespeare_char"
    assert not (d / "input.txt").exists()
    assert not d.exists() or os.listdir(d) == []  # no temp file either


def test_shakespeare_download_success_then_offline(data_dir, monkeypatch):
    fake = TEXT.encode("utf-8")
    monkeypatch.setattr(gdata, "SHAKESPEARE_SHA256", hashlib.sha256(fake).hexdigest())
    calls = serve_bytes(monkeypatch, fake)
    ds = prepare("shakespeare_char", data_dir=data_dir, log=None)
    assert calls == [gdata.SHAKESPEARE_URL]
    assert ds.name == "shakespeare_char"
    assert ds.dir == data_dir / "shakespeare_char"
    assert (ds.dir / "input.txt").read_bytes() == fake
    assert ds.tokenizer.decode(tokens(ds).tolist()) == TEXT

    # the downloaded copy is reused: no network needed any more, for char or bpe
    def offline(*a, **k):
        raise AssertionError("must not download again")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    logs = []
    again = prepare("shakespeare_char", data_dir=data_dir, log=logs.append)
    assert any("using prepared dataset" in m for m in logs)
    assert np.array_equal(tokens(again), tokens(ds))
    bpe = prepare("shakespeare_char", tokenizer="bpe", vocab_size=270, data_dir=data_dir, log=None,
                  progress=False)
    assert bpe.name == "shakespeare_bpe270"


def test_shakespeare_local_input_txt_is_used(data_dir, no_network, monkeypatch):
    fake = TEXT.encode("utf-8")
    monkeypatch.setattr(gdata, "SHAKESPEARE_SHA256", hashlib.sha256(fake).hexdigest())
    (data_dir / "shakespeare_char").mkdir()
    (data_dir / "shakespeare_char" / "input.txt").write_bytes(fake)
    ds = prepare("shakespeare_char", data_dir=data_dir, log=None)
    assert no_network == []
    assert ds.name == "shakespeare_char"
    assert len(ds.train) + len(ds.val) == len(TEXT)


def test_input_path_recognised_as_shakespeare_by_hash(text_file, data_dir, no_network, monkeypatch):
    monkeypatch.setattr(gdata, "SHAKESPEARE_SHA256", hashlib.sha256(TEXT.encode()).hexdigest())
    ds = prepare("shakespeare_char", input_path=text_file, data_dir=data_dir, log=None)
    assert ds.name == "shakespeare_char"
    assert no_network == []


def test_other_text_given_for_shakespeare_is_named_after_the_file(text_file, data_dir, no_network):
    # hash differs from Tiny Shakespeare: accepted, but cached under its own name
    ds = prepare("shakespeare_char", input_path=text_file, data_dir=data_dir, log=None)
    assert ds.name == "story_char"
    assert not (data_dir / "shakespeare_char").exists()


def test_edited_file_named_shakespeare_does_not_take_the_real_name(tmp_path, data_dir):
    p = tmp_path / "shakespeare.txt"
    p.write_text(TEXT, encoding="utf-8")
    ds = prepare(input_path=p, data_dir=data_dir, log=None)
    assert ds.name != "shakespeare_char"
    assert ds.name.endswith("_char")


def test_real_tiny_shakespeare(tiny_shakespeare, data_dir, no_network):
    ds = prepare("shakespeare_char", input_path=tiny_shakespeare, data_dir=data_dir, log=None)
    assert ds.name == "shakespeare_char"
    assert ds.vocab_size == 65
    assert len(ds.train) + len(ds.val) == 1115394
    assert len(ds.train) == int(0.9 * 1115394)
    assert ds.meta["source_sha256"] == gdata.SHAKESPEARE_SHA256
    assert no_network == []


# --------------------------------------------------------------------------- bad inputs


def _bad_input(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "nope.txt"
    if kind == "directory":
        d = tmp_path / "adir"
        d.mkdir()
        return d
    p = tmp_path / f"{kind}.txt"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "invalid_utf8":
        p.write_bytes(b"hello world\n" * 10 + b"caf\xe9\n" + b"more text\n" * 200)
    elif kind == "too_short":
        p.write_text("To be, or not to be, that is the question.\n" * 5)
    return p


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", "not found"),
        ("directory", "directory"),
        ("empty", "empty"),
        ("invalid_utf8", "byte offset 123"),
        ("too_short", "too short"),
    ],
)
@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_bad_input_files(tmp_path, data_dir, kind, words, tokenizer):
    path = _bad_input(tmp_path, kind)
    with pytest.raises(DataError) as ei:
        prepare(input_path=path, tokenizer=tokenizer, vocab_size=260, data_dir=data_dir, log=None,
                progress=False)
    msg = str(ei.value)
    assert str(path) in msg
    assert words in msg
    assert not any((d / "meta.json").exists() for d in data_dir.iterdir())


def test_bad_arguments(text_file, data_dir, no_network):
    with pytest.raises(DataError, match="tokenizer"):
        prepare(input_path=text_file, tokenizer="word", data_dir=data_dir, log=None)
    with pytest.raises(DataError, match="--input"):
        prepare("wikitext", data_dir=data_dir, log=None)
    with pytest.raises(DataError, match="vocab_size"):
        prepare(input_path=text_file, tokenizer="bpe", vocab_size=100, data_dir=data_dir, log=None)
    with pytest.raises(DataError, match="vocab_size"):
        prepare(input_path=text_file, tokenizer="bpe", vocab_size=70000, data_dir=data_dir, log=None)
    with pytest.raises(DataError, match="vocab_size"):
        prepare(input_path=text_file, tokenizer="bpe", vocab_size="512", data_dir=data_dir, log=None)
    assert no_network == []


# --------------------------------------------------------------------------- get_batch


def test_get_batch_shapes_and_shift():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, batch_size=16, block_size=32, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (16, 32)
    assert x.dtype == np.int64 and y.dtype == np.int64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    # with data = arange, a contiguous block is an arithmetic run, and y = x + 1
    assert np.array_equal(np.diff(x, axis=1), np.ones((16, 31), dtype=np.int64))
    assert np.array_equal(y, x + 1)
    assert x.min() >= 0 and y.max() <= 999


def test_get_batch_matches_data_at_sampled_starts(text_file, data_dir):
    ds = prepare(input_path=text_file, data_dir=data_dir, log=None)
    B, T = 8, 64
    x, y = get_batch(ds.train, B, T, np.random.default_rng(123))
    starts = np.random.default_rng(123).integers(0, len(ds.train) - T, size=B)
    for b, s in enumerate(starts):
        assert np.array_equal(x[b], ds.train[s:s + T])
        assert np.array_equal(y[b], ds.train[s + 1:s + T + 1])
    assert np.array_equal(x[:, 1:], y[:, :-1])


def test_get_batch_covers_the_whole_split():
    # every start 0 .. len - block_size - 1 is possible, so the last token can be a target
    data = np.arange(20, dtype=np.uint16)
    x, y = get_batch(data, 2000, 5, np.random.default_rng(0))
    assert x[:, 0].min() == 0
    assert y[:, -1].max() == 19


def test_get_batch_determinism():
    data = np.arange(5000, dtype=np.uint16)
    a = get_batch(data, 4, 16, np.random.default_rng(7))
    b = get_batch(data, 4, 16, np.random.default_rng(7))
    c = get_batch(data, 4, 16, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_get_batch_errors():
    data = np.arange(10, dtype=np.uint16)
    with pytest.raises(DataError, match="block_size 10.*--block-size"):
        get_batch(data, 2, 10, np.random.default_rng(0))
    # the smallest split that works: one token more than block_size
    x, y = get_batch(data, 2, 9, np.random.default_rng(0))
    assert np.array_equal(x[0], np.arange(9)) and np.array_equal(y[0], np.arange(1, 10))
    with pytest.raises(DataError, match="batch_size"):
        get_batch(data, 0, 4, np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        get_batch(data, 2, 4, 0)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(2, 300), batch=st.integers(1, 8), block=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_get_batch_property(n, batch, block, seed):
    data = (np.arange(n) * 7 % 65536).astype(np.uint16)
    rng = np.random.default_rng(seed)
    if n <= block:
        with pytest.raises(DataError):
            get_batch(data, batch, block, rng)
        return
    x, y = get_batch(data, batch, block, rng)
    assert x.shape == y.shape == (batch, block)
    starts = (x[:, 0] // 7).astype(np.int64)  # data[i] = 7 i, invert
    for b in range(batch):
        s = starts[b]
        assert 0 <= s <= n - block - 1
        assert np.array_equal(x[b], data[s:s + block])
        assert np.array_equal(y[b], data[s + 1:s + block + 1])


def test_prepared_shakespeare_is_reused_without_its_text(tmp_path, monkeypatch):
    """Once prepared from the verified text, the dataset loads even after input.txt is
    deleted, with no download attempted."""
    import gpt.data as D
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200
    monkeypatch.setattr(D, "SHAKESPEARE_SHA256", hashlib.sha256(text.encode()).hexdigest())
    src_dir = tmp_path / "shakespeare_char"
    src_dir.mkdir()
    (src_dir / "input.txt").write_text(text, encoding="utf-8")
    first = D.prepare(data_dir=tmp_path, log=None)
    (src_dir / "input.txt").unlink()

    def no_download(*args, **kwargs):
        raise AssertionError("must not download")
    monkeypatch.setattr(D, "_download", no_download)
    again = D.prepare(data_dir=tmp_path, log=None)
    assert again.name == first.name == "shakespeare_char"
    assert np.array_equal(np.asarray(again.val), np.asarray(first.val))
