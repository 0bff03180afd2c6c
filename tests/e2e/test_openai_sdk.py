"""Drive the real poe-gateway with the official `openai` Python SDK.

Fixtures (see conftest.py): ``upstream`` is the fake Poe API, ``gateway`` the
running binary, ``client`` an ``openai.OpenAI`` pointed at the gateway with
``max_retries=0`` so every retry observed is the gateway's own.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from conftest import FULL_TEXT, RESPONSES_USAGE, STREAM_PIECES, TEST_API_KEY, USAGE

MESSAGES = [{"role": "user", "content": "Say hello"}]

# urllib without any proxy handler: loopback only.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None):
    """Plain HTTP request; returns (status, headers, body bytes) for any status."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with _opener.open(req, timeout=20) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers, e.read()


def test_healthz(gateway):
    status, _, _ = _http("GET", f"{gateway.base_url}/healthz")
    assert status == 200


def test_non_stream_completion_via_alias(client, upstream):
    resp = client.chat.completions.create(
        model="claude",
        messages=MESSAGES,
        extra_body={"thinking_budget": 1024},
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.content == FULL_TEXT
    assert resp.choices[0].finish_reason == "stop"
    assert resp.model == "claude-sonnet-4.5"
    assert resp.usage is not None and resp.usage.total_tokens == USAGE["total_tokens"]

    reqs = upstream.requests()
    assert len(reqs) == 1, [r.body for r in reqs]
    up = reqs[0]
    assert up.path == "/v1/chat/completions"
    assert up.body["model"] == "claude-sonnet-4.5"
    assert up.headers.get("authorization") == f"Bearer {TEST_API_KEY}"
    # Unknown fields pass through untouched.
    assert up.body["thinking_budget"] == 1024
    assert up.body["messages"] == MESSAGES


def test_alias_is_case_insensitive(client, upstream):
    resp = client.chat.completions.create(model="Claude", messages=MESSAGES)
    assert resp.model == "claude-sonnet-4.5"
    assert upstream.models_seen() == ["claude-sonnet-4.5"]


def test_non_alias_model_passes_through(client, upstream):
    raw = client.chat.completions.with_raw_response.create(model="gemini-2.5-pro", messages=MESSAGES)
    resp = raw.parse()
    assert resp.model == "gemini-2.5-pro"
    assert raw.headers.get("x-poe-gateway-bot") == "gemini-2.5-pro"
    assert upstream.models_seen() == ["gemini-2.5-pro"]


def test_streaming_completion(client, upstream):
    stream = client.chat.completions.create(
        model="claude",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    finish_reasons: list[str] = []
    usage = None
    models = set()
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        models.add(chunk.model)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)

    assert "".join(pieces) == FULL_TEXT
    assert len(pieces) == 3  # deltas are not merged or re-split
    assert finish_reasons == ["stop"]
    assert usage is not None and usage.total_tokens == USAGE["total_tokens"]
    assert models == {"claude-sonnet-4.5"}

    (up,) = upstream.requests()
    assert up.body["model"] == "claude-sonnet-4.5"
    assert up.body["stream"] is True
    assert up.body["stream_options"] == {"include_usage": True}


def test_streaming_raw_sse_passthrough(client, upstream):
    with client.chat.completions.with_streaming_response.create(
        model="claude", messages=MESSAGES, stream=True
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers.get("content-type", "").startswith("text/event-stream")
        assert resp.headers.get("x-request-id")
        assert resp.headers.get("x-poe-gateway-bot") == "claude-sonnet-4.5"
        data_lines = [line for line in resp.iter_lines() if line.startswith("data:")]

    assert data_lines, "no SSE data lines received"
    assert data_lines[-1].strip() == "data: [DONE]"
    payloads = [json.loads(line[len("data:") :]) for line in data_lines[:-1]]
    text = "".join(
        c["delta"].get("content") or "" for p in payloads for c in p["choices"]
    )
    assert text == FULL_TEXT
    # No include_usage requested -> no usage chunk.
    assert all(p["choices"] for p in payloads)


def test_models_list_includes_aliases(client):
    ids = {m.id for m in client.models.list()}
    assert {"claude-sonnet-4.5", "gpt-5"} <= ids
    assert {"claude", "resilient"} <= ids


def test_raw_response_headers(client, upstream):
    raw = client.chat.completions.with_raw_response.create(model="claude", messages=MESSAGES)
    assert raw.status_code == 200
    assert raw.headers.get("x-request-id"), dict(raw.headers)
    assert raw.headers.get("x-poe-gateway-bot") == "claude-sonnet-4.5"
    assert raw.headers.get("x-poe-gateway-attempts") == "1"
    assert raw.headers.get("x-cache") in {"BYPASS", "MISS", "HIT"}
    assert raw.parse().choices[0].message.content == FULL_TEXT


def test_client_request_id_is_echoed(client):
    raw = client.chat.completions.with_raw_response.create(
        model="claude", messages=MESSAGES, extra_headers={"x-request-id": "e2e-req-42"}
    )
    assert raw.headers.get("x-request-id") == "e2e-req-42"


def test_upstream_auth_error_is_passed_through(client, upstream):
    with pytest.raises(openai.AuthenticationError) as excinfo:
        client.chat.completions.create(model="auth-fail", messages=MESSAGES)
    err = excinfo.value
    assert err.status_code == 401
    # The SDK unwraps {"error": {...}}: the upstream's body arrives unchanged.
    assert isinstance(err.body, dict), err.body
    assert err.body.get("type") == "authentication_error"
    assert err.body.get("message") == "Invalid API key"
    assert err.response.headers.get("x-request-id")
    assert upstream.models_seen() == ["auth-fail"]  # 401 is not retried


def test_malformed_json_is_rejected(gateway, upstream):
    status, headers, body = _http(
        "POST",
        f"{gateway.base_url}/v1/chat/completions",
        body=b'{"model": "claude", "messages": [',
        headers={"Content-Type": "application/json", "Authorization": "Bearer unused"},
    )
    assert status == 400, body
    payload = json.loads(body)
    error = payload["error"]
    assert error["type"] == "invalid_request_error"
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"]
    assert headers.get("x-request-id")
    assert upstream.requests() == []


def test_rate_limited_then_success_is_retried_by_gateway(client, upstream):
    raw = client.chat.completions.with_raw_response.create(model="flaky-429", messages=MESSAGES)
    assert raw.status_code == 200
    resp = raw.parse()
    assert resp.choices[0].message.content == FULL_TEXT
    assert resp.model == "flaky-429"
    assert raw.headers.get("x-poe-gateway-attempts") == "2"
    assert upstream.models_seen() == ["flaky-429", "flaky-429"]


def test_the_sdk_does_not_retry_on_top_of_the_gateway(gateway, upstream):
    """The gateway retried a 503 three times (its `retry.max_attempts`); the SDK, left at its
    default of two retries, would make that nine calls to Poe. `x-should-retry: false` on
    the final answer stops it."""
    import openai

    retrying = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", timeout=20.0)
    assert retrying.max_retries == 2
    with pytest.raises(openai.InternalServerError) as e:
        retrying.chat.completions.create(model="always-503", messages=MESSAGES)
    assert e.value.status_code == 503
    assert e.value.response.headers["x-should-retry"] == "false"
    assert e.value.response.headers["x-poe-gateway-attempts"] == "3"
    assert upstream.models_seen() == ["always-503"] * 3


def test_responses_api_via_alias(client, upstream):
    raw = client.responses.with_raw_response.create(
        model="claude",
        input="Say hello",
        extra_body={"thinking_budget": 1024},
    )
    resp = raw.parse()
    assert resp.output_text == FULL_TEXT
    assert resp.model == "claude-sonnet-4.5"
    assert resp.usage is not None and resp.usage.input_tokens == RESPONSES_USAGE["input_tokens"]
    assert raw.headers.get("x-poe-gateway-bot") == "claude-sonnet-4.5"
    assert raw.headers.get("x-cache") == "BYPASS"

    (up,) = upstream.requests()
    assert up.path == "/v1/responses"
    assert up.body["model"] == "claude-sonnet-4.5"
    assert up.body["input"] == "Say hello"
    assert up.body["thinking_budget"] == 1024


def test_responses_api_streaming(client, upstream):
    deltas: list[str] = []
    completed = None
    kinds: list[str] = []
    with client.responses.create(model="claude", input="Say hello", stream=True) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.completed":
                completed = event.response
    assert deltas == STREAM_PIECES
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert completed is not None and completed.output_text == FULL_TEXT
    assert completed.usage.total_tokens == RESPONSES_USAGE["total_tokens"]

    (up,) = upstream.requests()
    assert up.path == "/v1/responses"
    assert up.body["stream"] is True
    # The usage comes in the last event: nothing is added to the request for it.
    assert "stream_options" not in up.body


def test_responses_api_errors_raise_the_sdks_exceptions(client, upstream):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="missing-bot", input="hi")
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="", input="hi")
    assert "model" in str(e.value)


def test_fallback_chain_moves_on_after_404(client, upstream):
    raw = client.chat.completions.with_raw_response.create(model="resilient", messages=MESSAGES)
    assert raw.status_code == 200
    resp = raw.parse()
    assert resp.model == "gpt-5"
    assert resp.choices[0].message.content == FULL_TEXT
    assert raw.headers.get("x-poe-gateway-bot") == "gpt-5"
    assert upstream.models_seen() == ["missing-bot", "gpt-5"]
