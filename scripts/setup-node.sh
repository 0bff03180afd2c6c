#!/usr/bin/env bash
# Install the pinned Claude Code CLI into the repo-local .node/ for the end-to-end tests that
# drive it (tests/e2e/test_claude_code.py). npm comes from Debian's packages when missing.
#
# Idempotent and quiet: once .node holds the pinned version, a re-run only checks it (no
# network access). The package is a native binary of about 400 MB, fetched once per clone
# (npm keeps the download in its cache).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.node"
# Pinned. Bump deliberately (`npm view @anthropic-ai/claude-code version`).
PIN="2.1.332"
CLAUDE="$DIR/node_modules/.bin/claude"

have() { [ -x "$CLAUDE" ] && "$CLAUDE" --version 2>/dev/null | grep -q "^$PIN "; }
have && exit 0

if ! command -v npm >/dev/null 2>&1; then
  apt-get install -y -qq nodejs npm >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq nodejs npm >/dev/null; }
fi
mkdir -p "$DIR"
npm install --prefix "$DIR" --save-exact --no-audit --no-fund --loglevel=error "@anthropic-ai/claude-code@$PIN" >/dev/null \
  || { echo "setup-node: npm could not install @anthropic-ai/claude-code@$PIN (no network or npm registry?)" >&2; exit 1; }
# The package's postinstall puts the platform's binary in place; an npm that holds install
# scripts back leaves that step to us.
if ! have; then
  (cd "$DIR/node_modules/@anthropic-ai/claude-code" && node install.cjs >/dev/null)
fi
have || { echo "setup-node: Claude Code $PIN did not install into $DIR" >&2; exit 1; }
