"""A standalone Poe-shaped upstream for scripts/schemathesis.sh.

Run as ``python tests/e2e/stub_poe.py``: it listens on an ephemeral loopback port, prints
``port <N>`` as its first stdout line, and serves until killed:

* ``GET /v1/models``               -> a small catalogue
* ``GET /usage/current_balance``   -> a point balance
* ``POST /v1/chat/completions``    -> a completion echoing the model name; an event stream
  (with a usage chunk when ``stream_options.include_usage`` is true) when ``stream`` is true;
  Poe's 400 when the body is not a JSON object
* ``POST /v1/responses``           -> a Responses API ``response``; its event stream (ending
  with ``response.completed``) when ``stream`` is true; the same 400
* ``POST /v1/messages``            -> Anthropic's ``message``; its event stream (ending with
  ``message_stop``) when ``stream`` is true; Anthropic's 400 for a body that is not an object
* anything else                    -> Poe's 404

Stdlib only (the same shapes as the pytest fixture in conftest.py, without pytest).
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODELS = [
    {"id": "claude-sonnet-4.5", "object": "model", "created": 1700000000000, "owned_by": "Anthropic"},
    {"id": "gpt-5", "object": "model", "created": 1700000000001, "owned_by": "OpenAI"},
    {"id": "gemini-2.5-pro", "object": "model", "created": 1700000000002, "owned_by": "Google"},
]
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def poe_error(code: int, type_: str, message: str) -> dict:
    return {"error": {"code": code, "type": type_, "message": message, "metadata": {}}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "StubPoe/1.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json(self, status: int, obj) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": MODELS})
        elif path == "/usage/current_balance":
            self._json(200, {"current_point_balance": 123456})
        else:
            self._json(404, poe_error(404, "not_found_error", "no such endpoint"))

    def do_POST(self) -> None:  # noqa: N802
        raw = self._read_body()
        route = self.path.split("?", 1)[0]
        if route not in ("/v1/chat/completions", "/v1/responses", "/v1/messages"):
            self._json(404, poe_error(404, "not_found_error", "no such endpoint"))
            return
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            if route == "/v1/messages":
                error = {"type": "invalid_request_error", "message": "Body is not a JSON object"}
                self._json(400, {"type": "error", "error": error})
            else:
                self._json(400, poe_error(400, "invalid_request_error", "Body is not a JSON object"))
            return
        model = str(body.get("model"))
        created = int(time.time())
        if route == "/v1/responses":
            self._respond(model, created, bool(body.get("stream")))
            return
        if route == "/v1/messages":
            self._messages(model, bool(body.get("stream")))
            return
        if not body.get("stream"):
            self._json(
                200,
                {
                    "id": "chatcmpl-stub",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}
                    ],
                    "usage": USAGE,
                },
            )
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(choices, **extra) -> bytes:
            obj = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": choices, **extra}
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        self._chunk(event([{"index": 0, "delta": {"role": "assistant", "content": "Hello"}, "finish_reason": None}]))
        self._chunk(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
        opts = body.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            self._chunk(event([], usage=USAGE))
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")


    def _messages(self, model: str, stream: bool) -> None:
        usage = {"input_tokens": USAGE["prompt_tokens"], "output_tokens": USAGE["completion_tokens"]}
        message = {"id": "msg_stub", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": "Hello"}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": usage}
        if not stream:
            self._json(200, message)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(kind: str, **fields) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()

        self._chunk(event("message_start", message={**message, "content": [], "stop_reason": None}))
        self._chunk(event("content_block_start", index=0, content_block={"type": "text", "text": ""}))
        self._chunk(event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hello"}))
        self._chunk(event("content_block_stop", index=0))
        self._chunk(event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 3}))
        self._chunk(event("message_stop"))
        self.wfile.write(b"0\r\n\r\n")

    def _respond(self, model: str, created: int, stream: bool) -> None:
        def response(status: str, text: str, usage) -> dict:
            content = [{"type": "output_text", "text": text, "annotations": []}]
            output = [{"type": "message", "id": "msg_stub", "status": "completed", "role": "assistant",
                       "content": content}] if text else []
            return {"id": "resp_stub", "object": "response", "created_at": created, "status": status,
                    "model": model, "output": output, "usage": usage}

        usage = {"input_tokens": USAGE["prompt_tokens"], "output_tokens": USAGE["completion_tokens"],
                 "total_tokens": USAGE["total_tokens"]}
        if not stream:
            self._json(200, response("completed", "Hello", usage))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for n, (kind, fields) in enumerate([
            ("response.created", {"response": response("in_progress", "", None)}),
            ("response.output_text.delta", {"item_id": "msg_stub", "output_index": 0, "content_index": 0,
                                            "delta": "Hello"}),
            ("response.completed", {"response": response("completed", "Hello", usage)}),
        ]):
            data = json.dumps({"type": kind, "sequence_number": n, **fields})
            self._chunk(f"event: {kind}\ndata: {data}\n\n".encode())
        self.wfile.write(b"0\r\n\r\n")


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"port {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
