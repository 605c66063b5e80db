"""The inference portal: ``python -m gpt.serve [--checkpoint PATH] [--host 127.0.0.1] [--port 8000]``.

A web page (choose a checkpoint to upload, prompt, watch the text stream in) and an
OpenAI-compatible API (``POST /v1/completions`` with SSE streaming, ``GET /v1/models``,
``GET /health``); see gpt/serve_app.py for the routes. Needs the ``serve`` extra
(Starlette + uvicorn). Exit codes: 0 stopped, 1 error (a bad checkpoint, a port in use),
2 bad option or the extra missing, 130 Ctrl-C/SIGTERM.

>>> main(["--checkpoint", "out/ckpt.safetensors", "--port", "8000"])  # doctest: +SKIP
"""
from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a Ctrl-C while NumPy loads exits cleanly
    from gpt.signals import exit_quietly_on_signals
    exit_quietly_on_signals()

import argparse
import dataclasses
import socket
import sys

import tinytensor as tt
from tinytensor.backend import BACKENDS

from .checkpoint import CheckpointError
from .config import number_arg
from .serve_engine import ServeLimits, load_served
from .signals import EXIT_INTERRUPTED, StopRequest

EXTRA_HINT = 'pip install -e ".[serve]" in a clone (or: pip install "starlette>=0.37" "uvicorn>=0.30")'
GRACEFUL_SHUTDOWN_S = 3  # then open streams are cut: generation has no natural end soon


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m gpt.serve", allow_abbrev=False,
        description="Serve a model: a web page to upload a checkpoint and generate text, and an OpenAI-compatible "
                    "API (POST /v1/completions, streaming with \"stream\": true; GET /v1/models; GET /health).",
        epilog="exit codes: 0 stopped, 1 error, 2 bad option or the serve extra missing, 130 interrupted "
               "(Ctrl-C or SIGTERM). Example: curl -N http://127.0.0.1:8000/v1/completions -H 'Content-Type: "
               "application/json' -d '{\"prompt\": \"ROMEO:\", \"max_tokens\": 50, \"stream\": true}'")
    p.add_argument("--checkpoint", metavar="PATH",
                   help="checkpoint to serve from the start (default: none; upload one in the page)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 lets anyone on "
                        "the network generate and, unless --no-upload, replace the model)")
    p.add_argument("--port", type=number_arg(int, 0, 65535), default=8000,
                   help="port, 0 = any free one (the address is printed) (default: %(default)s)")
    p.add_argument("--backend", default="numpy", choices=BACKENDS,
                   help="array library: %(choices)s (default: %(default)s)")
    p.add_argument("--no-upload", dest="upload", action="store_false",
                   help="serve --checkpoint only: the page cannot upload another model")
    for f in dataclasses.fields(ServeLimits):
        lo, hi = f.metadata["range"]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=number_arg(int, lo, hi), default=f.default,
                       metavar="N", help=f"{f.metadata['help']}, {lo}..{hi:,} (default: %(default)s)")
    return p


def _note(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a port in use is one line and exit 1 (and
    --port 0 gets its real port printed)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _server_class(uvicorn, portal):
    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            portal.stop()  # end the streams first: uvicorn would wait for them, then cut them with a traceback
            await super().shutdown(sockets)
    return Server


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a bad option exits with code 2 and argparse's message
    if not args.upload and not args.checkpoint:
        parser.error("--no-upload serves --checkpoint only: pass --checkpoint PATH")
    try:  # the extra: checked before anything else so that its absence is the one message
        import uvicorn
        from .serve_app import Portal, create_app
    except ImportError as exc:
        _note(f"error: python -m gpt.serve needs the serve extra ({exc.name or exc} is missing): {EXTRA_HINT}")
        return 2
    limits = ServeLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeLimits)})
    tt.backend.keep_freed_memory()  # this process decodes: keep NumPy's temporaries mapped (see backend)
    if args.backend == "numpy":  # the CPU kernels load now, not inside the first request's first token
        tt.kernels.warm_up()
    try:
        with StopRequest().installed():  # Ctrl-C/SIGTERM raise KeyboardInterrupt (uvicorn hands them back)
            served = load_served(args.checkpoint, args.backend) if args.checkpoint else None
            try:
                sock = _listen(args.host, args.port)
            except OSError as exc:
                _note(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}; pick another "
                      "--port (or --port 0 for any free one) or --host")
                return 1
            port = sock.getsockname()[1]
            shown = f"[{args.host}]" if ":" in args.host else args.host
            _note(f"serving on http://{shown}:{port}/ ("
                  + (f"model {served.id}, {served.info['parameters']:,} parameters" if served else "no model yet: "
                     "upload one in the page") + "); Ctrl-C stops")
            if args.host not in ("127.0.0.1", "localhost", "::1"):
                _note(f"note: listening on {args.host}: other machines can reach this server"
                      + ("" if not args.upload else " and replace its model (--no-upload prevents that)"))
            portal = Portal(limits, served, args.backend, allow_upload=args.upload)
            config = uvicorn.Config(create_app(portal, args.host), log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on")
            try:
                _server_class(uvicorn, portal)(config).run(sockets=[sock])
            finally:
                sock.close()
    except KeyboardInterrupt:
        _note("interrupted")
        return EXIT_INTERRUPTED
    except (CheckpointError, tt.BackendError, OSError, ValueError, MemoryError) as exc:
        _note(f"error: {exc}" if str(exc) else f"error: {type(exc).__name__}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
