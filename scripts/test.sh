#!/usr/bin/env bash
# The whole test suite: Rust unit and integration tests (a scriptable Poe-shaped upstream and
# the gateway on port 0, in-process), then end-to-end tests that drive the real binary with
# the official `openai` Python SDK (installed into .venv by scripts/setup-python.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo test --locked
# `cargo test` has built target/debug/poe-gateway; the end-to-end tests launch it.
cargo build --locked --bin poe-gateway
bash scripts/e2e.sh
