#!/usr/bin/env bash
# Property-based API checks: schemathesis reads the gateway's own GET /openapi.json and
# throws generated requests at every operation, checking that no answer is a server error and
# that every answer matches the document (status, content type, headers, body schema).
#
# The real binary runs on a free port with auth.mode = keys and an admin key, against a
# stubbed Poe (tests/e2e/stub_poe.py). Two passes, each bounded by examples and time:
#   1. the client routes (/v1/chat/completions, /v1/responses, /v1/messages, /v1/usage, /mcp) with a gateway key;
#   2. everything else (admin API, metrics, models, health, this document) with the admin key.
#
#   POE_GATEWAY_BIN      gateway binary (default: target/debug/poe-gateway)
#   ST_MAX_EXAMPLES      examples per operation and phase (default 30)
#   ST_MAX_TIME          hard bound on each pass, in seconds (default 300)
#   extra arguments are passed on to `st run`, e.g. scripts/schemathesis.sh --seed 1
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/setup-python.sh"
PY="$ROOT/.venv/bin/python"
ST="$ROOT/.venv/bin/st"

bin="${POE_GATEWAY_BIN:-target/debug/poe-gateway}"
case "$bin" in
  /*) ;;
  *) bin="$ROOT/$bin" ;;
esac
if [ ! -x "$bin" ]; then
  echo "schemathesis: gateway binary not found: $bin (cargo build, or set POE_GATEWAY_BIN)" >&2
  exit 1
fi

MAX_EXAMPLES="${ST_MAX_EXAMPLES:-30}"
MAX_TIME="${ST_MAX_TIME:-300}"
ADMIN_KEY="st-admin-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
UPSTREAM_KEY="st-upstream-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"

tmp="$(mktemp -d /tmp/poe-gateway-st.XXXXXX)"
stub_pid=""
gw_pid=""
cleanup() {
  local rc=$?
  # Only the two processes started here, by their ids.
  set +e
  for pid in $gw_pid $stub_pid; do
    kill -TERM "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$rc" -ne 0 ]; then
    echo "--- gateway log (last 60 lines) ---" >&2
    tail -n 60 "$tmp/gateway.log" >&2 2>/dev/null || true
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT

# Waits up to 30 s for the first line of $1 to match $2; prints the first capture group.
first_line() {
  local file=$1 pattern=$2 line
  for _ in $(seq 300); do
    line="$(head -n 1 "$file" 2>/dev/null || true)"
    if [[ "$line" =~ $pattern ]]; then
      echo "${BASH_REMATCH[1]}"
      return 0
    fi
    sleep 0.1
  done
  echo "schemathesis: no '$pattern' line in $file: $(cat "$file" 2>/dev/null)" >&2
  return 1
}

export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"

"$PY" "$ROOT/tests/e2e/stub_poe.py" >"$tmp/stub.out" 2>"$tmp/stub.log" &
stub_pid=$!
stub_port="$(first_line "$tmp/stub.out" '^port ([0-9]+)$')"

cat >"$tmp/policies.toml" <<'EOF'
[server]
metrics_require_admin = true
# Hostile bodies are the point; a small limit keeps the generated ones cheap.
max_body_bytes = "1MiB"

[auth]
mode = "keys"

[limits]
# Hundreds of requests a minute go to the stub; the Poe rate limit is not under test.
upstream_rpm = 100000

[retry]
base_backoff = "10ms"

[aliases]
claude = "claude-sonnet-4.5"
resilient = ["claude-sonnet-4.5", "gpt-5"]
EOF

(
  # Never pass real settings or keys on to the gateway under test.
  for v in $(env | sed -n 's/^\(POE_[A-Za-z0-9_]*\)=.*/\1/p'); do unset "$v"; done
  export POE_GATEWAY_LISTEN=127.0.0.1:0 \
    POE_BASE_URL="http://127.0.0.1:$stub_port" \
    POE_API_KEY="$UPSTREAM_KEY" \
    POE_GATEWAY_ADMIN_KEY="$ADMIN_KEY" \
    POE_GATEWAY_POLICIES="$tmp/policies.toml" \
    POE_GATEWAY_DATABASE_URL="sqlite://$tmp/ledger.db" \
    RUST_LOG=warn
  exec "$bin" serve
) >"$tmp/gateway.out" 2>"$tmp/gateway.log" &
gw_pid=$!
port="$(first_line "$tmp/gateway.out" '^poe-gateway listening on http://127\.0\.0\.1:([0-9]+)$')"
base="http://127.0.0.1:$port"

# A gateway key for the client routes.
CLIENT_KEY="$("$PY" - "$base" "$ADMIN_KEY" <<'PYEOF'
import json, sys, urllib.request
base, admin = sys.argv[1], sys.argv[2]
req = urllib.request.Request(
    base + "/admin/keys",
    data=json.dumps({"name": "schemathesis-client"}).encode(),
    headers={"Authorization": "Bearer " + admin, "Content-Type": "application/json"},
    method="POST",
)
with urllib.request.urlopen(req, timeout=30) as resp:
    print(json.load(resp)["key"])
PYEOF
)"

checks="not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance,negative_data_rejection,unsupported_method,ignored_auth"
common=(
  "$base/openapi.json"
  --checks "$checks"
  --max-examples "$MAX_EXAMPLES"
  --phases examples,coverage,fuzzing,stateful
  --request-timeout 30
  # One worker: with two, hypothesis's lambda descriptions call ast.parse from two threads, and
  # CPython 3.11 (before 3.11.9) keeps the AST converter's recursion depth in shared state, so a
  # run now and then dies with "SystemError: AST constructor recursion depth mismatch". A pass
  # takes seconds either way.
  --workers 1
  --generation-database none
  --no-color
)

# Run from the temporary directory: schemathesis writes nothing into the repo.
cd "$tmp"
passed=0
failed=0
# (--max-time would make fuzzing repeat until the budget is spent: `timeout` bounds instead.)
run_pass() {
  local what=$1 regex=$2 key=$3
  shift 3
  echo "schemathesis: $what against $base"
  if timeout "$MAX_TIME" "$ST" run "${common[@]}" --include-path-regex "$regex" \
    -H "Authorization: Bearer $key" "$@"; then
    passed=$((passed + 1))
  else
    echo "schemathesis: $what FAILED (exit $?)" >&2
    failed=$((failed + 1))
  fi
}
run_pass "client routes (gateway key)" '^/(v1/chat/completions|v1/responses|v1/messages|v1/messages/count_tokens|v1/usage|mcp)$' "$CLIENT_KEY" "$@"
run_pass "admin and operations routes (admin key)" \
  '^/(admin/|metrics$|healthz$|readyz$|openapi\.json$|v1/models)' "$ADMIN_KEY" "$@"

echo "schemathesis: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
