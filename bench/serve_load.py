"""Load on ``python -m gpt.serve``: many concurrent streaming completions, every one checked.

    python -m bench.serve_load                          # 20 concurrent streams, 50 requests, 64 tokens each
    python -m bench.serve_load --checkpoint out/ckpt.safetensors --streams 20 --requests 50
    python -m bench.serve_load --quick                  # CI: 4 streams, 8 requests, tiny model

Starts the server on a free loopback port (random weights of ``--preset`` unless
``--checkpoint``), sends ``--requests`` streaming requests from ``--streams`` client threads,
and reports errors and lost requests (both must be 0), the latency to the first token
(p50/p95/max) and tokens/s (all streams together, and per stream), beside gpt.generate's loop
on the same model in this process without HTTP, one stream at a time. The client side here
(start a server, read SSE) is also what tests/test_serve.py drives the server with.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import selectors
import signal
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import finish, machine, model_config, parser

REPO = Path(__file__).resolve().parents[1]
VOCAB = "\n !$&',-.3:;?" + string.ascii_uppercase + string.ascii_lowercase  # Tiny Shakespeare's 65 characters
START_TIMEOUT_S = 60  # only so that a broken server fails instead of hanging; not a timing check


# --------------------------------------------------------------------------- a checkpoint and a server
def random_checkpoint(path, preset: str = "tiny") -> Path:
    """An inference checkpoint (weights, config, char tokenizer) of ``preset``'s shape with random
    weights: decoding speed does not depend on what the weights are."""
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT
    from gpt.tokenizer import CharTokenizer

    cfg, _ = model_config(preset, len(VOCAB))
    tok = CharTokenizer(VOCAB)
    model = GPT(cfg)
    meta = {"model_type": "gpt", "model_config": cfg.to_dict(), "tokenizer": tok.to_json(), "step": 0}
    return save_checkpoint(path, {k: np.array(v) for k, v in model.state_dict().items()}, meta)


class Server:
    """``python -m gpt.serve --port 0 *args`` in a child process; ``url`` once it listens.

    >>> with Server("--checkpoint", "ckpt.safetensors") as server:  # doctest: +SKIP
    ...     get_json(server.url, "/health")
    """

    def __init__(self, *args, env=None):
        self.args = [sys.executable, "-m", "gpt.serve", "--port", "0", *map(str, args)]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.proc = self.url = None
        self.stderr_lines: list[str] = []

    def __enter__(self) -> "Server":
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stderr, selectors.EVENT_READ)
            while self.url is None:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self._fail(f"did not start within {START_TIMEOUT_S} s")
                line = self.proc.stderr.readline()
                if not line:
                    self._fail("exited")
                self.stderr_lines.append(line.rstrip("\n"))
                if line.startswith("serving on http://"):
                    self.url = line.split()[2].rstrip("/")
        return self

    def _fail(self, what: str):
        code, rest = self.stop(signal.SIGKILL)
        self.stderr_lines += rest.splitlines()
        raise RuntimeError(f"gpt.serve {what} with {code}: {self.stderr_lines}")

    def stop(self, sig=signal.SIGINT) -> tuple[int, str]:
        """Stop the server with ``sig``; (exit code, the rest of its stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------- the client
def _connection(url: str, timeout: float) -> http.client.HTTPConnection:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def request(url: str, method: str, path: str, body=None, headers=None, timeout: float = 60):
    """(status, headers, body bytes). A dict body is sent as JSON."""
    if isinstance(body, dict):
        body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    conn = _connection(url, timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def get_json(url: str, path: str, timeout: float = 60):
    status, _, data = request(url, "GET", path, timeout=timeout)
    return status, json.loads(data)


def stream_events(url: str, body: dict, timeout: float = 60):
    """Yield (seconds since the request, the ``data:`` payload) of each server-sent event of a
    streaming completion; raises on a non-200 answer. Closing the generator drops the connection."""
    conn = _connection(url, timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        for line in resp:
            if line.startswith(b"data: "):
                yield time.perf_counter() - t0, line[6:].strip().decode()
    finally:
        conn.close()


def stream_completion(url: str, body: dict, timeout: float = 60) -> dict:
    """One streaming completion read to the end: its text, whether it ended with ``[DONE]``,
    any error, the latency to the first text and the total time."""
    out = {"text": "", "done": False, "error": None, "first_s": None, "total_s": None, "tokens": None,
           "finish_reason": None}
    try:
        for t, data in stream_events(url, body, timeout):
            if data == "[DONE]":
                out["done"], out["total_s"] = True, t
                break
            msg = json.loads(data)
            if "error" in msg:
                out["error"] = msg["error"]["message"]
                break
            choice = msg["choices"][0]
            if choice["text"] and out["first_s"] is None:
                out["first_s"] = t
            out["text"] += choice["text"]
            out["finish_reason"] = choice["finish_reason"] or out["finish_reason"]
            if msg.get("usage"):
                out["tokens"] = msg["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 -- a load test counts failures rather than stopping at one
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def run_load(url: str, n_requests: int, streams: int, max_tokens: int, prompt: str = "ROMEO:",
             timeout: float = 300) -> tuple[list[dict], float]:
    """(each request's stream_completion result, in order; the wall time of all of them):
    ``n_requests`` requests from ``streams`` client threads, request i with seed i."""
    bodies = [{"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": i} for i in range(n_requests)]
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda b: stream_completion(url, b, timeout), bodies))
    return results, time.perf_counter() - t0


def summarize(results: list[dict], wall_s: float, max_tokens: int) -> dict:
    ok = [r for r in results if r["done"] and not r["error"] and r["tokens"] == max_tokens]
    first = np.array([r["first_s"] for r in ok if r["first_s"] is not None])
    per_stream = [r["tokens"] / r["total_s"] for r in ok if r["total_s"]]
    pct = (lambda q: round(float(np.percentile(first, q)) * 1000, 1)) if first.size else (lambda q: None)
    return {"requests": len(results), "ok": len(ok), "errors": sum(bool(r["error"]) for r in results),
            "lost": sum(not r["done"] and not r["error"] for r in results),
            "first_token_ms": {"p50": pct(50), "p95": pct(95), "max": pct(100)},
            "tokens_per_s_total": round(sum(r["tokens"] for r in ok) / wall_s, 1),
            "tokens_per_s_per_stream_median": round(float(np.median(per_stream)), 1) if per_stream else None,
            "wall_s": round(wall_s, 2)}


def direct_tokens_per_s(checkpoint, max_tokens: int, prompt: str = "ROMEO:", repeats: int = 5) -> float:
    """The peer: gpt.generate's loop on the same model in this process, one stream at a time,
    no HTTP (what a server could at best reach without batching streams together)."""
    from gpt.generate import generate_tokens, load_model

    model, tok, _ = load_model(checkpoint)
    ids = np.array([tok.encode(prompt)])
    t0 = time.perf_counter()
    for seed in range(repeats):
        for _ in generate_tokens(model, ids, max_tokens, 1.0, seed=seed):
            pass
    return repeats * max_tokens / (time.perf_counter() - t0)


def main(argv=None):
    ap = parser("python -m bench.serve_load", __doc__, "shakespeare_char_cpu", "4 streams, 8 requests, tiny model",
                backend=False)
    ap.add_argument("--checkpoint", help="serve this checkpoint (default: random weights of --preset)")
    ap.add_argument("--streams", type=int, default=20, help="concurrent client connections")
    ap.add_argument("--requests", type=int, default=50, help="requests in all")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--server-streams", type=int, default=8, help="the server's --max-streams")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset, args.streams, args.requests, args.max_tokens = "tiny", 4, 8, 16
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_checkpoint(Path(tmp) / "random.safetensors", args.preset)
        with Server("--checkpoint", checkpoint, "--max-streams", args.server_streams,
                    "--max-queued", max(args.requests, 64)) as server:
            results, wall = run_load(server.url, args.requests, args.streams, args.max_tokens)
            _, health = get_json(server.url, "/health")
        direct = direct_tokens_per_s(checkpoint, args.max_tokens)  # right after, on the same machine
    result = {"benchmark": "serve_load", "preset": None if args.checkpoint else args.preset,
              "checkpoint": args.checkpoint, "streams": args.streams, "server_streams": args.server_streams,
              "max_tokens": args.max_tokens, **summarize(results, wall, args.max_tokens),
              "direct_tokens_per_s": round(direct, 1), "server_after": health, "machine": machine()}
    result["total_vs_direct"] = round(result["tokens_per_s_total"] / direct, 2)
    print(json.dumps(result, indent=1))
    bad = [r for r in results if r["error"] or not r["done"]]
    for r in bad[:5]:
        print(f"failed: {r['error'] or 'no [DONE]'}", file=sys.stderr)
    return finish(result, args.json)


if __name__ == "__main__":
    main()
