"""Dataset preparation and batching for the GPT.

A *prepared dataset* is a folder ``data/<name>/`` holding

* ``train.bin`` / ``val.bin`` -- the token stream as raw ``np.uint16``
  (first 90% of the tokens for training, last 10% for validation, as nanoGPT
  splits it), read back with ``np.memmap`` so a large corpus never has to fit
  in memory;
* ``tokenizer.json`` -- the tokenizer that produced the tokens;
* ``meta.json`` -- ``source_sha256``, ``tokenizer``, ``vocab_size``,
  ``n_train``, ``n_val``, ``n_chars``. It is written LAST, so its presence
  marks a complete preparation; a crash half-way leaves a folder without it
  and the next run simply prepares again.

Example::

    from gpt.data import prepare, get_batch
    ds = prepare("shakespeare_char")          # downloads Tiny Shakespeare once
    rng = np.random.default_rng(0)
    x, y = get_batch(ds.train, batch_size=32, block_size=128, rng=rng)
    # x, y: int64 (32, 128); y[:, t] is the token that follows x[:, t]

    ds = prepare(input_path="mytext.txt", tokenizer="bpe", vocab_size=1024)
    # -> data/mytext_bpe1024/

Names: Tiny Shakespeare (recognised by its sha256, wherever it comes from)
is prepared as ``shakespeare_char`` or ``shakespeare_bpe<V>``; any other text
as ``<file stem>_char`` or ``<file stem>_bpe<V>``. The cache is keyed on the
sha256 of the source text, so a changed file is re-prepared, never mixed up
with the old tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from gpt.atomic import atomic_write_bytes, remove_stale_temps
from gpt.resources import ResourceError, check_fits
from gpt.tokenizer import (MAX_VOCAB, MIN_BPE_VOCAB, TRAINED_TOKENIZERS, BPETokenizer, CharTokenizer, TokenizerError,
                           tokenizer_from_json)

__all__ = [
    "SHAKESPEARE_URL",
    "SHAKESPEARE_SHA256",
    "DEFAULT_DATA_DIR",
    "DATA_DIR_ENV",
    "resolve_data_dir",
    "find_prepared",
    "DEFAULT_BPE_VOCAB_SIZE",
    "MIN_VAL_TOKENS",
    "TRAIN_FRACTION",
    "DataError",
    "Dataset",
    "prepare",
    "get_batch",
    "print_to_stderr",
]

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

#: Environment variable naming the data directory (``--data-dir`` wins over it).
DATA_DIR_ENV = "GPT_DATA_DIR"


def _default_data_dir() -> Path:
    """``data/`` inside a clone of the repository; a per-user cache folder for an installed
    package (never site-packages: it may be read-only, and uninstalling would leave files)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "data" / "README.md").is_file() and (root / "setup.cfg").is_file():
        return root / "data"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "tinytensor-gpt"


#: Where prepared datasets go when neither ``data_dir`` nor $GPT_DATA_DIR says otherwise.
DEFAULT_DATA_DIR = _default_data_dir()


def resolve_data_dir(data_dir: Union[str, os.PathLike, None] = None) -> Path:
    """The data directory: ``data_dir`` if given, else $GPT_DATA_DIR, else DEFAULT_DATA_DIR."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR

DEFAULT_BPE_VOCAB_SIZE = 512
TRAIN_FRACTION = 0.9
#: A validation split shorter than this cannot give a meaningful loss estimate.
MIN_VAL_TOKENS = 100
DOWNLOAD_TIMEOUT_S = 30.0
# Tiny Shakespeare is ~1.1 MB; refuse to buffer anything absurdly larger.
_MAX_DOWNLOAD_BYTES = 64 * 1024 * 1024
# Datasets that can be prepared without --input (the text is downloaded).
KNOWN_DATASETS = ("shakespeare_char",)


class DataError(Exception):
    """A dataset could not be prepared or used; the message says what to do."""


def print_to_stderr(msg: str) -> None:
    """Default logger: progress goes to stderr so stdout stays clean for results."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Dataset:
    """A prepared dataset: token memmaps plus the tokenizer that made them."""

    name: str
    dir: Path
    tokenizer: object
    train: np.memmap
    val: np.memmap
    meta: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)


