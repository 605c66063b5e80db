"""The inference server's HTTP side (Starlette): the page, the upload, OpenAI-style completions.

Routes:

* ``GET /``: the page (gpt/serve_page.html);
* ``GET /health``: ``{"status": "ok", "model": id or null, "active": n, "queued": n, ...}``;
* ``GET /v1/models``: the served model, OpenAI's list format;
* ``POST /v1/completions``: OpenAI's completions (``prompt``, ``max_tokens``, ``temperature``,
  ``top_p``, ``stream``, plus ``top_k`` and ``seed``); ``"stream": true`` answers with
  Server-Sent Events, one ``data: {...}`` chunk per step and ``data: [DONE]`` at the end;
* ``GET /api/model``: the served model's config and parameter count (for the page);
* ``POST /api/model``: replace the served model by a checkpoint sent as the raw body
  (``Content-Type: application/octet-stream``); it is read into memory, never to disk, and
  checked as any untrusted checkpoint (gpt.checkpoint) before anything is built.

Every request is untrusted: bodies are read up to a limit, JSON is parsed strictly
(gpt.strict_json), each field is checked, and a bad request gets a 4xx with an OpenAI-style
``{"error": {"message", "type", "param", "code"}}``. Requests that change state must carry
their content type, which a cross-site form cannot send without the browser asking first.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import urllib.parse
from pathlib import Path
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import strict_json
from .checkpoint import CheckpointError, InMemoryCheckpoint
from .resources import ResourceError, check_fits
from .serve_engine import Busy, Engine, Job, Sampling, ServedModel, ServeLimits, load_served, prompt_ids
from .tokenizer import TokenizerError

PAGE = Path(__file__).with_name("serve_page.html")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


class ApiError(Exception):
    """A request the server refuses: the status and the message the client gets."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status, headers=headers)


# --------------------------------------------------------------------------- reading requests
async def read_body(request: Request, limit: int, what: str) -> bytes:
    """The body, refusing (413) one over ``limit`` bytes before reading it where its length is
    declared, else as soon as it passes the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared[:40]!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"the {what} is {int(declared):,} bytes; this server accepts at most {limit:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the {what} is over {limit:,} bytes; this server accepts at most {limit:,}")
        chunks.append(chunk)
    return b"".join(chunks)


def require_content_type(request: Request, expected: str) -> None:
    got = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if got != expected:
        raise ApiError(415, f"send the body with Content-Type: {expected} (got {got or 'none'!r})")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class CompletionRequest:
    """A checked ``POST /v1/completions`` body. OpenAI's defaults: max_tokens 16, temperature 1,
    top_p 1 (off); ``top_k`` and ``seed`` are ours (llama.cpp's server takes them too)."""

    FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stream", "n", "user")

    def __init__(self, body: dict, served: ServedModel, limits: ServeLimits):
        unknown = sorted(set(body) - set(self.FIELDS))
        if unknown:
            raise ApiError(400, f"unsupported field {unknown[0]!r}; this server takes {', '.join(self.FIELDS)}",
                           unknown[0])
        model = body.get("model")
        if model is not None and model != served.id:
            raise ApiError(404, f"model {str(model)[:80]!r} is not served here; GET /v1/models lists "
                                f"{served.id!r}", "model", "model_not_found")
        self.prompt = self._prompt(body.get("prompt"), limits)
        self.max_tokens = body.get("max_tokens", 16)
        if self.max_tokens is None:
            self.max_tokens = 16
        if not (_is_int(self.max_tokens) and 0 <= self.max_tokens <= limits.max_tokens):
            raise ApiError(400, f"max_tokens must be an integer in [0, {limits.max_tokens}], got "
                                f"{self.max_tokens!r}", "max_tokens")
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p")
        top_p = None if _is_number(top_p) and top_p == 1 else top_p  # 1 keeps every token: the same as off
        top_k = body.get("top_k")
        top_k = None if top_k in (0, -1) and _is_int(top_k) else top_k  # llama.cpp's "off"
        seed = body.get("seed")
        if seed is not None and not (_is_int(seed) and 0 <= seed < 1 << 32):
            raise ApiError(400, f"seed must be an integer in [0, 2**32) or null, got {seed!r}", "seed")
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if value is not None and not _is_number(value):
                raise ApiError(400, f"{name} must be a number, got {value!r}", name)
        self.sampling = Sampling(temperature if temperature is not None else 1.0, top_k, top_p, seed)
        try:
            self.sampling.check(self.max_tokens)
        except ValueError as exc:
            raise ApiError(400, str(exc), str(exc).split(" ", 1)[0]) from None
        self.stream = body.get("stream", False)
        if not isinstance(self.stream, bool):
            raise ApiError(400, f"stream must be true or false, got {self.stream!r}", "stream")
        n = body.get("n", 1)
        if not (_is_int(n) and n == 1):
            raise ApiError(400, f"n must be 1 (one completion per request), got {n!r}", "n")
        try:
            self.ids = prompt_ids(served, self.prompt)
        except (TokenizerError, ValueError) as exc:
            raise ApiError(400, f"prompt: {exc}", "prompt") from None

    @staticmethod
    def _prompt(prompt, limits: ServeLimits) -> str:
        if isinstance(prompt, list) and len(prompt) == 1:  # OpenAI also takes a list of prompts
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, f"prompt must be a string, got {json.dumps(prompt)[:80]}", "prompt")
        if len(prompt) > limits.max_prompt_chars:
            raise ApiError(400, f"prompt is {len(prompt):,} characters; this server accepts at most "
                                f"{limits.max_prompt_chars:,} (--max-prompt-chars)", "prompt")
        return prompt


