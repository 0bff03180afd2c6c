#!/usr/bin/env bash
# Create the repo-local Python virtualenv (.venv) used by the end-to-end tests
# (tests/e2e) and install the pinned test dependencies into it.
#
# Idempotent and quiet: once .venv holds the pinned versions, a re-run only
# checks them (no network access). Override the interpreter with PYTHON=...
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

# Pinned versions. Bump deliberately (see `pip index versions openai`).
# mcp: the official MCP client, for the MCP end-to-end tests (tests/e2e/test_mcp.py).
PINS=(
  "openai==3.54.0"
  # The Anthropic SDK, for the Messages API tests (tests/e2e/test_anthropic_sdk.py).
  "anthropic==2.17.0"
  "mcp==2.3.0"
  "pytest==9.2.0"
  "PyYAML==6.0.3"
  # Offline schema checks of deploy/ (tests/e2e/test_deploy.py): Kubernetes manifests
  # (bundled API schemas) and compose files (the vendored compose-spec schema).
  "kubernetes-validate==1.37.0"
  "check-jsonschema==0.39.0"
  # Property-based checks of GET /openapi.json against the running gateway
  # (scripts/schemathesis.sh).
  "schemathesis==4.32.5"
)

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup-python: '$PY' not found; install python3 (>= 3.9)" >&2
  exit 1
fi

# (Re)create the venv when missing or broken (e.g. the base interpreter moved).
if ! "$VENV/bin/python" -c '' >/dev/null 2>&1; then
  rm -rf "$VENV"
  if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
    # Debian without python3-venv has no ensurepip: make a pip-less venv and
    # install into it with the base interpreter's pip (pip >= 22.3 --python).
    rm -rf "$VENV"
    "$PY" -m venv --without-pip "$VENV"
  fi
fi

# Which pins are not installed at exactly the pinned version?
missing="$("$VENV/bin/python" - "${PINS[@]}" <<'PYEOF'
import sys
from importlib import metadata

out = []
for spec in sys.argv[1:]:
    name, want = spec.split("==", 1)
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        have = None
    if have != want:
        out.append(spec)
print(" ".join(out))
PYEOF
)"

if [ -n "$missing" ]; then
  # shellcheck disable=SC2086 # word-splitting of the spec list is intended
  if "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install --quiet $missing
  else
    "$PY" -m pip --python "$VENV/bin/python" install --quiet $missing
  fi
fi