# --------------------------------------------------------------------------- helpers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_text(path: Path, what: str = "input file") -> tuple[str, bytes]:
    """Read a UTF-8 text file, turning every way it can be unusable into DataError."""
    if not path.exists():
        raise DataError(f"{what} not found: {path}. Check the path passed to --input.")
    if path.is_dir():
        raise DataError(
            f"{what} is a directory, not a text file: {path}. Pass the path of a .txt file to --input."
        )
    if not path.is_file():  # a device or a pipe (/dev/zero) could be read forever
        raise DataError(f"{what} is not a regular file: {path}. Pass the path of a .txt file to --input.")
    try:
        size = path.stat().st_size
        # the text, its bytes and its tokens are all in memory while it is prepared
        check_fits(8 * size, f"preparing {path} ({size:,} bytes)", "split the text or use a machine with more memory")
        raw = path.read_bytes()
    except ResourceError as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"cannot read {what} {path}: {e}") from e
    if not raw:
        raise DataError(f"{what} is empty: {path}. Pass a file containing training text.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{what} is not valid UTF-8: {path}: byte 0x{raw[e.start]:02x} at byte offset "
            f"{e.start} (line {line}) ({e.reason}). Convert the file to UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8.txt`."
        ) from e
    return text, raw


def _download(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """Fetch ``url``; any failure propagates (the caller turns it into DataError)."""
    # urllib.request.urlopen is looked up at call time so tests can stub it.
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data = resp.read(_MAX_DOWNLOAD_BYTES + 1)
    if len(data) > _MAX_DOWNLOAD_BYTES:
        raise ValueError(f"response larger than {_MAX_DOWNLOAD_BYTES} bytes")
    return data


def _shakespeare_source(data_dir: Path, log: Callable[[str], None]) -> Path:
    """Return the path of Tiny Shakespeare's input.txt, downloading it if needed."""
    dest_dir = data_dir / "shakespeare_char"
    dest = dest_dir / "input.txt"
    if dest.is_file():
        return dest
    log(f"downloading Tiny Shakespeare from {SHAKESPEARE_URL} ...")
    try:
        data = _download(SHAKESPEARE_URL)
    except Exception as e:  # URLError, HTTPError, timeouts, ... all mean "no file"
        reason = getattr(e, "reason", None) or e
        raise DataError(
            f"could not get Tiny Shakespeare: the download from {SHAKESPEARE_URL} failed "
            f"({type(e).__name__}: {reason}). Either pass --input PATH pointing at a local copy "
            f"of Tiny Shakespeare (input.txt from karpathy/char-rnn), or put the file at {dest} "
            f"and run again."
        ) from e
    # Check before the file lands at its final name, so a bad download never
    # looks like a valid local copy on the next run.
    got = _sha256(data)
    if got != SHAKESPEARE_SHA256:
        raise DataError(
            f"the file downloaded from {SHAKESPEARE_URL} is not Tiny Shakespeare: sha256 {got}, "
            f"expected {SHAKESPEARE_SHA256} ({len(data)} bytes). It was deleted. Try again, or pass "
            f"--input PATH pointing at a local copy, or put the file at {dest}."
        )
    _make_dir(dest_dir)
    remove_stale_temps(dest_dir)
    atomic_write_bytes(dest, data)
    log(f"saved {len(data):,} bytes to {dest}")
    return dest


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the dataset folder {path}: {e.strerror or e}. Pass a writable "
                        f"--data-dir (or set ${DATA_DIR_ENV})") from None


