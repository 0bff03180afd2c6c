"""Drive poe-gateway's MCP tools with the official `mcp` Python client.

Two transports:

* stdio: the binary launched as ``poe-gateway mcp`` (what Claude Desktop, Claude
  Code and Cursor do), with ``POE_BASE_URL`` pointed at the fake Poe upstream;
* streamable HTTP: ``/mcp`` on the running ``gateway`` fixture.

Each runs the same conversation: list the tools, a two-turn session, an
attachment, image generation, and ``clear_session``.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from conftest import FULL_TEXT, IMAGE_URL, POLICIES_TOML, REPO_ROOT, TEST_API_KEY, USAGE

EXPECTED_TOOLS = {
    "ask_poe",
    "ask_with_attachment",
    "ask_poe_with_tools",
    "generate_image",
    "generate_video",
    "list_models",
    "list_available_models",
    "clear_session",
}

# A 1x1 PNG.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
CALL_TIMEOUT_S = 30.0

def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    anyio.run(scenario)


def _bin() -> str:
    return os.environ.get("POE_GATEWAY_BIN") or str(REPO_ROOT / "target" / "debug" / "poe-gateway")


# Both ways a client can open: the `initialize` handshake (protocol up to 2025-11-25) and
# `server/discover` with per-request metadata (2026-07-28).
HANDSHAKES = ["initialize", "discover"]


async def _open(session: ClientSession, handshake: str) -> None:
    with anyio.fail_after(CALL_TIMEOUT_S):
        if handshake == "initialize":
            await session.initialize()
        else:
            await session.discover()


@contextlib.asynccontextmanager
async def _stdio_session(upstream, tmp: Path, handshake: str = "initialize") -> AsyncIterator[ClientSession]:
    policies = tmp / "policies.toml"
    policies.write_text(POLICIES_TOML)
    params = StdioServerParameters(
        command=_bin(),
        args=["mcp"],
        env={
            "POE_BASE_URL": upstream.base_url,
            "POE_API_KEY": TEST_API_KEY,
            "POE_GATEWAY_POLICIES": str(policies),
            "POE_GATEWAY_DATABASE_URL": f"sqlite://{tmp / 'ledger.db'}",
            "RUST_LOG": "info",
            "NO_PROXY": "127.0.0.1,localhost",
        },
        cwd=str(tmp),
    )
    with open(tmp / "mcp-stderr.log", "w") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write):
            async with ClientSession(read, write) as session:
                await _open(session, handshake)
                yield session


@contextlib.asynccontextmanager
async def _http_session(gateway, handshake: str = "initialize") -> AsyncIterator[ClientSession]:
    async with streamable_http_client(f"{gateway.base_url}/mcp") as (read, write):
        async with ClientSession(read, write) as session:
            await _open(session, handshake)
            yield session


async def _call(session: ClientSession, tool: str, args: dict, **kw):
    with anyio.fail_after(CALL_TIMEOUT_S):
        return await session.call_tool(tool, args, **kw)


def _text(result) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "type", None) == "text")


def _ok(result) -> dict:
    assert not result.is_error, _text(result)
    assert isinstance(result.structured_content, dict), result
    return result.structured_content


def _chat_requests(upstream) -> list[dict]:
    return [r.body for r in upstream.requests() if r.path.startswith("/v1/chat/completions")]


async def _conversation(session: ClientSession, upstream, attachment: dict) -> None:
    """The scenario both transports run."""
    tools = await session.list_tools()
    names = {t.name for t in tools.tools}
    assert EXPECTED_TOOLS <= names, names
    ask = next(t for t in tools.tools if t.name == "ask_poe")
    assert {"bot", "prompt", "session_id"} <= set(ask.input_schema["properties"])
    assert ask.output_schema is not None

    # Turn 1, with progress notifications.
    progress: list[tuple[float, str | None]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, message))

    first = _ok(
        await _call(
            session, "ask_poe", {"bot": "claude", "prompt": "Hi, I am Ada", "system": "Be brief."},
            progress_callback=on_progress,
        )
    )
    assert first["text"] == FULL_TEXT
    assert first["bot"] == "claude-sonnet-4.5"
    assert first["usage"] == USAGE
    session_id = first["session_id"]
    assert progress and "".join(m or "" for _, m in progress) == FULL_TEXT, progress

    # Turn 2 carries turn 1.
    second = _ok(await _call(session, "ask_poe", {"bot": "claude", "prompt": "Who am I?", "session_id": session_id}))
    assert second["session_id"] == session_id
    reqs = _chat_requests(upstream)
    assert reqs[-1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, I am Ada"},
        {"role": "assistant", "content": FULL_TEXT},
        {"role": "user", "content": "Who am I?"},
    ]
    assert all(r["model"] == "claude-sonnet-4.5" for r in reqs)

    # An attachment, in the same session: an image_url part with the PNG as a data URL.
    third = _ok(
        await _call(
            session,
            "ask_with_attachment",
            {"bot": "claude", "prompt": "What is in this image?", "session_id": session_id, **attachment},
        )
    )
    assert third["text"] == FULL_TEXT
    last = _chat_requests(upstream)[-1]
    assert len(last["messages"]) == 6
    parts = last["messages"][-1]["content"]
    assert parts[0] == {"type": "text", "text": "What is in this image?"}
    assert parts[1]["type"] == "image_url"
    assert parts[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(PNG).decode()

    # Image generation: the URL parsed out of Poe's markdown, as text and as a resource link.
    image = await _call(session, "generate_image", {"prompt": "a red fox", "aspect": "1:1"})
    data = _ok(image)
    assert data["urls"] == [IMAGE_URL]
    assert data["bot"] == "gpt-image-1"
    links = [c for c in image.content if getattr(c, "type", None) == "resource_link"]
    assert [str(link.uri) for link in links] == [IMAGE_URL]
    assert links[0].name == "image.png" and links[0].mime_type == "image/png"
    assert IMAGE_URL in _text(image)
    req = _chat_requests(upstream)[-1]
    assert req["model"] == "gpt-image-1" and req["stream"] is False and req["aspect"] == "1:1"

    # list_models shows the aliases.
    models = _ok(await _call(session, "list_models", {"filter": "image"}))
    assert models["aliases"]["image"] == ["gpt-image-1"]
    assert {"gpt-image-1", "image"} <= {m["id"] for m in models["models"]}

    # clear_session, after which the session is gone.
    cleared = _ok(await _call(session, "clear_session", {"session_id": session_id}))
    assert cleared == {"session_id": session_id, "cleared": True}
    gone = await _call(session, "ask_poe", {"bot": "claude", "prompt": "Still there?", "session_id": session_id})
    assert gone.is_error and "unknown session_id" in _text(gone), _text(gone)

    # Errors are tool errors the agent can read.
    bad = await _call(session, "ask_poe", {"bot": "missing-bot", "prompt": "hi"})
    assert bad.is_error and "Model missing-bot not found" in _text(bad), _text(bad)


@pytest.mark.parametrize("handshake", HANDSHAKES)
def test_stdio(upstream, tmp_path, handshake):
    png = tmp_path / "pixel.png"
    png.write_bytes(PNG)

    async def scenario() -> None:
        async with _stdio_session(upstream, tmp_path, handshake) as session:
            await _conversation(session, upstream, {"attachment_path": str(png)})

    try:
        _run(scenario)
    except BaseException:
        log = tmp_path / "mcp-stderr.log"
        if log.exists():
            print("--- poe-gateway mcp stderr ---\n" + log.read_text(errors="replace")[-20000:])
        raise


def test_stdio_keeps_stdout_for_the_protocol(upstream, tmp_path):
    """Logs go to stderr: a session whose stderr has log lines still speaks clean JSON-RPC."""

    async def scenario() -> None:
        async with _stdio_session(upstream, tmp_path) as session:
            _ok(await _call(session, "ask_poe", {"bot": "gpt-5", "prompt": "hi"}))

    _run(scenario)
    log = (tmp_path / "mcp-stderr.log").read_text(errors="replace")
    assert "request finished" in log, log
    assert TEST_API_KEY not in log


@pytest.mark.parametrize("handshake", HANDSHAKES)
def test_streamable_http(gateway, upstream, handshake):
    async def scenario() -> None:
        async with _http_session(gateway, handshake) as session:
            b64 = base64.b64encode(PNG).decode()
            await _conversation(session, upstream, {"attachment_base64": b64, "mime_type": "image/png"})

    _run(scenario)


def test_streamable_http_refuses_attachment_paths(gateway, upstream, tmp_path):
    png = tmp_path / "pixel.png"
    png.write_bytes(PNG)

    async def scenario() -> None:
        async with _http_session(gateway) as session:
            result = await _call(
                session, "ask_with_attachment", {"bot": "claude", "prompt": "?", "attachment_path": str(png)}
            )
            assert result.is_error
            assert "not available over HTTP" in _text(result), _text(result)

    _run(scenario)
    assert _chat_requests(upstream) == []


def test_streamable_http_rejects_foreign_origin(gateway):
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(
        f"{gateway.base_url}/mcp",
        data=b'{"jsonrpc":"2.0","id":1,"method":"ping"}',
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "Origin": "https://evil.example",
        },
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        opener.open(req, timeout=10)
    assert e.value.code == 403
