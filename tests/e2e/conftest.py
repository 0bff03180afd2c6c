"""End-to-end fixtures: a fake Poe upstream and the real poe-gateway binary.

The fake upstream is a stdlib ``ThreadingHTTPServer`` (HTTP/1.1) on an
ephemeral loopback port. It records every ``POST /v1/chat/completions`` it
receives so tests can check what the gateway forwarded, and behaves by the
request's ``model``:

* ``missing-bot``  -> 404 Poe-shaped ``not_found_error``
* ``flaky-429``    -> first request 429 (``Retry-After: 1``), then normal
* ``auth-fail``    -> 401 Poe-shaped ``authentication_error``
* ``gpt-image-1``  -> a completion in Poe's media markdown
  (``![image.png](<IMAGE_URL>)`` followed by the bare URL)
* anything else    -> a normal completion echoing the model name
  (SSE with hand-written chunked encoding when ``"stream": true``)

``POST /v1/responses`` and ``POST /v1/messages`` (Anthropic's Messages API, answered
only with ``x-api-key``, as Poe documents it) answer in their own shapes; ``cut-stream``
on the Messages API breaks its stream after the first text.

The gateway is started once per session as ``$POE_GATEWAY_BIN serve`` and
stopped with SIGTERM at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_API_KEY = "test-poe-key-e2e-0123456789"
STARTUP_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 15.0
LISTEN_LINE = re.compile(r"^poe-gateway listening on http://127\.0\.0\.1:(\d+)$")

POLICIES_TOML = """\
[aliases]
claude = "claude-sonnet-4.5"
resilient = ["missing-bot", "gpt-5"]
image = "gpt-image-1"

