"""Gateway keys through the official openai SDK: budgets, RPM, model lists, revocation, and
the admin API's own auth. A second gateway runs in `auth.mode = "keys"` with an admin key."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import urllib.error
import urllib.request

import openai
import pytest

from conftest import REPO_ROOT, launch_gateway

ADMIN_KEY = "e2e-admin-key-5f1c9a"

# gpt-5 priced so that one call (9 prompt + 3 completion tokens) costs $0.012.
KEYS_POLICIES = """\
[auth]
mode = "keys"

[aliases]
claude = "claude-sonnet-4.5"

[pricing."gpt-5"]
prompt = 0.001
completion = 0.001

[pricing."gated-bot"]
prompt = 0.001
completion = 0.001
"""


@pytest.fixture(scope="module")
def keys_gateway(upstream, tmp_path_factory):
    with launch_gateway(
        upstream,
        tmp_path_factory.mktemp("keys-gateway"),
        KEYS_POLICIES,
        {"POE_GATEWAY_ADMIN_KEY": ADMIN_KEY},
    ) as gw:
        yield gw


def admin(gw, method: str, path: str, body: dict | None = None, key: str = ADMIN_KEY):
    req = urllib.request.Request(
        f"{gw.base_url}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def new_key(gw, **fields) -> str:
    status, body = admin(gw, "POST", "/admin/keys", fields)
    assert status == 201, body
    assert body["key"].startswith("pgw_")
    return body["key"]


def sdk(gw, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=20.0)


def ask(client: openai.OpenAI, model: str = "gpt-5"):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def test_budget_is_enforced_as_rate_limit_error(keys_gateway):
    client = sdk(keys_gateway, new_key(keys_gateway, name="budget", budget_usd=0.02, period="day"))
    # Checked before, charged after: 0 < 0.02, then 0.012 < 0.02, then 0.024 >= 0.02.
    ask(client)
    # The charge lands when the ledger writes the row; usage reads flush it first.
    status, usage = admin(keys_gateway, "GET", "/admin/usage")
    assert status == 200
    ask(client)
    admin(keys_gateway, "GET", "/admin/usage")
    with pytest.raises(openai.RateLimitError) as e:
        ask(client)
    assert e.value.code == "insufficient_quota"
    assert e.value.body["type"] == "insufficient_quota"
    assert e.value.response.headers["x-should-retry"] == "false"

    # The SDK's own retries (two by default) honour `x-should-retry`: a spent budget is asked
    # for once, not three times.
    sent = []
    retrying = openai.OpenAI(
        base_url=f"{keys_gateway.base_url}/v1",
        api_key=client.api_key,
        timeout=20.0,
        http_client=openai.DefaultHttpxClient(event_hooks={"request": [sent.append]}),
    )
    assert retrying.max_retries == 2
    with pytest.raises(openai.RateLimitError):
        ask(retrying)
    assert len(sent) == 1, sent


def test_parallel_requests_cannot_all_pass_one_budget(keys_gateway, upstream):
    """Requests in flight hold their estimated cost against the key's budget: here $0.025 each
    (25 tokens: 13 estimated from the request's text, 12 of `max_tokens`). Of five sent at
    once on a $0.03 key, two pass (nothing held, then $0.025 held); the other three get a
    rate-limit error to retry and never reach Poe. Once the two are charged ($0.012 each),
    one more fits, and then the budget is spent."""
    client = sdk(keys_gateway, new_key(keys_gateway, name="parallel", budget_usd=0.03, period="day"))
    results: queue.Queue = queue.Queue()
    start = threading.Barrier(5)

    def ask_gated() -> None:
        client.chat.completions.create(
            model="gated-bot", max_tokens=12, messages=[{"role": "user", "content": "hi"}]
        )

    def one() -> None:
        start.wait(10)
        try:
            ask_gated()
            results.put("ok")
        except openai.RateLimitError as e:
            results.put((e.code, e.response.headers.get("retry-after"), e.message))

    threads = [threading.Thread(target=one) for _ in range(5)]
    for t in threads:
        t.start()
    try:
        # The two admitted wait at Poe (the gate) while the other three are answered.
        refused = [results.get(timeout=20) for _ in range(3)]
        for code, retry_after, message in refused:
            assert code == "rate_limit_exceeded", message
            assert retry_after == "1"
            assert "held by its 2 requests in flight" in message, message
        assert len([r for r in upstream.requests() if r.body.get("model") == "gated-bot"]) == 2
    finally:
        upstream.gate.set()
        for t in threads:
            t.join(20)
    assert [results.get_nowait() for _ in range(2)] == ["ok", "ok"]

    ask_gated()
    with pytest.raises(openai.RateLimitError) as e:
        ask_gated()
    assert e.value.code == "insufficient_quota"


def test_rpm_limit_is_a_rate_limit_error_with_retry_after(keys_gateway):
    client = sdk(keys_gateway, new_key(keys_gateway, name="rpm", rpm=2))
    ask(client)
    ask(client)
    with pytest.raises(openai.RateLimitError) as e:
        ask(client)
    assert e.value.code == "rate_limit_exceeded"
    assert int(e.value.response.headers["retry-after"]) >= 1


def test_model_list_and_revocation(keys_gateway):
    key = new_key(keys_gateway, name="claude-only", models=["claude"])
    client = sdk(keys_gateway, key)
    assert ask(client, "claude").model == "claude-sonnet-4.5"
    with pytest.raises(openai.PermissionDeniedError):
        ask(client, "gpt-5")

    status, _ = admin(keys_gateway, "DELETE", "/admin/keys/claude-only")
    assert status == 200
    with pytest.raises(openai.AuthenticationError) as e:
        ask(client, "claude")
    assert "revoked" in str(e.value)
    with pytest.raises(openai.AuthenticationError):
        ask(sdk(keys_gateway, "pgw_" + "0" * 64))


def test_own_usage_and_admin_auth(keys_gateway):
    key = new_key(keys_gateway, name="reporter")
    ask(sdk(keys_gateway, key))
    req = urllib.request.Request(f"{keys_gateway.base_url}/v1/usage?group_by=model", headers={"authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        report = json.loads(resp.read())
    assert report["totals"]["requests"] == 1
    assert report["groups"][0]["group"] == "gpt-5"
    assert abs(report["totals"]["cost_usd"] - 0.012) < 1e-9

    # The admin API refuses a gateway key, a wrong key, and no key.
    assert admin(keys_gateway, "GET", "/admin/keys", key=key)[0] == 401
    assert admin(keys_gateway, "GET", "/admin/keys", key="wrong")[0] == 401
    status, listing = admin(keys_gateway, "GET", "/admin/keys")
    assert status == 200
    assert all("key" not in k and "hash" not in k for k in listing["data"])


def test_cli_creates_a_key_that_works(keys_gateway, tmp_path):
    """`poe-gateway keys create` prints the key alone on stdout's last line."""
    import os

    bin_path = os.environ.get("POE_GATEWAY_BIN") or str(REPO_ROOT / "target" / "debug" / "poe-gateway")
    db = keys_gateway.log_path.parent / "ledger.db"
    out = subprocess.run(
        [bin_path, "keys", "create", "--name", "cli", "--rpm", "10"],
        env={"PATH": os.environ.get("PATH", ""), "POE_GATEWAY_DATABASE_URL": f"sqlite://{db}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    key = out.stdout.strip().splitlines()[-1]
    assert key.startswith("pgw_") and " " not in key
    assert ask(sdk(keys_gateway, key)).choices[0].message.content
