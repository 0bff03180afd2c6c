"""Claude Code itself (the CLI, pinned in scripts/setup-node.sh) with the gateway on both of
its sides: as its model API (ANTHROPIC_BASE_URL, a team member's gateway key as
ANTHROPIC_API_KEY) and as an MCP server it runs tools from (`poe-gateway mcp` over stdio).
The fake Poe answers `[call <tool>]` with a call of that tool, and the tool's result with
its text, so a whole agent turn goes through: model call, tool call, model call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import FULL_TEXT, REPO_ROOT, TEST_API_KEY, launch_gateway
from test_keys import ADMIN_KEY, new_key

CLAUDE = REPO_ROOT / ".node" / "node_modules" / ".bin" / "claude"

POLICIES = """\
[auth]
mode = "keys"

[aliases]
claude = "claude-sonnet-4.5"
"""


@pytest.fixture(scope="module")
def team_gateway(upstream, tmp_path_factory):
    with launch_gateway(
        upstream,
        tmp_path_factory.mktemp("claude-code-gateway"),
        POLICIES,
        {"POE_GATEWAY_ADMIN_KEY": ADMIN_KEY},
    ) as gw:
        yield gw


def claude(tmp: Path, base_url: str, key: str, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    """`claude -p ...` in a home and a project folder of its own, reaching only the gateway."""
    if not os.access(CLAUDE, os.X_OK):
        pytest.fail(f"Claude Code is not installed at {CLAUDE}: run scripts/setup-node.sh")
    (tmp / "home").mkdir(exist_ok=True)
    (tmp / "project").mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp / "home"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": key,
        # Nothing but the gateway: no telemetry, update checks or error reports.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        # Read the gateway's model list, as a team's setup would.
        "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1",
        **env_extra,
    }
    # A session of its own, so a run that hangs is stopped with the MCP server it started.
    proc = subprocess.Popen(
        [str(CLAUDE), "-p", *args],
        env=env,
        cwd=tmp / "project",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"claude -p {args} did not finish in 120 s: {err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def own_usage(gw, key: str) -> dict:
    req = urllib.request.Request(f"{gw.base_url}/v1/usage?group_by=api", headers={"x-api-key": key})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_claude_code_answers_through_the_gateway(team_gateway, upstream, tmp_path):
    key = new_key(team_gateway, name="claude-code-user")
    run = claude(tmp_path, team_gateway.base_url, key, "Say hello", "--model", "claude")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == FULL_TEXT

    calls = [r for r in upstream.requests() if r.path.split("?")[0] == "/v1/messages"]
    assert calls, upstream.requests()
    for call in calls:
        # The server's Poe key, never the member's gateway key; the alias resolved; Claude
        # Code's betas passed on.
        assert call.headers["x-api-key"] == TEST_API_KEY
        assert call.body["model"] == "claude-sonnet-4.5"
        assert "claude-code-20250219" in call.headers["anthropic-beta"]
        assert call.body["stream"] is True

    # Claude Code read the gateway's model list (it keeps it in its cache, a file of the pinned
    # version's): the Claude bots and the alias to them, in Anthropic's shape, not the whole
    # catalogue.
    discovered = json.loads((tmp_path / "home" / ".claude" / "cache" / "gateway-models.json").read_text())
    assert [m["id"] for m in discovered["models"]] == ["claude-sonnet-4.5", "claude"]

    report = own_usage(team_gateway, key)
    assert report["totals"]["requests"] == len(calls)
    assert [g["group"] for g in report["groups"]] == ["messages"]
    assert report["totals"]["prompt_tokens"] > 0


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_claude_code_runs_the_gateways_mcp_tools(team_gateway, upstream, tmp_path, transport):
    """Claude Code asks the model, which calls `list_models` of the gateway's MCP server; the
    tool's answer (Poe's catalogue, from the gateway core) goes back to the model, whose reply
    quotes it. The server is `poe-gateway mcp` over stdio, or the team's gateway's `/mcp`
    with the member's key (`claude mcp add --transport http ... --header`)."""
    key = new_key(team_gateway, name=f"claude-code-agent-{transport}")
    bin_path = os.environ.get("POE_GATEWAY_BIN") or str(REPO_ROOT / "target" / "debug" / "poe-gateway")
    stdio = {
        "command": bin_path,
        "args": ["mcp"],
        "env": {
            "POE_API_KEY": TEST_API_KEY,
            "POE_BASE_URL": upstream.base_url,
            "POE_GATEWAY_DATABASE_URL": f"sqlite://{tmp_path / 'mcp-ledger.db'}",
            "RUST_LOG": "warn",
        },
    }
    http = {
        "type": "http",
        "url": f"{team_gateway.base_url}/mcp",
        "headers": {"Authorization": f"Bearer {key}"},
    }
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"poe": stdio if transport == "stdio" else http}}))
    run = claude(
        tmp_path,
        team_gateway.base_url,
        key,
        "[call mcp__poe__list_models]",
        "--model",
        "claude",
        "--mcp-config",
        str(config),
        "--strict-mcp-config",
        "--allowedTools",
        "mcp__poe__list_models",
        # MCP tools offered whole, not found through Claude Code's tool search first: the
        # fake model calls the tool it is told to.
        ENABLE_TOOL_SEARCH="false",
    )
    assert run.returncode == 0, run.stderr + run.stdout
    assert run.stdout.startswith("tool said: "), run.stdout
    for bot in ("claude-sonnet-4.5", "gpt-5", "gemini-2.5-pro"):
        assert bot in run.stdout, run.stdout

    calls = [r for r in upstream.requests() if r.path.split("?")[0] == "/v1/messages"]
    assert len(calls) == 2, [c.path for c in calls]
    # The tool was offered to the model under Claude Code's name for it, and its result
    # came back in the second call.
    assert "mcp__poe__list_models" in {t.get("name") for t in calls[0].body.get("tools", [])}
    results = [
        b
        for m in calls[1].body["messages"]
        if m["role"] == "user" and isinstance(m["content"], list)
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "tool_result"
    ]
    assert results and results[0]["tool_use_id"] == "toolu_fake_0001"
    assert own_usage(team_gateway, key)["totals"]["requests"] == 2