# --------------------------------------------------------------------------- the application
class Portal:
    """The server's state: the served model (or None), the engine, the limits."""

    def __init__(self, limits: ServeLimits, served: Optional[ServedModel] = None, backend: str = "numpy",
                 allow_upload: bool = True):
        limits.check()
        self.limits, self.served, self.backend, self.allow_upload = limits, served, backend, allow_upload
        self.engine: Optional[Engine] = None
        self._upload_lock = asyncio.Lock()

    def start(self):
        self.engine = Engine(self.limits.max_streams, self.limits.max_queued)

    def stop(self):
        if self.engine is not None:
            self.engine.close()

    def require_model(self) -> ServedModel:
        served = self.served
        if served is None:
            raise ApiError(503, "no model is loaded; upload a checkpoint in the page (GET /) or start the server "
                                "with --checkpoint PATH", kind="server_error")
        return served

    # ---- routes
    async def page(self, request: Request) -> Response:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        served = self.served
        return JSONResponse({"status": "ok", "model": served.id if served else None, **self.engine.stats()})

    async def models(self, request: Request) -> Response:
        served = self.served
        data = [] if served is None else [{"id": served.id, "object": "model", "created": served.created,
                                           "owned_by": "tinytensor"}]
        return JSONResponse({"object": "list", "data": data})

    async def model_info(self, request: Request) -> Response:
        served = self.require_model()
        return JSONResponse({"id": served.id, "created": served.created, **served.info,
                             "upload": self.allow_upload})

    async def upload(self, request: Request) -> Response:
        if not self.allow_upload:
            raise ApiError(403, "uploads are off on this server (started with --no-upload)")
        require_content_type(request, "application/octet-stream")
        # the page sends the file's name percent-encoded (header values are Latin-1)
        name = urllib.parse.unquote(request.headers.get("x-filename", "upload.safetensors"))
        name = name.replace("\\", "/").rsplit("/", 1)[-1][:200] or "upload"
        if not name.endswith(".safetensors"):
            raise ApiError(400, f"{name!r} is not a .safetensors file; choose a checkpoint written by gpt.train")
        if self._upload_lock.locked():
            raise ApiError(429, "another checkpoint is being loaded; try again when it is done")
        async with self._upload_lock:
            limit = self.limits.max_upload_mb << 20
            declared = request.headers.get("content-length", "")
            try:  # the body and its joined copy, before reading it
                check_fits(2 * min(int(declared) if declared.isdigit() else limit, limit),
                           f"the upload {name!r}", "upload a smaller checkpoint or free memory")
            except ResourceError as exc:
                raise ApiError(413, str(exc)) from None
            try:
                data = await asyncio.wait_for(read_body(request, limit, f"checkpoint {name!r}"),
                                              self.limits.upload_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(408, f"the upload {name!r} did not arrive within {self.limits.upload_timeout_s} s "
                                    "(--upload-timeout-s)") from None
            try:  # reading and building the model is CPU work: off the event loop, the streams go on
                served = await asyncio.get_running_loop().run_in_executor(
                    None, load_served, InMemoryCheckpoint(data, name), self.backend)
            except CheckpointError as exc:
                raise ApiError(400, str(exc), kind="invalid_checkpoint") from None
            del data
        self.served = served  # running jobs keep the model they started with
        return await self.model_info(request)

    async def completions(self, request: Request) -> Response:
        require_content_type(request, "application/json")
        raw = await read_body(request, self.limits.max_body_bytes, "request body")
        try:
            body = strict_json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        served = self.require_model()
        req = CompletionRequest(body, served, self.limits)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = Job(served, req.ids, req.max_tokens, req.sampling,
                  lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            self.engine.submit(job)
        except Busy as exc:
            raise ApiError(429, f"the server is busy: {exc}; retry later", kind="rate_limit_error") from None
        completion = {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion",
                      "created": int(time.time()), "model": served.id}
        if req.stream:
            return StreamingResponse(self._sse(job, events, completion, len(req.ids)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._whole(request, job, events, completion, len(req.ids))

    async def _sse(self, job: Job, events: asyncio.Queue, completion: dict, prompt_tokens: int):
        """One ``data:`` chunk per batch of tokens ready (one token each unless the client reads
        slower than the model writes), a last one with finish_reason and the usage, then
        ``data: [DONE]``. If the client goes away, Starlette cancels this generator, which
        cancels the job."""
        def chunk(text, finish=None, **extra):
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**completion, 'choices': [choice], **extra})}\n\n"
        try:
            while True:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                text = "".join(t for kind, t in batch if kind != "error")
                kind, last = batch[-1]  # "done" and "error" come last
                if text:
                    yield chunk(text)
                if kind == "error":
                    yield f"data: {json.dumps({'error': {'message': last, 'type': 'server_error'}})}\n\n"
                    return
                if kind == "done":
                    yield chunk("", "length", usage=_usage(prompt_tokens, job.tokens))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            self.engine.cancel(job)  # nothing to do if it finished

    async def _whole(self, request: Request, job: Job, events: asyncio.Queue, completion: dict,
                     prompt_tokens: int) -> Response:
        async def collect():
            parts = []
            while True:
                kind, text = await events.get()
                if kind == "error":
                    raise ApiError(500, text, kind="server_error")
                parts.append(text)
                if kind == "done":
                    return "".join(parts)

        async def disconnected():  # the body is read: the next message is the client leaving
            while (await request.receive())["type"] != "http.disconnect":
                pass

        result, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not result.done():
                result.cancel()
                self.engine.cancel(job)
        if result.cancelled():
            return Response(status_code=499)  # nobody reads it
        text = result.result()
        return JSONResponse({**completion, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                        "finish_reason": "length"}],
                             "usage": _usage(prompt_tokens, job.tokens)})


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _json_errors(handler):
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response()
    return wrapped


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()


def create_app(portal: Portal, host: str = "127.0.0.1") -> Starlette:
    """The Starlette application for ``portal``. Bound to a loopback address, it answers only
    requests addressed to a loopback name (a web page cannot rebind its own name to us)."""
    routes = [Route("/", _json_errors(portal.page)),
              Route("/health", _json_errors(portal.health)),
              Route("/v1/models", _json_errors(portal.models)),
              Route("/v1/completions", _json_errors(portal.completions), methods=["POST"]),
              Route("/api/model", _json_errors(portal.model_info), methods=["GET"]),
              Route("/api/model", _json_errors(portal.upload), methods=["POST"])]
    middleware = []
    if host in LOOPBACK_NAMES:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        portal.start()
        try:
            yield
        finally:
            portal.stop()
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: _http_error},
                     lifespan=lifespan)
