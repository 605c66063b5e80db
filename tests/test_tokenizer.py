"""Tests for gpt/tokenizer.py: round trips, error messages, serialization,
streaming, and an incremental-vs-naive check of BPE training."""
import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gpt.tokenizer import (SPLIT_PATTERN, BPETokenizer, CharTokenizer, TokenizerError,
                           tokenizer_from_json)
from textgen import VARIED_WORDS, make_text

unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)))


CORPUS = make_text(n_lines=150, words=VARIED_WORDS)  # ~5 KB: digits, contractions, non-ASCII


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(CORPUS, vocab_size=300)


# ---------------------------------------------------------------- char

@given(st.text(min_size=1))
def test_char_round_trip(text):
    tok = CharTokenizer.train(text)
    ids = tok.encode(text)
    assert tok.vocab_size == len(set(text))
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    arr = tok.encode_array(text)
    assert arr.dtype == np.uint16 and arr.tolist() == ids


def test_char_vocab_is_sorted_distinct_chars():
    tok = CharTokenizer.train("hello world")
    assert tok.kind == "char"
    assert tok.chars == sorted(set("hello world"))
    assert tok.encode("dew") == [tok.chars.index(c) for c in "dew"]


def test_char_unknown_characters_are_listed():
    tok = CharTokenizer.train("abc")
    with pytest.raises(TokenizerError) as exc:
        tok.encode("abxcyx\u00e9")
    msg = str(exc.value)
    for c in "xy\u00e9":
        assert repr(c) in msg
    assert "3 character" in msg
    assert "different corpus" in msg and "bpe" in msg


def test_char_unknown_characters_are_capped():
    tok = CharTokenizer.train("a")
    with pytest.raises(TokenizerError) as exc:
        tok.encode("".join(chr(0x4E00 + i) for i in range(100)))
    msg = str(exc.value)
    assert "100 character" in msg
    assert sum(repr(chr(0x4E00 + i)) in msg for i in range(100)) <= 20


def test_char_errors():
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.train("")
    tok = CharTokenizer.train("ab")
    for bad in ([2], [-1]):
        with pytest.raises(TokenizerError):
            tok.decode(bad)


def test_char_stream_decoder():
    tok = CharTokenizer.train("héllo ✓")
    dec = tok.stream_decoder()
    assert [dec.feed(i) for i in tok.encode("✓hé")] == ["✓", "h", "é"]
    assert dec.flush() == ""


# ---------------------------------------------------------------- bpe

def test_bpe_vocab_and_compression(bpe):
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 300 == 256 + len(bpe.merges)
    ids = bpe.encode(CORPUS)
    assert len(ids) < 0.7 * len(CORPUS.encode("utf-8"))
    assert bpe.decode(ids) == CORPUS
    assert bpe.encode_array(CORPUS).dtype == np.uint16
    assert bpe.encode_array(CORPUS).tolist() == ids
    # every learned token is the concatenation of its two parents
    for new_id, (a, b) in enumerate(bpe.merges, start=256):
        assert bpe.vocab[new_id] == bpe.vocab[a] + bpe.vocab[b]


@settings(max_examples=200, deadline=None)
@given(unicode_text)
def test_bpe_round_trip_arbitrary_unicode(bpe, text):
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == text


@pytest.mark.parametrize("text", ["", "\x00", "\n", "\n\n\n", " ", "🐈‍⬛ 👩🏽‍💻", "東京タワー",
                                  "a_b__c", "\t x\r\n", "ﬁ ½ ² Ⅻ", "\U0010FFFF"])