[retry]
base_backoff = "10ms"
"""

UPSTREAM_MODELS = [
    {"id": "claude-sonnet-4.5", "object": "model", "created": 1700000000000, "owned_by": "Anthropic"},
    {"id": "gpt-5", "object": "model", "created": 1700000000001, "owned_by": "OpenAI"},
    {"id": "gemini-2.5-pro", "object": "model", "created": 1700000000002, "owned_by": "Google"},
    {"id": "gpt-image-1", "object": "model", "created": 1700000000003, "owned_by": "OpenAI"},
]

STREAM_PIECES = ["Hello", ", ", "world"]
FULL_TEXT = "".join(STREAM_PIECES)
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
# The Responses API's usage: the same counts under its own names.
RESPONSES_USAGE = {
    "input_tokens": 9,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 3,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 12,
}
# The Messages API's usage, for a prompt mostly read from Anthropic's prompt cache.
MESSAGES_USAGE = {
    "input_tokens": 9,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 40,
    "output_tokens": 3,
}
# What Poe's image bots answer: markdown, then the bare URL.
IMAGE_URL = "https://pfst.cf2.poecdn.net/base/image/abc?w=1024&h=1024"
IMAGE_MARKDOWN = f"![image.png]({IMAGE_URL})\n\n{IMAGE_URL}"

# Loopback traffic must never go through a proxy (httpx2 and urllib honour
# the *_PROXY variables).
_no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost"]))
os.environ["NO_PROXY"] = os.environ["no_proxy"] = _no_proxy


# --------------------------------------------------------------------------
# Fake Poe upstream
# --------------------------------------------------------------------------


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON (None if the body was not JSON)
    raw_body: bytes


@dataclass
class FakePoe:
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _requests: list[RecordedRequest] = field(default_factory=list)
    _counters: dict[str, int] = field(default_factory=dict)
    # Requests for `gated-bot` are answered only once this is set (or after 30 s).
    gate: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def record(self, req: RecordedRequest) -> int:
        """Store a chat request; return how many requests this model has had."""
        model = req.body.get("model") if isinstance(req.body, dict) else None
        with self._lock:
            self._requests.append(req)
            key = str(model)
            self._counters[key] = self._counters.get(key, 0) + 1
            return self._counters[key]

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def models_seen(self) -> list[str]:
        return [r.body.get("model") for r in self.requests() if isinstance(r.body, dict)]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._counters.clear()
            self.gate.clear()


def _poe_error(code: int, type_: str, message: str) -> dict:
    return {"error": {"code": code, "type": type_, "message": message, "metadata": {}}}


def _response_object(model: str, text: str, status: str, usage: dict | None) -> dict:
    """A Responses API `response` object, as Poe returns it."""
    output = []
    if text:
        output.append(
            {
                "type": "message",
                "id": "msg_fake",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        )
    return {
        "id": "resp_fake_0001",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


# A Messages request whose last user turn says `[call <tool>]` is answered with a call of that
# tool (no arguments); the turn that brings its result back is answered with the result's
# text. What an agent (Claude Code) and its tools do with a model that uses them.
CALL_MARKER = re.compile(r"\[call ([A-Za-z0-9_-]+)\]")


def _block_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_block_text(b.get("text", b.get("content", ""))) for b in content if isinstance(b, dict))
    return ""


def _scripted_turn(body: dict) -> tuple[dict | None, str]:
    """(a tool call to answer with, or else the text to answer with) for a Messages body."""
    # The last user turn (Claude Code may put a system message after it).
    users = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    blocks = content if isinstance(content, list) else []
    results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
    if results:
        return None, "tool said: " + _block_text(results[0].get("content"))
    found = CALL_MARKER.search(_block_text(content))
    if found:
        return {"type": "tool_use", "id": "toolu_fake_0001", "name": found.group(1), "input": {}}, ""
    return None, FULL_TEXT


def _make_handler(fake: FakePoe) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakePoe/1.0"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass  # keep pytest output clean

        # -- helpers -------------------------------------------------------

        def _read_body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                data = bytearray()
                while True:
                    size_line = self.rfile.readline()
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        # trailers until the empty line
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return bytes(data)
                    data += self.rfile.read(size)
                    self.rfile.readline()  # CRLF after the chunk
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send_json(self, status: int, obj: Any, extra_headers: dict[str, str] | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra_headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()

        def _write_chunk(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        # -- routes --------------------------------------------------------

        def do_GET(self) -> None:  # noqa: N802
            if self.path.split("?", 1)[0] == "/v1/models":
                self._send_json(200, {"object": "list", "data": UPSTREAM_MODELS})
            else:
                self._send_json(404, _poe_error(404, "not_found_error", f"No route {self.path}"))

        def do_POST(self) -> None:  # noqa: N802
            raw = self._read_body()
            route = self.path.split("?", 1)[0]
            if route not in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
                self._send_json(404, _poe_error(404, "not_found_error", f"No route {self.path}"))
                return
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
            req = RecordedRequest(
                method="POST",
                path=self.path,
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                raw_body=raw,
            )
            nth = fake.record(req)
            if not isinstance(body, dict):
                self._send_json(400, _poe_error(400, "invalid_request_error", "Body is not a JSON object"))
                return

            model = str(body.get("model"))
            if route == "/v1/messages":
                self._messages(model, body, req.headers)
            elif model == "missing-bot":
                self._send_json(404, _poe_error(404, "not_found_error", "Model missing-bot not found"))
            elif model == "auth-fail":
                self._send_json(401, _poe_error(401, "authentication_error", "Invalid API key"))
            elif model == "flaky-429" and nth == 1:
                self._send_json(
                    429,
                    _poe_error(429, "rate_limit_error", "Rate limit exceeded, retry later"),
                    {"Retry-After": "1"},
                )
            elif model == "gated-bot":
                fake.gate.wait(30)
                self._complete(model)
            elif model == "always-503":
                self._send_json(503, _poe_error(503, "overloaded_error", "Poe is overloaded"))
            elif route == "/v1/responses" and body.get("stream"):
                self._respond_stream(model)
            elif route == "/v1/responses":
                self._send_json(200, _response_object(model, FULL_TEXT, "completed", RESPONSES_USAGE))
            elif model == "gpt-image-1":
                self._complete(model, IMAGE_MARKDOWN)
            elif body.get("stream"):
                self._stream(model, body)
            else:
                self._complete(model)

        def _complete(self, model: str, text: str = FULL_TEXT) -> None:
            self._send_json(
                200,
                {
                    "id": "chatcmpl-fake-0001",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": USAGE,
                },
            )

        def _messages(self, model: str, body: dict, headers: dict[str, str]) -> None:
            """Anthropic's Messages API: its own error shape, its named events."""

            def error(status: int, kind: str, message: str) -> None:
                self._send_json(status, {"type": "error", "error": {"type": kind, "message": message}})

            if headers.get("x-api-key") != TEST_API_KEY:
                return error(401, "authentication_error", "invalid x-api-key")
            if model == "missing-bot":
                return error(404, "not_found_error", f"model: {model}")
            tool_call, text = _scripted_turn(body)
            message = {
                "id": "msg_fake_0001",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [tool_call or {"type": "text", "text": text}],
                "stop_reason": "tool_use" if tool_call else "end_turn",
                "stop_sequence": None,
                "usage": MESSAGES_USAGE,
            }
            if not body.get("stream"):
                return self._send_json(200, message)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def event(kind: str, **fields: Any) -> bytes:
                return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()

            start = {**message, "content": [], "stop_reason": None, "usage": {**MESSAGES_USAGE, "output_tokens": 1}}
            self._write_chunk(event("message_start", message=start))
            if tool_call:
                block = {**tool_call, "input": {}}
                self._write_chunk(event("content_block_start", index=0, content_block=block))
                partial = json.dumps(tool_call["input"])
                self._write_chunk(
                    event("content_block_delta", index=0, delta={"type": "input_json_delta", "partial_json": partial})
                )
            else:
                self._write_chunk(event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
            pieces = [] if tool_call else STREAM_PIECES if text == FULL_TEXT else [text]
            for i, piece in enumerate(pieces):
                self._write_chunk(
                    event("content_block_delta", index=0, delta={"type": "text_delta", "text": piece})
                )
                if model == "cut-stream":
                    # A broken chunked body: the gateway sees the connection break mid-stream.
                    self.wfile.flush()
                    self.close_connection = True
                    return
            self._write_chunk(event("content_block_stop", index=0))
            self._write_chunk(
                event(
                    "message_delta",
                    delta={"stop_reason": message["stop_reason"], "stop_sequence": None},
                    usage={"output_tokens": MESSAGES_USAGE["output_tokens"]},
                )
            )
            self._write_chunk(event("message_stop"))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _respond_stream(self, model: str) -> None:
            """A Responses API stream: named events, the last `response.completed`, no [DONE]."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            seq = iter(range(100))

            def event(kind: str, **fields: Any) -> bytes:
                obj = {"type": kind, "sequence_number": next(seq), **fields}
                return f"event: {kind}\ndata: {json.dumps(obj)}\n\n".encode()

            self._write_chunk(event("response.created", response=_response_object(model, "", "in_progress", None)))
            for piece in STREAM_PIECES:
                self._write_chunk(
                    event(
                        "response.output_text.delta",
                        item_id="msg_fake",
                        output_index=0,
                        content_index=0,
                        delta=piece,
                    )
                )
            done = _response_object(model, FULL_TEXT, "completed", RESPONSES_USAGE)
            self._write_chunk(event("response.completed", response=done))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def _stream(self, model: str, body: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            created = int(time.time())

            def chunk(choices: list, **extra: Any) -> bytes:
                obj = {
                    "id": "chatcmpl-fake-0002",
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": choices,
                    **extra,
                }
                return b"data: " + json.dumps(obj).encode() + b"\n\n"

            for i, piece in enumerate(STREAM_PIECES):
                delta = {"content": piece}
                if i == 0:
                    delta["role"] = "assistant"
                self._write_chunk(chunk([{"index": 0, "delta": delta, "finish_reason": None}]))
            self._write_chunk(chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
            opts = body.get("stream_options") or {}
            if isinstance(opts, dict) and opts.get("include_usage"):
                self._write_chunk(chunk([], usage=USAGE))
            self._write_chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


@pytest.fixture(scope="session")
def upstream() -> FakePoe:
    fake = FakePoe()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(fake))
    server.daemon_threads = True
    fake.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="fake-poe", daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _clean_upstream(request: pytest.FixtureRequest) -> None:
    """Each test starts with an empty request log and fresh per-model counters."""
    if "upstream" in request.fixturenames:
        request.getfixturevalue("upstream").clear()


# --------------------------------------------------------------------------
# The real gateway
# --------------------------------------------------------------------------


@dataclass
class Gateway:
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _drain(stream, sink: "queue.Queue[str | None]", log_file) -> None:
    """Copy the gateway's stdout into a queue (the first line) and the log file."""
    first = True
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        if first:
            sink.put(line)
            first = False
        else:
            try:
                log_file.write(f"[stdout] {line}\n")
                log_file.flush()
            except ValueError:  # log file closed at teardown
                pass
    if first:
        sink.put(None)  # EOF before any line
    stream.close()


@contextlib.contextmanager
def launch_gateway(upstream: "FakePoe", tmp: Path, policies_toml: str, extra_env: dict[str, str] | None = None):
    """Runs ``poe-gateway serve`` against ``upstream`` with the given policy file; yields a
    ``Gateway`` and stops it with SIGTERM (checking the graceful exit) afterwards."""
    bin_path = os.environ.get("POE_GATEWAY_BIN") or str(REPO_ROOT / "target" / "debug" / "poe-gateway")
    if not os.path.isfile(bin_path) or not os.access(bin_path, os.X_OK):
        pytest.fail(f"gateway binary not found or not executable: {bin_path} (build it or set POE_GATEWAY_BIN)")

    policies = tmp / "policies.toml"
    policies.write_text(policies_toml)
    log_path = tmp / "gateway.log"

    env = dict(os.environ)
    for k in list(env):
        if k.startswith("POE_") and k != "POE_GATEWAY_BIN":
            del env[k]  # never leak real settings/keys into the test gateway
    env.update(
        {
            "POE_GATEWAY_LISTEN": "127.0.0.1:0",
            "POE_BASE_URL": upstream.base_url,
            "POE_API_KEY": TEST_API_KEY,
            "POE_GATEWAY_POLICIES": str(policies),
            "POE_GATEWAY_DATABASE_URL": f"sqlite://{tmp / 'ledger.db'}",
            "RUST_LOG": "info",
        }
    )
    env.update(extra_env or {})

    log_file = open(log_path, "w", buffering=1)  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [bin_path, "serve"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log_file,
        env=env,
        cwd=tmp,
    )
    first_line: "queue.Queue[str | None]" = queue.Queue()
    drainer = threading.Thread(target=_drain, args=(proc.stdout, first_line, log_file), daemon=True)
    drainer.start()

    def fail_startup(reason: str) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        drainer.join(timeout=5)
        log_file.close()
        pytest.fail(
            f"gateway failed to start: {reason}\n"
            f"exit code: {proc.returncode}\n"
            f"--- gateway log ({log_path}) ---\n{log_path.read_text(errors='replace')}",
            pytrace=False,
        )

    try:
        line = first_line.get(timeout=STARTUP_TIMEOUT_S)
    except queue.Empty:
        fail_startup(f"no stdout line within {STARTUP_TIMEOUT_S:.0f}s")
    if line is None:
        fail_startup("stdout closed before the listening line")
    m = LISTEN_LINE.match(line)
    if not m:
        fail_startup(f"unexpected first stdout line: {line!r}")

    gw = Gateway(port=int(m.group(1)), proc=proc, log_path=log_path)
    try:
        yield gw
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            drainer.join(timeout=5)
            log_file.close()
            pytest.fail(
                f"gateway did not exit within {SHUTDOWN_TIMEOUT_S:.0f}s of SIGTERM\n"
                f"--- gateway log ---\n{gw.log()}",
                pytrace=False,
            )
        drainer.join(timeout=5)
        log_file.close()
        if proc.returncode != 0:
            warnings.warn(
                f"gateway exited with code {proc.returncode} after SIGTERM (expected 0 for a graceful shutdown)",
                stacklevel=1,
            )


@pytest.fixture(scope="session")
def gateway(upstream: FakePoe, tmp_path_factory: pytest.TempPathFactory) -> Gateway:
    with launch_gateway(upstream, tmp_path_factory.mktemp("gateway"), POLICIES_TOML) as gw:
        yield gw


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """On a failing test, attach the gateway's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for gw in (v for v in getattr(item, "funcargs", {}).values() if isinstance(v, Gateway)):
        text = gw.log()
        if len(text) > 20000:
            text = "...(truncated)...\n" + text[-20000:]
        report.sections.append(("gateway log", text))


@pytest.fixture
def client(gateway: Gateway):
    import openai

    c = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0, timeout=20.0)
    try:
        yield c
    finally:
        c.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    import openai

    return [
        f"openai SDK {openai.__version__}, python {sys.version.split()[0]}",
        f"POE_GATEWAY_BIN={os.environ.get('POE_GATEWAY_BIN', '(default)')}",
    ]
