"""The inference server's engine: the served model, its loaders, and one decoding thread.

No web framework here (``gpt.serve_app`` speaks HTTP): this module loads a checkpoint
into a :class:`ServedModel` and runs :class:`Job` s, each a ``generate_tokens`` loop of
``gpt.generate``, on one worker thread. The worker takes one token from each running job
in turn, so every admitted stream makes progress and the first token of a new request
waits for one round, not for the other streams to finish. One thread because the work is
NumPy on one model: a second thread would only fight the first for the GIL and the BLAS
cores. A job that is cancelled (its client went away) is dropped before its next token.

>>> served = load_served(InMemoryCheckpoint(data, "ckpt.safetensors"))  # doctest: +SKIP
>>> engine = Engine(max_active=4, max_queued=16)                        # doctest: +SKIP
>>> engine.submit(Job(served, ids, 100, Sampling(0.8, 200, None, 1), on_event=print))  # doctest: +SKIP
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

import tinytensor as tt

from .checkpoint import CheckpointError, InMemoryCheckpoint, read_header_metadata
from .checkpoint_validate import METADATA_KEY
from .generate import check_sampling_args, generate_tokens, load_model


# --------------------------------------------------------------------------- the served model
@dataclass
class ServedModel:
    """A model ready to decode, with what clients see of it."""
    id: str  # the name clients pass as "model" (the checkpoint's file name)
    model: object  # anything with forward(idx, cache=, last_only=), new_cache(), config.block_size
    tokenizer: object  # encode(str) -> list[int], stream_decoder()
    info: dict  # what the page shows: loader, parameters, config, tokenizer, step
    created: int  # Unix time it was loaded


def _load_tinytensor(source, backend: str) -> ServedModel:
    """A checkpoint written by gpt.train (its weights only; any optimizer state is skipped)."""
    model, tokenizer, meta = load_model(source, backend)
    model.eval()  # once for all jobs: interleaved generators must not toggle a shared training flag
    config = model.config.to_dict()
    info = {"loader": "tinytensor", "model_type": meta["model_type"],
            "parameters": model.config.num_parameters(meta["model_type"]),
            "config": config, "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
            "step": meta.get("step"), "best_val_loss": meta.get("best_val_loss")}
    return ServedModel(Path(str(source)).name, model, tokenizer, info, int(time.time()))


class Loader(NamedTuple):
    """A checkpoint kind the server can serve: ``claims`` looks at the safetensors header's
    ``__metadata__`` (already checked, nothing else read); ``load`` builds the ServedModel and
    raises CheckpointError with a message for the user on a bad file."""
    claims: Callable[[dict], bool]
    load: Callable[[object, str], ServedModel]


# The first loader that claims a file loads it; with none, ours does, and its message says what
# is wrong. A GPT-2 (Hugging Face) loader is one more entry, e.g. claiming headers whose
# "format" is "pt" without METADATA_KEY.
LOADERS = {"tinytensor": Loader(lambda header: METADATA_KEY in header, _load_tinytensor)}
DEFAULT_LOADER = "tinytensor"


def load_served(source, backend: str = "numpy") -> ServedModel:
    """The ServedModel for a checkpoint path or InMemoryCheckpoint; CheckpointError on a bad one."""
    header = read_header_metadata(source)
    loader = next((ld for ld in LOADERS.values() if ld.claims(header)), LOADERS[DEFAULT_LOADER])
    served = loader.load(source, backend)
    if isinstance(source, InMemoryCheckpoint):
        served.info["bytes"] = len(source.data)
    return served


# --------------------------------------------------------------------------- limits
def _limit(default, help, lo, hi):
    return field(default=default, metadata={"help": help, "range": (lo, hi)})


@dataclass(frozen=True)
class ServeLimits:
    """What one client may ask of the server; each field is a command-line option of gpt.serve."""
    max_prompt_chars: int = _limit(16_384, "longest prompt in characters (only the last block_size tokens are "
                                           "used anyway)", 1, 1 << 24)
    max_tokens: int = _limit(2048, "most tokens one request may generate", 1, 1_000_000)
    max_streams: int = _limit(8, "requests generating at once (interleaved token by token)", 1, 1024)
    max_queued: int = _limit(64, "requests waiting for a free stream; beyond this a request gets 429", 0, 100_000)
    max_upload_mb: int = _limit(1024, "largest checkpoint upload in MiB (read into memory)", 1, 1 << 20)
    upload_timeout_s: int = _limit(600, "seconds an upload may take to arrive (one upload at a time: a stalled "
                                        "one must not block the others)", 1, 86_400)

    def check(self) -> None:
        for f in fields(self):
            lo, hi = f.metadata["range"]
            value = getattr(self, f.name)
            if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
                raise ValueError(f"{f.name} must be an integer in [{lo}, {hi}], got {value!r}")

    @property
    def max_body_bytes(self) -> int:
        """Largest completion request: the prompt as JSON escapes (up to 12 bytes a character) plus room."""
        return 12 * self.max_prompt_chars + (64 << 10)


# --------------------------------------------------------------------------- jobs
class Sampling(NamedTuple):
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    seed: Optional[int]

    def check(self, max_tokens: int) -> None:
        """ValueError naming the bad argument (gpt.generate's rules, as gpt.sample applies them)."""
        check_sampling_args(self.temperature, self.top_k, self.top_p, max_tokens)


class Job:
    """One completion: the prompt's token ids, how many tokens to make, how to sample. The
    engine calls :meth:`step`; ``on_event`` gets ``("token", text)`` for each token (text may
    be "" inside a multi-byte character), then one ``("done", text)`` or ``("error", message)``.
    ``on_event`` is called on the worker thread: it must only hand the event over."""

    def __init__(self, served: ServedModel, ids: list, max_tokens: int, sampling: Sampling,
                 on_event: Callable[[tuple], None]):
        self.served, self.ids, self.max_tokens, self.sampling = served, ids, max_tokens, sampling
        self.on_event = on_event
        self.cancelled = False  # set by the client's side; read by the worker before each token
        self.finished = False  # ran to its last token (set before the client hears so)
        self.tokens = 0
        self._stream = self._decoder = None

    def cancel(self) -> None:
        self.cancelled = True

    def step(self) -> tuple[bool, Optional[tuple]]:
        """Make one token and hand it over. When the job is over, return its last event (None
        when cancelled: nobody listens) for the caller to send once its books are done."""
        if self.cancelled:
            self._close()
            return True, None
        try:
            if self._stream is None:
                s = self.sampling
                self._stream = generate_tokens(self.served.model, np.array([self.ids], dtype=np.int64),
                                               self.max_tokens, s.temperature, s.top_k, s.top_p, seed=s.seed)
                self._decoder = self.served.tokenizer.stream_decoder()
            token = next(self._stream, None)
            if token is None:
                self.finished = True
                return True, ("done", self._decoder.flush())
            self.tokens += 1
            self._emit(("token", self._decoder.feed(int(token[0]))))
            return False, None
        except Exception as exc:  # noqa: BLE001 -- one request's failure must not stop the server
            self._close()
            return True, ("error", f"generation failed: {type(exc).__name__}: {exc}")

    def _emit(self, event) -> None:
        try:
            self.on_event(event)
        except RuntimeError:  # the client's event loop is gone (server shutting down)
            self.cancelled = True

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None


SHUTDOWN = ("error", "the server is shutting down")


class Busy(Exception):
    """Every stream slot and queue place is taken: the client should retry later."""


class Engine:
    """Runs jobs on one worker thread: up to ``max_active`` interleaved token by token, up to
    ``max_queued`` more waiting in order; beyond that :meth:`submit` raises :class:`Busy`."""

    def __init__(self, max_active: int, max_queued: int, start: bool = True):
        self.max_active, self.max_queued = max_active, max_queued
        self._cond = threading.Condition()
        self._active: list[Job] = []
        self._waiting: collections.deque[Job] = collections.deque()
        self._closed = False
        self.completed = 0  # jobs that ran to the end (for /health)
        self._thread = threading.Thread(target=self._run, name="gpt-serve-decoder", daemon=True)
        if start:
            self.start()

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise Busy("the server is shutting down")
            if len(self._active) + len(self._waiting) >= self.max_active + self.max_queued:
                raise Busy(f"all {self.max_active} streams are busy and {self.max_queued} requests are waiting")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue at once, a running one before its next token."""
        job.cancel()
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)

    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self._active), "queued": len(self._waiting), "completed": self.completed,
                    "max_active": self.max_active, "max_queued": self.max_queued}

    def close(self, timeout: float = 5.0) -> None:
        """End every job (its client hears ``SHUTDOWN``) and stop the worker. Streams have no
        natural end soon, so a server stops them rather than wait for them."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiting)
            self._waiting.clear()
            for job in self._active:
                job.cancel()  # the worker ends it after the token it may be making
            self._cond.notify()
        for job in waiting:
            job.cancel()
            job._emit(SHUTDOWN)
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:  # never started: nobody else will tell the running jobs
            self._step_all(list(self._active))

    def _run(self) -> None:
        # The whole worker runs without a graph: interleaved generators each enter and leave
        # tt.no_grad(); under this outer one they all restore "off".
        with tt.no_grad():
            while True:
                with self._cond:
                    while not self._closed and not self._active and not self._waiting:
                        self._cond.wait()
                    while not self._closed and self._waiting and len(self._active) < self.max_active:
                        self._active.append(self._waiting.popleft())
                    jobs = list(self._active)
                self._step_all(jobs)
                if self._closed and not self._active:
                    return

    def _step_all(self, jobs) -> None:
        """One token of each job; the ones that end leave (a cancelled one hears SHUTDOWN if the
        server is closing: its client is still there)."""
        for job in jobs:
            over, last = job.step()
            if over:
                with self._cond:  # before the client hears: /health never shows a job it saw end
                    self._active.remove(job)
                    self.completed += job.finished
                if last is None and self._closed:
                    last = SHUTDOWN
                if last is not None:
                    job._emit(last)


def prompt_ids(served: ServedModel, prompt: str) -> list:
    """The prompt's token ids; ValueError (TokenizerError) for text the tokenizer cannot encode."""
    ids = served.tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt is empty; give at least one character")
    return ids


__all__ = ["ServeLimits", "ServedModel", "Loader", "LOADERS", "load_served", "Sampling", "Job", "Busy", "Engine", "prompt_ids",
           "CheckpointError"]
