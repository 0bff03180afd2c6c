"""Anthropic's Messages API through the official `anthropic` SDK: what Claude Code and other
Anthropic clients speak when ANTHROPIC_BASE_URL points at the gateway. The fake Poe answers
`/v1/messages` only with the server's key in `x-api-key`, as Poe documents it."""

from __future__ import annotations

import json
import urllib.request

import anthropic
import pytest

from conftest import FULL_TEXT, MESSAGES_USAGE, STREAM_PIECES, TEST_API_KEY, launch_gateway
from test_keys import ADMIN_KEY, new_key

MESSAGES = [{"role": "user", "content": "Say hello"}]
# What the prompt counts: Anthropic's input tokens leave out its prompt cache's.
PROMPT_TOKENS = (
    MESSAGES_USAGE["input_tokens"]
    + MESSAGES_USAGE["cache_creation_input_tokens"]
    + MESSAGES_USAGE["cache_read_input_tokens"]
)


def claude(gw, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=key, max_retries=0, timeout=20.0)


def test_messages_via_alias(gateway, upstream):
    raw = claude(gateway).messages.with_raw_response.create(
        model="claude",
        max_tokens=64,
        messages=MESSAGES,
        extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"},
    )
    msg = raw.parse()
    assert msg.content[0].text == FULL_TEXT
    assert msg.model == "claude-sonnet-4.5"
    assert msg.usage.cache_read_input_tokens == MESSAGES_USAGE["cache_read_input_tokens"]
    assert raw.headers.get("x-poe-gateway-bot") == "claude-sonnet-4.5"
    assert raw.headers.get("x-cache") == "BYPASS"
    assert raw.headers.get("x-request-id")

    (up,) = upstream.requests()
    assert up.path == "/v1/messages"
    assert up.body["model"] == "claude-sonnet-4.5"
    assert up.body["max_tokens"] == 64
    # The server's key goes in both headers Poe documents for this API; the client's version
    # and betas go with it.
    assert up.headers["x-api-key"] == TEST_API_KEY
    assert up.headers["authorization"] == f"Bearer {TEST_API_KEY}"
    assert up.headers["anthropic-version"] == raw.http_request.headers["anthropic-version"]
    assert up.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"


def test_messages_streaming(gateway, upstream):
    with claude(gateway).messages.stream(model="claude", max_tokens=64, messages=MESSAGES) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == STREAM_PIECES
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == MESSAGES_USAGE["output_tokens"]

    (up,) = upstream.requests()
    assert up.body["stream"] is True
    # The usage comes in the stream's events: nothing is added to the request for it.
    assert "stream_options" not in up.body


def test_a_cut_stream_raises_the_sdks_error(gateway, upstream):
    """Poe's connection breaks mid-stream: the gateway ends the stream with an `error` event,
    which the SDK raises, rather than a stream that just stops."""
    pieces = []
    with pytest.raises(anthropic.APIStatusError) as e:
        with claude(gateway).messages.stream(model="cut-stream", max_tokens=64, messages=MESSAGES) as stream:
            for text in stream.text_stream:
                pieces.append(text)
    assert pieces == STREAM_PIECES[:1]
    assert e.value.body["error"]["type"] == "api_error"
    assert "broke" in e.value.body["error"]["message"]


def test_errors_raise_the_sdks_exceptions(gateway, upstream):
    # Poe's own error passes through.
    with pytest.raises(anthropic.NotFoundError):
        claude(gateway).messages.create(model="missing-bot", max_tokens=8, messages=MESSAGES)
    # The gateway's own, in Anthropic's shape.
    with pytest.raises(anthropic.BadRequestError) as e:
        claude(gateway).messages.create(model="", max_tokens=8, messages=MESSAGES)
    assert e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "model" in e.value.body["error"]["message"]


def test_token_counts_and_the_model_list(gateway, upstream):
    """What Claude Code asks for besides messages, which Poe does not serve: a token count
    (the gateway's estimate, a token per 4 bytes of text) and the model list, both read by
    the SDK's own types."""
    client = claude(gateway)
    small = client.messages.count_tokens(model="claude", messages=MESSAGES)
    big = client.messages.count_tokens(model="claude", system="x" * 4000, messages=MESSAGES)
    assert 0 < small.input_tokens < 50
    assert 1000 <= big.input_tokens - small.input_tokens <= 1010
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.count_tokens(model="claude", messages=[])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert not [r for r in upstream.requests() if r.path.startswith("/v1/messages")]

    # The Messages API's models (Claude bots and the aliases to them), in Anthropic's pages.
    models = list(client.models.list())
    assert [m.id for m in models] == ["claude-sonnet-4.5", "claude"]
    assert models[0].created_at.year == 2023
    assert [m.id for m in client.models.list(limit=1)] == ["claude-sonnet-4.5", "claude"]
    assert client.models.retrieve("claude").display_name == "claude"
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("gpt-5")


KEYS_POLICIES = """\
[auth]
mode = "keys"

[aliases]
claude = "claude-sonnet-4.5"

[pricing."claude-sonnet-4.5"]
prompt = 0.0001
completion = 0.001
"""


@pytest.fixture(scope="module")
def keys_gateway(upstream, tmp_path_factory):
    with launch_gateway(
        upstream,
        tmp_path_factory.mktemp("anthropic-keys-gateway"),
        KEYS_POLICIES,
        {"POE_GATEWAY_ADMIN_KEY": ADMIN_KEY},
    ) as gw:
        yield gw


def test_gateway_keys_are_taken_from_x_api_key(keys_gateway, upstream):
    """A team member's gateway key as ANTHROPIC_API_KEY: the SDK sends it as `x-api-key`.
    The request is accounted to the key (cache reads counted as prompt tokens, priced at a
    tenth of the prompt price), and its budget
    refuses the next request with the error the SDK raises for rate limits."""
    key = new_key(keys_gateway, name="claude-code", budget_usd=0.004, period="day")
    client = claude(keys_gateway, key)
    # 9 prompt tokens at $0.0001, 40 read from the prompt cache at a tenth of that, and 3
    # completion tokens at $0.001: $0.0043.
    assert client.messages.create(model="claude", max_tokens=64, messages=MESSAGES).content[0].text == FULL_TEXT
    (up,) = upstream.requests()
    assert up.headers["x-api-key"] == TEST_API_KEY, "the server's key, never the caller's"

    req = urllib.request.Request(f"{keys_gateway.base_url}/v1/usage", headers={"x-api-key": key})
    with urllib.request.urlopen(req, timeout=10) as resp:
        report = json.loads(resp.read())
    assert report["totals"]["requests"] == 1
    assert report["totals"]["prompt_tokens"] == PROMPT_TOKENS
    assert report["totals"]["completion_tokens"] == MESSAGES_USAGE["output_tokens"]
    assert abs(report["totals"]["cost_usd"] - 0.0043) < 1e-9

    with pytest.raises(anthropic.RateLimitError) as e:
        client.messages.create(model="claude", max_tokens=64, messages=MESSAGES)
    assert e.value.body["error"]["code"] == "insufficient_quota"
    with pytest.raises(anthropic.AuthenticationError) as e:
        claude(keys_gateway, "pgw_" + "0" * 64).messages.create(model="claude", max_tokens=8, messages=MESSAGES)
    assert e.value.body["error"]["type"] == "authentication_error"
