#!/usr/bin/env bash
# End-to-end tests: drive the real poe-gateway binary with the official
# `openai` and `anthropic` Python SDKs, the MCP client and the Claude Code CLI against a fake
# Poe upstream (tests/e2e).
#
#   POE_GATEWAY_BIN  gateway binary (default: target/debug/poe-gateway)
#   extra arguments are passed on to pytest, e.g. scripts/e2e.sh -k stream -v
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/setup-python.sh"
bash "$ROOT/scripts/setup-node.sh"

bin="${POE_GATEWAY_BIN:-target/debug/poe-gateway}"
case "$bin" in
  /*) ;;
  *) bin="$ROOT/$bin" ;;
esac
export POE_GATEWAY_BIN="$bin"
export PYTHONDONTWRITEBYTECODE=1

set +e
"$ROOT/.venv/bin/pytest" tests/e2e -q -p no:cacheprovider "$@"
rc=$?
set -e

# Property-based checks of GET /openapi.json against the same binary (scripts/schemathesis.sh);
# POE_GATEWAY_E2E_SCHEMATHESIS=0 skips them.
st_rc=0
if [ "${POE_GATEWAY_E2E_SCHEMATHESIS:-1}" != "0" ]; then
  bash "$ROOT/scripts/schemathesis.sh" || st_rc=$?
fi
if [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
exit "$st_rc"
