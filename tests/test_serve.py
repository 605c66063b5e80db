"""``python -m gpt.serve`` as clients use it: a real server process on a free loopback port,
spoken to over real HTTP (the stdlib's http.client, through bench/serve_load.py's client).
Every wait is bounded; no test checks a timing."""
from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import os
import signal
import socket
import time

import numpy as np
import pytest
from safetensors.numpy import save as safetensors_save

from bench.serve_load import Server, get_json, request, run_load, stream_completion, stream_events
from gpt.generate import generate_tokens, load_model
from test_checkpoint import training_checkpoint

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None,
                       reason='the serve extra is not installed (pip install -e ".[serve]")'),
    pytest.mark.skipif(os.name != "posix", reason="signals as on POSIX"),
]
PROMPT = "the king"  # in the test checkpoint's character vocabulary
WAIT_S = 60  # bound on waiting for the server to notice something; never a timing check


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return training_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt.safetensors")


@pytest.fixture(scope="module")
def server(checkpoint):
    with Server("--checkpoint", checkpoint, "--max-tokens", 1_000_000, "--max-prompt-chars", 1000,
                "--max-upload-mb", 1) as srv:
        yield srv


def post(server, body, headers=None):
    status, _, data = request(server.url, "POST", "/v1/completions", body, headers)
    return status, json.loads(data)


