"""Tokenizers for the GPT: a character-level one and a byte-level BPE.

Both share one small interface::

    >>> tok = CharTokenizer.train("hello world")
    >>> tok.decode(tok.encode("hello")) == "hello"
    True
    >>> bpe = BPETokenizer.train("the cat sat on the mat " * 50, vocab_size=260)
    >>> bpe.decode(bpe.encode("the 🐈 sat")) == "the 🐈 sat"
    True
    >>> tokenizer_from_json(bpe.to_json()).encode("the mat") == bpe.encode("the mat")
    True
"""
from __future__ import annotations

import codecs
import heapq
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import strict_json

__all__ = ["TOKENIZERS", "TRAINED_TOKENIZERS", "TokenizerError", "CharTokenizer", "BPETokenizer", "StreamDecoder",
           "tokenizer_from_json", "SPLIT_PATTERN"]

FORMAT_VERSION = 1
TOKENIZERS = ("char", "bpe", "gpt2")  # the names gpt.train's --tokenizer accepts (a checkpoint's kind)
TRAINED_TOKENIZERS = ("char", "bpe")  # made from the text; gpt2 comes with a GPT-2 model (--init-from)
MAX_VOCAB = 65536  # ids must fit in uint16 for compact token files
MIN_BPE_VOCAB = 256  # the byte tokens; every merge adds one
MAX_TOKEN_BYTES = 64 << 20  # all tokens' bytes together; real vocabularies use a few hundred KB

# GPT-2-like pre-tokenization without the third-party `regex` module. Merges never
# cross chunk boundaries, which keeps the vocabulary word-shaped and lets training
# work on *distinct* chunks weighted by their count. The alternatives partition
# every character (whitespace | letters | digits | "_" and other non-word chars),
# so "".join(findall(text)) == text always holds.
SPLIT_PATTERN = r"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:_|[^\s\w])+|\s+(?!\S)|\s+"
_SPLIT = re.compile(SPLIT_PATTERN)


class TokenizerError(ValueError):
    """Bad input to a tokenizer (unknown characters, invalid ids, bad JSON...)."""


class StreamDecoder:
    """Turns ids into text one at a time, e.g. while sampling from the model.

    A BPE token may end in the middle of a multi-byte UTF-8 character, so the
    bytes are buffered until the character is complete instead of printing
    replacement characters.

        >>> tok = BPETokenizer.train("abc", vocab_size=256)
        >>> dec = tok.stream_decoder()
        >>> [dec.feed(i) for i in tok.encode("é")], dec.flush()
        (['', 'é'], '')
    """

    def __init__(self, piece, utf8: bool):
        self._piece = piece  # id -> str (char) or bytes (bpe)
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace") if utf8 else None

    def feed(self, token_id: int) -> str:
        piece = self._piece(token_id)
        return self._dec.decode(piece) if self._dec is not None else piece

    def flush(self) -> str:
        return self._dec.decode(b"", final=True) if self._dec is not None else ""


def _check_ids(ids, vocab_size: int) -> list[int]:
    ids = np.asarray(ids, dtype=np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][:10].tolist()
        raise TokenizerError(f"token ids out of range [0, {vocab_size}): {bad}")
    return ids.tolist()


def _array_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= MAX_VOCAB else np.uint32


