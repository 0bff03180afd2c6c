#!/usr/bin/env bash
# Makes sure redis-server is installed (from Debian's packages) and prints its path.
# The replica tests (tests/replicas.rs) start and stop their own throwaway servers with it,
# each on a free loopback port with no persistence, so they can stop Redis mid-run.
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing Redis from Debian's packages..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq redis-server >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq redis-server >/dev/null; }
fi
command -v redis-server