def test_bpe_round_trip_edge_cases(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_split_pattern_covers_every_character():
    text = "".join(chr(c) for c in range(0, 0x3000)) + "é_\x00🐈"
    text = re.sub("[\ud800-\udfff]", "", text)
    assert "".join(re.findall(SPLIT_PATTERN, text)) == text


def test_bpe_lone_surrogate_is_an_error(bpe):
    with pytest.raises(TokenizerError):
        bpe.encode("ok \ud800")


def test_bpe_bad_vocab_size():
    for bad in (255, 65537, 0):
        with pytest.raises(TokenizerError, match=str(bad)):
            BPETokenizer.train(CORPUS, vocab_size=bad)
    with pytest.raises(TokenizerError, match="empty"):
        BPETokenizer.train("", vocab_size=300)


def test_bpe_stops_when_out_of_pairs():
    tok = BPETokenizer.train("ab ab", vocab_size=1000)
    assert tok.vocab_size < 1000
    assert tok.encode("ab ab") == [tok.vocab.index(b"ab"), tok.vocab.index(b" ab")]


def test_bpe_progress_bar(capsys):
    BPETokenizer.train(CORPUS, vocab_size=270, progress=True)
    assert "bpe merges" in capsys.readouterr().err


@settings(max_examples=50, deadline=None)
@given(unicode_text.filter(lambda s: s))
def test_bpe_stream_decoder_matches_decode(bpe, text):
    ids = bpe.encode(text)
    dec = bpe.stream_decoder()
    pieces = [dec.feed(i) for i in ids]
    assert "".join(pieces) + dec.flush() == bpe.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


def test_bpe_stream_decoder_buffers_partial_utf8(bpe):
    text = "naïve 🐈 東京"
    ids = bpe.encode(text)
    dec = bpe.stream_decoder()
    pieces = [dec.feed(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert "" in pieces  # 🐈 is 4 byte tokens: the first three produce no text yet
    assert "\ufffd" not in "".join(pieces)
    # a truncated sequence is reported on flush, not silently dropped
    dec = bpe.stream_decoder()
    assert dec.feed(0xF0) == "" and dec.flush() == "\ufffd"


# ------------------------------------------ incremental training == naive reference

def naive_bpe(text, vocab_size):
    """Reference trainer: full recount every merge, no dedup, ties -> lowest pair.

    Returns the merges and the training text's final segmentation (chunk by chunk)."""
    words = [list(c.encode("utf-8")) for c in re.findall(SPLIT_PATTERN, text)]
    merges = []
    for new_id in range(256, vocab_size):
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, w in enumerate(words):
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            words[k] = out
    return merges, words


def test_incremental_training_equals_naive_on_corpus():
    text = CORPUS[:2500]
    tok = BPETokenizer.train(text, vocab_size=340)
    merges, words = naive_bpe(text, 340)
    assert tok.merges == merges
    # encoding by merge rank reproduces the segmentation training ended with
    assert tok.encode(text) == [i for w in words for i in w]


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.text(alphabet="ab ", max_size=80),  # many ties and overlapping runs
                 st.text(alphabet="aabc déé\n", max_size=120),
                 st.text(max_size=60)),
       st.integers(256, 300))
def test_incremental_training_equals_naive_random(text, vocab_size):
    if not text:
        return
    tok = BPETokenizer.train(text, vocab_size=vocab_size)
    merges, words = naive_bpe(text, vocab_size)
    assert tok.merges == merges
    assert tok.encode(text) == [i for w in words for i in w]


# ---------------------------------------------------------------- serialization

def test_save_load_round_trip(tmp_path, bpe):
    char = CharTokenizer.train(CORPUS)
    for tok, cls in ((char, CharTokenizer), (bpe, BPETokenizer)):
        path = tmp_path / f"{tok.kind}.json"
        tok.save(path)
        for loaded in (cls.load(path), tokenizer_from_json(path.read_text(encoding="utf-8"))):
            assert type(loaded) is cls and loaded.vocab_size == tok.vocab_size
            assert loaded.encode(CORPUS) == tok.encode(CORPUS)
            assert loaded.to_json() == tok.to_json()
    with pytest.raises(TokenizerError, match="char"):
        BPETokenizer.load(tmp_path / "char.json")


def test_json_format():
    import json
    assert json.loads(CharTokenizer.train("ba").to_json()) == {"kind": "char", "version": 1,
                                                               "chars": ["a", "b"]}
    data = json.loads(BPETokenizer.train("aaaa", vocab_size=257).to_json())
    assert data == {"kind": "bpe", "version": 1, "merges": [[97, 97]]}


@pytest.mark.parametrize("bad", ['{"kind": "wordpiece"}', '{"chars": ["a"]}', "not json", "[1, 2]",
                                 '{"kind": "bpe"}', '{"kind": "bpe", "merges": [[300, 1]]}',
                                 '{"kind": "bpe", "merges": [["a", 1]]}',
                                 '{"kind": "char", "chars": ["ab"]}',
                                 '{"kind": "char", "chars": []}',
                                 '{"kind": "char", "version": 2, "chars": ["a"]}'])
def test_bad_json_raises_tokenizer_error(bad):
    with pytest.raises(TokenizerError):
        tokenizer_from_json(bad)


def test_unknown_kind_is_named():
    with pytest.raises(TokenizerError, match="wordpiece"):
        tokenizer_from_json('{"kind": "wordpiece"}')


# ---------------------------------------------------------------- real corpus

def test_tiny_shakespeare(tiny_shakespeare):
    text = tiny_shakespeare.read_text(encoding="utf-8")
    tok = CharTokenizer.train(text)
    assert tok.vocab_size == 65
    t0 = time.perf_counter()
    arr = tok.encode_array(text)
    assert time.perf_counter() - t0 < 1.0
    assert arr.dtype == np.uint16 and len(arr) == len(text)
    assert tok.decode(arr) == text
    assert tok.decode(tok.encode(text[:10_000])) == text[:10_000]

    bpe = BPETokenizer.train(text, vocab_size=512)
    assert bpe.vocab_size == 512
    ids = bpe.encode_array(text)
    assert len(ids) < 0.6 * len(text.encode("utf-8"))
    assert bpe.decode(ids) == text


def test_crafted_merges_are_refused_before_building_tokens():
    """Each merge can double a token: 60 of them would spell out 2**60 bytes. The size is
    counted first (a tokenizer.json or checkpoint is untrusted input)."""
    merges = [[0, 0]] + [[256 + i, 256 + i] for i in range(60)]
    with pytest.raises(TokenizerError, match="spell out"):
        tokenizer_from_json(json.dumps({"kind": "bpe", "version": 1, "merges": merges}))
    with pytest.raises(TokenizerError, match="not valid JSON"):
        tokenizer_from_json("[" * 100_000)
