#!/usr/bin/env bash
# The whole test suite:
#  - Rust unit and integration tests: a scriptable Poe-shaped upstream and the gateway on
#    port 0, in-process. The ledger tests run against SQLite and against a throwaway
#    PostgreSQL server started here (installed from Debian's packages if missing).
#  - Replica tests: two gateway processes sharing that PostgreSQL and a Redis server that the
#    tests start and stop themselves (redis-server is installed here if missing).
#  - End-to-end tests that drive the real binary with the official `openai` Python SDK and the
#    `mcp` client (installed into .venv by scripts/setup-python.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

pgdir=$(mktemp -d /tmp/poe-gateway-pg.XXXXXX)
trap 'bash scripts/postgres.sh stop "$pgdir"; rm -rf "$pgdir"' EXIT
POE_GATEWAY_TEST_POSTGRES_URL=$(bash scripts/postgres.sh start "$pgdir")
export POE_GATEWAY_TEST_POSTGRES_URL
POE_GATEWAY_TEST_REDIS_SERVER=$(bash scripts/redis.sh)
export POE_GATEWAY_TEST_REDIS_SERVER

cargo test --locked
# `cargo test` has built target/debug/poe-gateway; the end-to-end tests launch it.
cargo build --locked --bin poe-gateway
bash scripts/e2e.sh