def wait_until_idle(server):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        _, health = get_json(server.url, "/health")
        if health["active"] == 0 and health["queued"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the server still generates after {WAIT_S} s: {health}")


def expected_text(checkpoint, n, **sampling):
    """What gpt.generate makes in this process for the same prompt and settings."""
    model, tok, _ = load_model(checkpoint)
    tokens = generate_tokens(model, np.array([tok.encode(PROMPT)]), n, **sampling)
    return tok.decode([int(t[0]) for t in tokens])


# --------------------------------------------------------------------------- the API
def test_health_and_models(server):
    status, health = get_json(server.url, "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "ckpt.safetensors"
    status, models = get_json(server.url, "/v1/models")
    assert status == 200 and models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["ckpt.safetensors"] and models["data"][0]["object"] == "model"


def test_completion_is_gpt_generate(server, checkpoint):
    sampling = dict(temperature=0.9, top_k=5, top_p=0.95, seed=7)
    status, body = post(server, {"prompt": PROMPT, "max_tokens": 30, **sampling})
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "ckpt.safetensors"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert choice["text"] == expected_text(checkpoint, 30, **sampling)
    assert body["usage"] == {"prompt_tokens": len(PROMPT), "completion_tokens": 30, "total_tokens": len(PROMPT) + 30}


def test_stream_sends_the_same_text_as_sse_then_done(server):
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 1.0, "seed": 3}
    _, whole = post(server, body)
    events = [data for _, data in stream_events(server.url, body, timeout=WAIT_S)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == 40
    status, headers, _ = request(server.url, "POST", "/v1/completions", {**body, "stream": True, "max_tokens": 1})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")


def test_greedy_without_seed_is_deterministic(server):
    a = post(server, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})[1]["choices"][0]["text"]
    b = post(server, {"prompt": PROMPT, "max_tokens": 12, "temperature": 0})[1]["choices"][0]["text"]
    assert a == b and len(a) == 12


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": PROMPT, "max_tokens": 1_000_001}, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
    ({"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
    ({"prompt": PROMPT, "top_p": 1.5}, 400, "top_p"),
    ({"prompt": PROMPT, "top_k": 0.5}, 400, "top_k"),
    ({"prompt": PROMPT, "seed": -1}, 400, "seed"),
    ({"prompt": PROMPT, "seed": 2 ** 32}, 400, "seed"),
    ({"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
    ({"prompt": PROMPT, "top_p": True}, 400, "top_p"),
    ({"prompt": PROMPT, "n": 2}, 400, "n"),
    ({"prompt": PROMPT, "n": True}, 400, "n"),
    ({"prompt": PROMPT, "logit_bias": {}}, 400, "logit_bias"),
    ({"prompt": 5}, 400, "prompt"),
    ({"max_tokens": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "Zebra"}, 400, "prompt"),  # characters the char tokenizer does not know
    ({"prompt": "t" * 1001}, 400, "prompt"),  # --max-prompt-chars 1000
    ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_json_errors(server, body, status, param):
    got, answer = post(server, body)
    assert got == status, answer
    assert answer["error"]["param"] == param and answer["error"]["message"]


@pytest.mark.parametrize("raw, headers, status, needle", [
    (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    (b'{"prompt": "a", "prompt": "b"}', {"Content-Type": "application/json"}, 400, "twice"),
    (b'{"prompt": NaN}', {"Content-Type": "application/json"}, 400, "NaN"),
    (b"[1, 2]", {"Content-Type": "application/json"}, 400, "JSON object"),
    (b"\xff\xfe", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    (b'{"prompt": "the"}', {"Content-Type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    (b'{"prompt": "the"}', {}, 415, "application/json"),
    (b"x" * (12 * 1000 + 65 * 1024 + 1), {"Content-Type": "application/json"}, 413, "at most"),
])
def test_bad_bodies_get_json_errors(server, raw, headers, status, needle):
    got, _, data = request(server.url, "POST", "/v1/completions", raw, headers)
    assert got == status and needle in json.loads(data)["error"]["message"], data


def test_unknown_routes_and_methods_are_json_errors_and_foreign_hosts_are_refused(server):
    status, _, data = request(server.url, "GET", "/v2/nothing")
    assert status == 404 and "error" in json.loads(data)
    status, _, data = request(server.url, "GET", "/v1/completions")
    assert status == 405 and "error" in json.loads(data)
    # a page on another name that resolves to 127.0.0.1 (DNS rebinding) gets nothing
    status, _, _ = request(server.url, "GET", "/health", headers={"Host": "attacker.example:80"})
    assert status == 400


def test_the_official_openai_client_works(server, checkpoint):
    openai = pytest.importorskip("openai", reason="the openai package is not installed (optional)")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=WAIT_S, max_retries=0)
    assert [m.id for m in client.models.list()] == ["ckpt.safetensors"]
    args = dict(model="ckpt.safetensors", prompt=PROMPT, max_tokens=15, temperature=0.8, seed=2, extra_body={"top_k": 9})
    whole = client.completions.create(**args)
    assert whole.choices[0].text == expected_text(checkpoint, 15, temperature=0.8, seed=2, top_k=9)
    assert whole.usage.completion_tokens == 15
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(**args, stream=True))
    assert streamed == whole.choices[0].text
    with pytest.raises(openai.BadRequestError, match="max_tokens must be"):
        client.completions.create(**{**args, "max_tokens": -1})


def test_page_is_served(server):
    status, headers, data = request(server.url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'id="file"' in data and b"/v1/completions" in data


# --------------------------------------------------------------------------- clients that leave, many clients
def test_a_client_that_disconnects_stops_its_generation(server):
    before = wait_until_idle(server)["completed"]
    events = stream_events(server.url, {"prompt": PROMPT, "max_tokens": 1_000_000}, timeout=WAIT_S)
    for _ in range(3):  # it is generating
        next(events)
    assert get_json(server.url, "/health")[1]["active"] == 1
    events.close()  # drop the connection mid-stream
    assert wait_until_idle(server)["completed"] == before  # cancelled, not run to its million tokens


def test_a_waiting_non_streaming_client_that_disconnects_stops_its_generation(server):
    sock = socket.create_connection(server.url.split("://")[1].rsplit(":", 1), timeout=WAIT_S)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 1_000_000}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.monotonic() + WAIT_S
    while get_json(server.url, "/health")[1]["active"] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.02)
    sock.close()
    wait_until_idle(server)


def test_concurrent_streams_are_all_served_completely(server):
    """The bounded version of bench/serve_load.py: 12 clients at once, 30 requests, each read to
    [DONE] with exactly max_tokens tokens and the text its seed gives alone."""
    results, _ = run_load(server.url, n_requests=30, streams=12, max_tokens=20, prompt=PROMPT, timeout=WAIT_S)
    assert [r["error"] for r in results] == [None] * 30
    assert all(r["done"] and r["tokens"] == 20 and len(r["text"]) == 20 for r in results)
    alone = stream_completion(server.url, {"prompt": PROMPT, "max_tokens": 20, "temperature": 1.0, "seed": 29})
    assert results[29]["text"] == alone["text"]  # interleaving does not mix streams' sampling
    assert len({r["text"] for r in results}) > 1  # (different seeds: the texts are not one copy)


def test_over_the_stream_and_queue_limits_a_client_gets_429(checkpoint):
    with Server("--checkpoint", checkpoint, "--max-streams", 1, "--max-queued", 1, "--max-tokens", 1_000_000) as srv:
        running = stream_events(srv.url, {"prompt": PROMPT, "max_tokens": 1_000_000}, timeout=WAIT_S)
        next(running)  # the one stream is busy
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(stream_completion, srv.url, {"prompt": PROMPT, "max_tokens": 5}, WAIT_S)
            deadline = time.monotonic() + WAIT_S
            while get_json(srv.url, "/health")[1]["queued"] == 0:
                assert time.monotonic() < deadline, "the second request was never queued"
                time.sleep(0.02)
            status, _, data = request(srv.url, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 1})
            assert status == 429 and "busy" in json.loads(data)["error"]["message"]
            running.close()  # frees the stream: the queued request runs to its end
            result = waiting.result(timeout=WAIT_S)
        assert result["done"] and result["tokens"] == 5, result
        assert request(srv.url, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200


# --------------------------------------------------------------------------- uploads
def upload(server, data: bytes, name="model.safetensors", content_type="application/octet-stream"):
    status, _, body = request(server.url, "POST", "/api/model", data,
                              {"Content-Type": content_type, "X-Filename": name})
    return status, json.loads(body)


def test_upload_switches_the_model(server, tmp_path):
    other = training_checkpoint(tmp_path / "wide.safetensors", n_embd=16, n_layer=2)
    status, info = upload(server, other.read_bytes(), "wide%20one.safetensors")
    assert status == 200, info
    assert info["id"] == "wide one.safetensors" and info["config"]["n_embd"] == 16
    model, _, _ = load_model(other)
    assert info["parameters"] == sum(p.data.size for p in model.parameters())
    assert get_json(server.url, "/v1/models")[1]["data"][0]["id"] == "wide one.safetensors"
    assert get_json(server.url, "/api/model")[1]["id"] == "wide one.safetensors"
    assert post(server, {"prompt": PROMPT, "max_tokens": 3, "model": "ckpt.safetensors"})[0] == 404
    status, body = post(server, {"prompt": PROMPT, "max_tokens": 3, "model": "wide one.safetensors"})
    assert status == 200 and len(body["choices"][0]["text"]) == 3
    # back to the first one, so that the other tests see it
    status, info = upload(server, training_checkpoint(tmp_path / "ckpt.safetensors").read_bytes(), "ckpt.safetensors")
    assert status == 200 and info["config"]["n_embd"] == 8


def _foreign_safetensors():
    return safetensors_save({"w": np.zeros((2, 2), np.float32)}, metadata={"format": "pt"})


def _bad_uploads(good: bytes):
    nan = bytearray(good)  # the same header with every weight NaN
    header_end = 8 + int.from_bytes(good[:8], "little")
    nan[header_end:] = np.full((len(good) - header_end) // 4, np.nan, np.float32).tobytes()
    return [
        ("empty", b"", 400, "too short"),
        ("garbage", b"\x00" * 8 + b"not a checkpoint", 400, "not a valid tinytensor checkpoint"),
        ("truncated", good[:-10], 400, "not a valid tinytensor checkpoint"),
        ("header lies", (10 ** 9).to_bytes(8, "little") + good[8:], 400, "header claims"),
        ("not ours", _foreign_safetensors(), 400, "not written by gpt.train"),
        ("NaN weights", bytes(nan), 400, "non-finite"),
        ("too large", good + b"\x00" * (1 << 20), 413, "at most"),  # --max-upload-mb 1
    ]


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(server, checkpoint):
    good = checkpoint.read_bytes()
    for what, data, status, needle in _bad_uploads(good):
        got, body = upload(server, data)
        assert got == status and needle in body["error"]["message"], (what, body)
        assert get_json(server.url, "/v1/models")[1]["data"][0]["id"] == "ckpt.safetensors", what
    assert upload(server, good, "model.bin")[0] == 400
    assert upload(server, good, content_type="multipart/form-data")[0] == 415
    assert post(server, {"prompt": PROMPT, "max_tokens": 2})[0] == 200


def test_a_stalled_upload_times_out_and_frees_the_upload_slot(checkpoint):
    with Server("--checkpoint", checkpoint, "--upload-timeout-s", 1) as srv:
        with socket.create_connection(srv.url.split("://")[1].rsplit(":", 1), timeout=WAIT_S) as sock:
            sock.sendall(b"POST /api/model HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b"x" * 10)  # and then nothing
            answer = b""
            while b"}}" not in answer:  # the end of the JSON error, or the server closing
                part = sock.recv(4096)
                if not part:
                    break
                answer += part
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer, answer
        assert upload(srv, checkpoint.read_bytes())[0] == 200


def test_no_upload_and_no_model(checkpoint):
    with Server("--no-upload", "--checkpoint", checkpoint) as srv:
        status, body = upload(srv, checkpoint.read_bytes())
        assert status == 403 and "--no-upload" in body["error"]["message"]
        assert get_json(srv.url, "/api/model")[1]["upload"] is False
    with Server() as srv:
        assert get_json(srv.url, "/v1/models")[1]["data"] == []
        status, body = post(srv, {"prompt": PROMPT})
        assert status == 503 and "upload" in body["error"]["message"]
        assert upload(srv, checkpoint.read_bytes())[0] == 200
        assert post(srv, {"prompt": PROMPT, "max_tokens": 1})[0] == 200


# --------------------------------------------------------------------------- the program
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_server_with_130_even_mid_stream(checkpoint, sig):
    srv = Server("--checkpoint", checkpoint, "--max-tokens", 1_000_000).__enter__()
    events = stream_events(srv.url, {"prompt": PROMPT, "max_tokens": 1_000_000}, timeout=WAIT_S)
    next(events)
    code, err = srv.stop(sig)
    rest = [data for _, data in events]  # what the server sent before it went
    assert code == 130 and err.strip() == "interrupted", err
    assert json.loads(rest[-1])["error"]["message"] == "the server is shutting down"  # told, not cut off


def test_bad_checkpoint_and_port_in_use_are_one_line_and_exit_1(tmp_path, checkpoint):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    for args in (["--checkpoint", bad], ["--checkpoint", tmp_path / "missing.safetensors"]):
        srv = Server(*args)
        with pytest.raises(RuntimeError, match="exited with 1"):
            srv.__enter__()
        assert len(srv.stderr_lines) == 1 and srv.stderr_lines[0].startswith("error: "), srv.stderr_lines
    with Server("--checkpoint", checkpoint) as first:
        port = first.url.rsplit(":", 1)[1]
        srv = Server("--checkpoint", checkpoint)
        srv.args[srv.args.index("--port") + 1] = port
        with pytest.raises(RuntimeError, match="exited with 1"):
            srv.__enter__()
        assert len(srv.stderr_lines) == 1 and "cannot listen" in srv.stderr_lines[0], srv.stderr_lines


def test_the_load_benchmark_runs_quick():
    """bench/serve_load.py in quick mode, so it cannot rot (no timing asserted)."""
    from bench import serve_load
    r = serve_load.main(["--quick"])
    assert (r["ok"], r["errors"], r["lost"]) == (r["requests"], 0, 0) and r["requests"] == 8
    assert r["tokens_per_s_total"] > 0 and r["first_token_ms"]["p50"] > 0