def _safe_stem(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._")
    return stem or "text"


def _load_prepared(
    ds_dir: Path,
    name: str,
    source_sha: str,
    tokenizer: str,
    vocab_size: Optional[int],
    tokenizer_sha256: Optional[str] = None,
) -> Optional[Dataset]:
    """Return the cached dataset if it is complete and made from this source (and, when
    ``tokenizer_sha256`` is given, with exactly that tokenizer), else None."""
    meta_path = ds_dir / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("source_sha256") != source_sha or meta.get("tokenizer") != tokenizer:
            return None
        if tokenizer == "bpe" and meta.get("requested_vocab_size") != vocab_size:
            return None
        if tokenizer_sha256 is not None and meta.get("tokenizer_sha256") != tokenizer_sha256:
            return None
        n_train, n_val = int(meta["n_train"]), int(meta["n_val"])
        itemsize = np.dtype(np.uint16).itemsize
        # A size mismatch means a bin was replaced or damaged after meta.json was written.
        if (ds_dir / "train.bin").stat().st_size != n_train * itemsize:
            return None
        if (ds_dir / "val.bin").stat().st_size != n_val * itemsize:
            return None
        tok = tokenizer_from_json((ds_dir / "tokenizer.json").read_text(encoding="utf-8"))
        if tok.vocab_size != meta.get("vocab_size"):
            return None
        train = np.memmap(ds_dir / "train.bin", dtype=np.uint16, mode="r")
        val = np.memmap(ds_dir / "val.bin", dtype=np.uint16, mode="r")
    except (OSError, ValueError, KeyError, TypeError, TokenizerError):
        # Anything unreadable is treated as "not prepared": we just prepare again.
        return None
    return Dataset(name=name, dir=ds_dir, tokenizer=tok, train=train, val=val, meta=meta)


# --------------------------------------------------------------------------- public API


def _reused(cached: Dataset, log) -> Dataset:
    log(f"using prepared dataset at {cached.dir} ({cached.meta['n_train']:,} train / "
        f"{cached.meta['n_val']:,} val tokens, vocab {cached.vocab_size})")
    return cached


def prepare(
    dataset: str = "shakespeare_char",
    input_path: Union[str, os.PathLike, None] = None,
    tokenizer: str = "char",
    vocab_size: Optional[int] = None,
    data_dir: Union[str, os.PathLike, None] = None,
    log: Optional[Callable[[str], None]] = print_to_stderr,
    progress: bool = True,
    given_tokenizer=None,
) -> Dataset:
    """Prepare (or reuse) a tokenized dataset and return it as memmaps.

    Args:
        dataset: ``"shakespeare_char"`` (downloaded if needed). Ignored when
            ``input_path`` is given: the name then comes from the text.
        input_path: a UTF-8 text file to train on instead of downloading.
        tokenizer: ``"char"`` or ``"bpe"``.
        vocab_size: BPE vocabulary size (default 512); a char vocabulary is
            whatever characters the text contains, so it is ignored for char.
        data_dir: where prepared datasets live (default: :func:`resolve_data_dir`).
        log: called with progress messages (default: print to stderr); None = silent.
        progress: show a progress bar while training BPE.
        given_tokenizer: tokenize with this tokenizer instead of training one (a model's, for
            fine-tuning it); ``tokenizer`` and ``vocab_size`` then come from it, and the
            prepared folder's name carries its sha256's first 8 hex digits.

    Raises:
        DataError: with what was wrong and what to do about it.
    """
    log = log or (lambda msg: None)
    data_dir = resolve_data_dir(data_dir)

    tok_sha = None
    if given_tokenizer is not None:
        tokenizer = given_tokenizer.kind
        vocab_size = given_tokenizer.vocab_size if tokenizer == "bpe" else None
        tok_sha = _sha256(given_tokenizer.to_json().encode("utf-8"))
    elif tokenizer not in TRAINED_TOKENIZERS:
        raise DataError(f"tokenizer {tokenizer!r} cannot be trained on a text: choose one of "
                        f"{', '.join(TRAINED_TOKENIZERS)} (--tokenizer), or fine-tune a model that has it "
                        "with --init-from PATH.")
    if tokenizer == "bpe" and given_tokenizer is None:
        if vocab_size is None:
            vocab_size = DEFAULT_BPE_VOCAB_SIZE
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise DataError(f"vocab_size must be an integer, got {vocab_size!r} (--vocab-size).")
        vocab_size = int(vocab_size)
        if not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB:
            raise DataError(
                f"vocab_size {vocab_size} is out of range: a byte-level BPE has at least {MIN_BPE_VOCAB} "
                f"tokens and they are stored as uint16, so it must be between {MIN_BPE_VOCAB} and {MAX_VOCAB} "
                f"(--vocab-size)."
            )
    elif vocab_size is not None and given_tokenizer is None:
        log(f"note: vocab_size={vocab_size} is ignored for the char tokenizer "
            "(its vocabulary is the set of characters in the text)")
        vocab_size = None

    # 1. Find the source text.
    if input_path is not None:
        src = Path(input_path).expanduser()
    elif dataset in KNOWN_DATASETS:
        name = _dataset_name("shakespeare", tokenizer, vocab_size, tok_sha)
        if not (data_dir / "shakespeare_char" / "input.txt").is_file():
            # prepared earlier and the text since removed: the verified preparation is enough
            cached = _load_prepared(data_dir / name, name, SHAKESPEARE_SHA256, tokenizer, vocab_size, tok_sha)
            if cached is not None:
                return _reused(cached, log)
        src = _shakespeare_source(data_dir, log)
    else:
        raise DataError(
            f"unknown dataset {dataset!r}: the known datasets are {', '.join(KNOWN_DATASETS)}. "
            f"To train on your own text pass --input PATH to a UTF-8 text file."
        )
    text, raw = _read_text(src)
    source_sha = _sha256(raw)

    # 2. Name the prepared dataset after what the text really is, so that the
    #    name "shakespeare_char" always means Tiny Shakespeare.
    if source_sha == SHAKESPEARE_SHA256:
        base = "shakespeare"
    else:
        base = _safe_stem(src)
        if base.lower() == "shakespeare":
            # Keep "shakespeare_*" reserved for the real file (an edited copy named
            # shakespeare.txt must not share its cache folder).
            base = f"{base}-{source_sha[:8]}"
        if input_path is None:
            log(f"warning: {src} is not the Tiny Shakespeare file (sha256 {source_sha[:12]}...); "
                f"preparing it as a custom text")
    name = _dataset_name(base, tokenizer, vocab_size, tok_sha)
    ds_dir = data_dir / name

    # 3. Reuse a complete preparation of the same source.
    cached = _load_prepared(ds_dir, name, source_sha, tokenizer, vocab_size, tok_sha)
    if cached is not None:
        return _reused(cached, log)

    # 4. Prepare from scratch (first removing what killed preparations left behind).
    _make_dir(ds_dir)
    remove_stale_temps(ds_dir)
    meta_path = ds_dir / "meta.json"
    if meta_path.exists():
        # Remove the old completion marker first: if we crash while overwriting
        # the bins, the folder must not look like a valid (old) preparation.
        log(f"re-preparing {ds_dir} (the source text or settings changed, or the old "
            "preparation is damaged)")
        meta_path.unlink()
    log(f"preparing {name} from {src} ({len(text):,} characters)")

    t0 = time.perf_counter()
    try:
        if given_tokenizer is not None:
            tok = given_tokenizer
        elif tokenizer == "char":
            tok = CharTokenizer.train(text)
        else:
            tok = BPETokenizer.train(text, vocab_size=vocab_size, progress=progress)
    except TokenizerError as e:
        raise DataError(f"cannot train a {tokenizer} tokenizer on {src}: {e}") from e
    t1 = time.perf_counter()
    if tokenizer == "bpe" and given_tokenizer is None:
        log(f"trained BPE tokenizer (vocab {tok.vocab_size}) in {t1 - t0:.1f} s")
    if tok.vocab_size > MAX_VOCAB:
        raise DataError(
            f"{src} has {tok.vocab_size} distinct characters, more than the {MAX_VOCAB} a "
            f"uint16 token can hold; use --tokenizer bpe."
        )
    try:
        ids = np.asarray(tok.encode_array(text))
    except TokenizerError as e:
        raise DataError(f"cannot tokenize {src}: {e}") from e
    ids = ids.astype(np.uint16, copy=False)
    t2 = time.perf_counter()
    log(f"tokenized {len(text):,} characters into {len(ids):,} tokens in {t2 - t1:.1f} s")

    n = int(ids.size)
    n_train = int(n * TRAIN_FRACTION)
    n_val = n - n_train
    if n_val < MIN_VAL_TOKENS:
        need = int(np.ceil(MIN_VAL_TOKENS / (1 - TRAIN_FRACTION)))
        raise DataError(
            f"text too short: {src} gives {n} tokens, so only {n_val} validation tokens "
            f"(need at least {MIN_VAL_TOKENS}, i.e. about {need} tokens in all). Use a longer text."
        )

    atomic_write_bytes(ds_dir / "train.bin", ids[:n_train].tobytes())
    atomic_write_bytes(ds_dir / "val.bin", ids[n_train:].tobytes())
    atomic_write_bytes(ds_dir / "tokenizer.json", tok.to_json().encode("utf-8"))
    meta = {
        "source_sha256": source_sha,
        "tokenizer": tokenizer,
        "vocab_size": int(tok.vocab_size),
        "n_train": n_train,
        "n_val": n_val,
        "n_chars": len(text),
        # what was asked for: a small text can give a BPE with fewer merges
        "requested_vocab_size": vocab_size,
        "source": str(src),
        **({"tokenizer_sha256": tok_sha} if tok_sha else {}),
    }
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    log(f"prepared {ds_dir}: {n_train:,} train / {n_val:,} val tokens, vocab {tok.vocab_size}")

    train = np.memmap(ds_dir / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(ds_dir / "val.bin", dtype=np.uint16, mode="r")
    return Dataset(name=name, dir=ds_dir, tokenizer=tok, train=train, val=val, meta=meta)


def _dataset_name(base: str, tokenizer: str, vocab_size: Optional[int], tok_sha: Optional[str]) -> str:
    """``<base>_char``, ``<base>_bpe<V>``; a given tokenizer's adds ``-<its sha256[:8]>``."""
    name = f"{base}_{tokenizer}" + (f"{vocab_size}" if tokenizer == "bpe" else "")
    return name + (f"-{tok_sha[:8]}" if tok_sha else "")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")


def find_prepared(name: str, source_sha256: str, tokenizer: str, vocab_size: Optional[int],
                  data_dir: Union[str, os.PathLike, None] = None) -> Optional[Dataset]:
    """The prepared dataset ``name`` in the data directory if it was made from the text with
    this sha256 by this tokenizer, else None. For resuming a run: the name comes from a
    checkpoint (untrusted), so it must be a plain folder name, never a path.

    >>> find_prepared("../../etc", "0" * 64, "char", None) is None
    True
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        return None
    if not isinstance(source_sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", source_sha256):
        return None
    if tokenizer == "bpe" and vocab_size is None:
        vocab_size = DEFAULT_BPE_VOCAB_SIZE
    data_dir = resolve_data_dir(data_dir)
    return _load_prepared(data_dir / name, name, source_sha256, tokenizer, vocab_size)


def get_batch(data, batch_size: int, block_size: int, rng: np.random.Generator):
    """Sample ``batch_size`` random contiguous blocks from a 1-D token array.

    Returns ``(x, y)``, both ``np.int64`` of shape ``(batch_size, block_size)``,
    with ``y[b, t] == data[start_b + t + 1]`` -- the next token after ``x[b, t]``.

    Example::

        rng = np.random.default_rng(0)
        x, y = get_batch(ds.train, 8, 64, rng)
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    for arg, value in (("batch_size", batch_size), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise DataError(f"{arg} must be a positive integer, got {value!r}")
    n = len(data)
    if n <= block_size:
        raise DataError(
            f"split too short for block_size {block_size}: it has only {n} tokens (need more than "
            f"{block_size}). Lower --block-size or use a longer text."
        )
    starts = rng.integers(0, n - block_size, size=batch_size)
    # One gather of (batch, block+1) indices: x is the first block_size columns,
    # y the same window shifted by one. Fancy indexing a memmap reads only those pages.
    idx = starts[:, None] + np.arange(block_size + 1)
    chunk = np.asarray(data)[idx].astype(np.int64)
    x = np.ascontiguousarray(chunk[:, :-1])
    y = np.ascontiguousarray(chunk[:, 1:])
    return x, y