class _Base:
    kind = ""

    def save(self, path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path):
        tok = tokenizer_from_json(Path(path).read_text(encoding="utf-8"))
        if not isinstance(tok, cls):
            raise TokenizerError(f"{path} holds a {tok.kind!r} tokenizer, not {cls.kind!r}")
        return tok

    def encode_array(self, text: str) -> np.ndarray:
        return np.array(self.encode(text), dtype=_array_dtype(self.vocab_size))

    def __repr__(self):
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class CharTokenizer(_Base):
    """One token per character; the vocabulary is the sorted distinct characters.

        >>> tok = CharTokenizer.train("abca")
        >>> tok.vocab_size, tok.encode("cab")
        (3, [2, 0, 1])
    """

    kind = "char"

    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise TokenizerError("a char tokenizer needs at least one character")
        if any(not isinstance(c, str) or len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise TokenizerError("char vocabulary must be distinct single-character strings")
        self.chars = chars
        # Encoding is a vectorized lookup: codepoints are binary-searched in a
        # sorted table, which is far faster than a Python loop on a 1 MB corpus.
        cps = np.array([ord(c) for c in chars], dtype=np.uint32)
        order = np.argsort(cps, kind="stable")
        self._sorted_cps, self._sorted_ids = cps[order], order.astype(np.int64)

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if not text:
            raise TokenizerError("cannot build a char tokenizer from empty text")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode_array(self, text: str) -> np.ndarray:
        # surrogatepass: a char vocabulary may legitimately contain lone surrogates
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.searchsorted(self._sorted_cps, cps)
        pos = np.minimum(pos, len(self._sorted_cps) - 1)
        unknown = self._sorted_cps[pos] != cps
        if unknown.any():
            self._raise_unknown(cps[unknown])
        return self._sorted_ids[pos].astype(_array_dtype(self.vocab_size))

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        return "".join(map(self.chars.__getitem__, _check_ids(ids, self.vocab_size)))

    def _raise_unknown(self, cps: np.ndarray):
        chars = [chr(c) for c in np.unique(cps).tolist()]
        shown = ", ".join(repr(c) for c in chars[:20]) + (", ..." if len(chars) > 20 else "")
        raise TokenizerError(
            f"{len(chars)} character(s) not in this char tokenizer's vocabulary: {shown}. "
            "It was built from a different corpus; use the bpe tokenizer for arbitrary text.")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(lambda i: self.decode([i]), utf8=False)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "version": FORMAT_VERSION, "chars": self.chars})


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace non-overlapping occurrences of `pair`, scanning left to right."""
    out, i, n = [], 0, len(ids)
    a, b = pair
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _utf8(chunk: str) -> bytes:
    try:
        return chunk.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"text is not valid unicode (lone surrogate?): {e}") from None


class BPETokenizer(_Base):
    """Byte-level BPE: 256 byte tokens plus one token per learned merge.

    Merge i creates token 256 + i, so a token's id is also its merge rank.

        >>> tok = BPETokenizer.train("aaaa aaaa", vocab_size=258)
        >>> tok.merges, tok.encode("aaaa"), tok.encode("aaa")
        ([(97, 97), (256, 256)], [257], [256, 97])
    """

    kind = "bpe"

    def __init__(self, merges):
        self.merges = [tuple(m) for m in merges]
        if 256 + len(self.merges) > MAX_VOCAB:
            raise TokenizerError(f"too many merges: vocab_size {256 + len(self.merges)} > {MAX_VOCAB}")
        # merges may come from a file: each one doubles a token at most, so ~40 crafted ones would
        # spell out a terabyte. Count the bytes before building any of them.
        lengths = [1] * 256
        for new_id, (a, b) in enumerate(self.merges, start=256):
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise TokenizerError(f"merge {(a, b)} refers to a token not defined before id {new_id}")
            lengths.append(lengths[a] + lengths[b])
        if sum(lengths) > MAX_TOKEN_BYTES:
            raise TokenizerError(f"the merges spell out {sum(lengths):,} bytes of tokens (at most "
                                 f"{MAX_TOKEN_BYTES:,}): no tokenizer trained on text does; the file was edited")
        self.vocab = [bytes([i]) for i in range(256)]
        self._ranks: dict[tuple[int, int], int] = {}
        for new_id, (a, b) in enumerate(self.merges, start=256):
            self.vocab.append(self.vocab[a] + self.vocab[b])
            self._ranks[(a, b)] = new_id
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, vocab_size: int = 512, progress: bool = False) -> "BPETokenizer":
        """Learn `vocab_size - 256` merges (fewer if the text runs out of pairs).

        Pair counts are updated incrementally: after a merge only the chunks that
        contained the pair are re-scanned, and a max-heap with lazy invalidation
        finds the next most frequent pair (ties -> lowest (a, b)).
        """
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) \
                or not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB:
            raise TokenizerError(f"BPE vocab_size must be an int in [{MIN_BPE_VOCAB}, {MAX_VOCAB}], got {vocab_size!r}")
        if not text:
            raise TokenizerError("cannot train a BPE tokenizer on empty text")
        chunk_counts = Counter(_SPLIT.findall(text))
        words = [list(_utf8(c)) for c in chunk_counts]
        weights = list(chunk_counts.values())

        counts: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunks holding it
        for i, w in enumerate(words):
            for p in zip(w, w[1:]):
                counts[p] += weights[i]
                where[p].add(i)
        heap = [(-c, p) for p, c in counts.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        n_merges = vocab_size - 256
        with tqdm(total=n_merges, desc="bpe merges", disable=not progress, leave=False) as bar:
            while len(merges) < n_merges:
                while heap:  # skip entries whose count went stale since they were pushed
                    neg, pair = heapq.heappop(heap)
                    if counts.get(pair) == -neg:
                        break
                else:
                    break  # no pairs left: every chunk is a single token
                new_id = 256 + len(merges)
                merges.append(pair)
                delta: dict[tuple[int, int], int] = defaultdict(int)
                for i in where.pop(pair):
                    old, wt = words[i], weights[i]
                    new = words[i] = _merge(old, pair, new_id)
                    for p in zip(old, old[1:]):
                        delta[p] -= wt
                        if p in where:
                            where[p].discard(i)
                    for p in zip(new, new[1:]):
                        delta[p] += wt
                        where[p].add(i)
                for p, d in delta.items():
                    if d == 0:
                        continue  # net unchanged: its heap entry is still valid
                    c = counts[p] = counts[p] + d
                    if c > 0:
                        heapq.heappush(heap, (-c, p))
                    else:
                        del counts[p]
                        where.pop(p, None)
                bar.update(1)
        return cls(merges)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _encode_chunk(self, chunk: str) -> list[int]:
        ids = self._cache.get(chunk)
        if ids is not None:
            return ids
        ids = list(_utf8(chunk))
        ranks, never = self._ranks, MAX_VOCAB + 1
        # Applying the lowest-rank merge first reproduces the training order.
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, never))
            if pair not in ranks:
                break
            ids = _merge(ids, pair, ranks[pair])
        if len(self._cache) >= 500_000:  # bound memory on endless streams of new words
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for chunk in _SPLIT.findall(text):
            out.extend(self._encode_chunk(chunk))
        return out

    def decode(self, ids) -> str:
        data = b"".join(map(self.vocab.__getitem__, _check_ids(ids, self.vocab_size)))
        return data.decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        vocab = self.vocab
        return StreamDecoder(lambda i: vocab[_check_ids([i], len(vocab))[0]], utf8=True)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "version": FORMAT_VERSION,
                           "merges": [list(m) for m in self.merges]})


def tokenizer_from_json(s: str):
    """Rebuild a tokenizer from `to_json()` output, dispatching on its "kind"."""
    try:
        data = strict_json.loads(s)  # it may come from a file: bounded nesting, finite numbers
    except (ValueError, TypeError) as e:
        raise TokenizerError(f"tokenizer JSON is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError("tokenizer JSON must be an object with a 'kind' field")
    if data.get("version", FORMAT_VERSION) != FORMAT_VERSION:
        raise TokenizerError(f"unsupported tokenizer format version {data.get('version')!r}")
    kind = data.get("kind")
    try:
        if kind == "char":
            return CharTokenizer(data["chars"])
        if kind == "bpe":
            merges = data["merges"]
            if not all(isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)
                       for m in merges):
                raise TokenizerError("bpe 'merges' must be a list of [int, int] pairs")
            return BPETokenizer(merges)
        if kind == "gpt2":
            from .gpt2_tokenizer import GPT2Tokenizer  # (it builds on this module)
            return GPT2Tokenizer.from_dict(data)
    except (KeyError, TypeError) as e:
        raise TokenizerError(f"malformed {kind!r} tokenizer JSON: {e}") from None
    raise TokenizerError(f"unknown tokenizer kind {kind!r} (expected one of {', '.join(TOKENIZERS)})")
