#!/usr/bin/env bash
# poe-gateway load comparison and memory benchmarks (issue 8). Results: benches/README.md.
#
#   bash benches/run.sh              # load comparison (direct / nginx / gateway, JSON and SSE) + memory
#   bash benches/run.sh compare      # only the load comparison
#   bash benches/run.sh memory       # only idle RSS and 10,000 held streams
#   bash benches/run.sh soak [DUR]   # soak at moderate load, RSS sampled; DUR like 600, 120s or 2m (default 10m)
#   bash benches/run.sh profile      # callgrind instruction counts of the gateway's request path
#   bash benches/run.sh perf         # perf (cpu-clock samples, kernel included) at 32 connections
#   bash benches/run.sh syscalls     # system calls per request (strace -c), gateway and nginx proxy
#   bash benches/run.sh cpu          # CPU time per request (user and kernel) of nginx, the floor and the gateway
#   bash benches/run.sh train        # the training load of scripts/pgo-build.sh (measures nothing)
#
# Knobs (env): ROUNDS (3), DURATION seconds per run (4), WARMUP (1), CONNS (32),
#   HOLD_STREAMS (10000), SOAK_RATE req/s per target (300), SOAK_CONNS (8), KEEP_TMP=1,
#   GATEWAY_ENV="VAR=value ..." extra environment for every gateway started (experiments, e.g.
#   TOKIO_WORKER_THREADS=1 or LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2),
#   BASELINE_REV=<git rev> or BASELINE_BIN=<path>: also measure an older gateway ("gateway-base", compare and cpu),
#   e.g. the last commit before accounting, to price a feature; BASELINE_PATCH=<file> patches
#   BASELINE_REV first (BASELINE_REV=HEAD BASELINE_PATCH=benches/no-ledger.patch prices the ledger);
#   ONLY="KIND:LABEL ..." (compare) measures only those targets, e.g. ONLY="json:nginx json:gateway";
#   SOAK_CACHEABLE=1 (soak) sends unique cacheable requests: every answer is a stored cache miss;
#   CACHEABLE=0 (compare, perf, profile, cpu) sends plain requests the cache skips (BYPASS) instead of unique misses.
#   NEW_CONN=1 (compare): every request opens a connection of its own and closes it after the
#   response, as curl in a loop does (latency includes the connect).
# Every server binds 127.0.0.1 only; every load loop is bounded in time and count.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=${1:-all}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-4}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-32}
HOLD_STREAMS=${HOLD_STREAMS:-10000}
SOAK_RATE=${SOAK_RATE:-300}
SOAK_CONNS=${SOAK_CONNS:-8}
GATEWAY_ENV=${GATEWAY_ENV:-}

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

case "$MODE" in
  all|compare|memory|soak|profile|perf|syscalls|cpu|serial-perf|train) ;;
  *) die "unknown mode '$MODE' (all, compare, memory, soak [DUR], profile, perf, syscalls, cpu, serial-perf, train)" ;;
esac

duration_secs() { # 600 | 120s | 2m | 1h
  local d=$1
  case "$d" in
    *h) echo $(( ${d%h} * 3600 )) ;;
    *m) echo $(( ${d%m} * 60 )) ;;
    *s) echo "${d%s}" ;;
    *) echo "$d" ;;
  esac
}
SOAK_SECS=$(duration_secs "${2:-${SOAK_SECS:-600}}")

# --- tools --------------------------------------------------------------------------------------
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1 \
    || { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends "$@" >/dev/null; }
}
NGINX=$(command -v nginx || true)
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
if [ -z "$NGINX" ]; then
  log "installing nginx from Debian"
  apt_install nginx-light || apt_install nginx || die "cannot install nginx"
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
fi
command -v curl >/dev/null || apt_install curl
if [ "$MODE" = profile ] && ! command -v valgrind >/dev/null; then apt_install valgrind; fi
if { [ "$MODE" = perf ] || [ "$MODE" = serial-perf ]; } && ! command -v perf >/dev/null; then apt_install linux-perf; fi
if [ "$MODE" = syscalls ] && ! command -v strace >/dev/null; then apt_install strace; fi

# 10,000 held streams need about 10,000 descriptors in the load tool and in the slow upstream,
# and two per stream in the gateway.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# GATEWAY_BIN=<path> measures that gateway binary instead, and then it is not built here (its
# fat-LTO link is minutes on two cores).
GW_TARGET=(--bin poe-gateway)
[ -z "${GATEWAY_BIN:-}" ] || GW_TARGET=()
log "building (release): ${GW_TARGET:+poe-gateway, }benches/load.rs and benches/floor.rs"
BUILD_OUT=$(cargo build --release "${GW_TARGET[@]}" --bench load --bench floor --message-format=json-render-diagnostics) \
  || die "cargo build failed"
GW_BIN=$(grep -o '"executable":"[^"]*/poe-gateway"' <<<"$BUILD_OUT" | tail -1 | cut -d'"' -f4)
LOAD_BIN=$(grep -o '"executable":"[^"]*/load-[0-9a-f]*"' <<<"$BUILD_OUT" | tail -1 | cut -d'"' -f4)
FLOOR_BIN=$(grep -o '"executable":"[^"]*/floor-[0-9a-f]*"' <<<"$BUILD_OUT" | tail -1 | cut -d'"' -f4)
GW_BIN=${GATEWAY_BIN:-$GW_BIN}
[ -x "$GW_BIN" ] && [ -x "$LOAD_BIN" ] && [ -x "$FLOOR_BIN" ] || die "build artifacts not found"

TMP=$(mktemp -d /tmp/poe-gateway-bench.XXXXXX)
chmod 755 "$TMP"
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "${KEEP_TMP:-0}" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# An older gateway to compare with in the same run (e.g. the last commit before accounting):
# BASELINE_REV=<git revision> builds it from git; BASELINE_BIN=<path> uses a binary as is.
BASE_BIN=${BASELINE_BIN:-}
if [ -z "$BASE_BIN" ] && [ -n "${BASELINE_REV:-}" ]; then
  log "building the baseline gateway at $BASELINE_REV (target/bench-baseline)"
  mkdir -p "$TMP/baseline-src"
  git -C "$ROOT" archive "$BASELINE_REV" | tar -x -C "$TMP/baseline-src" || die "git archive $BASELINE_REV failed"
  # BASELINE_PATCH=file: the baseline is that revision with this patch applied, e.g.
  # benches/no-ledger.patch (rows dropped instead of written) to price accounting.
  if [ -n "${BASELINE_PATCH:-}" ]; then
    patch -s -p1 -d "$TMP/baseline-src" <"$BASELINE_PATCH" || die "cannot apply $BASELINE_PATCH to $BASELINE_REV"
    log "baseline patched with $BASELINE_PATCH"
  fi
  BASE_OUT=$(cd "$TMP/baseline-src" && CARGO_TARGET_DIR="$ROOT/target/bench-baseline" \
    cargo build --release --bin poe-gateway --message-format=json-render-diagnostics) || die "baseline build failed"
  BASE_BIN=$(grep -o '"executable":"[^"]*/poe-gateway"' <<<"$BASE_OUT" | tail -1 | cut -d'"' -f4)
fi
[ -z "$BASE_BIN" ] || [ -x "$BASE_BIN" ] || die "baseline binary $BASE_BIN not found"

# --- machine ------------------------------------------------------------------------------------
log "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
log "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' (+ uncommitted changes)'); $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'); open files $(ulimit -n)"
[ -n "$GATEWAY_ENV" ] && log "gateway environment: $GATEWAY_ENV"

read -r P_UP_JSON P_UP_SSE P_PX_JSON P_PX_SSE P_PX_DRIP <<<"$("$LOAD_BIN" ports 5)"

# --- bodies ---------------------------------------------------------------------------------------
# Comparison bodies are cacheable (temperature 0) and unique (the load tool replaces __N__ per
# request), so a response cache in its default mode looks every request up and misses.
MSG='"messages":[{"role":"user","content":"Say hello in one short sentence. (request __N__)"}]'
printf '{"model":"gpt-5",%s,"temperature":0}' "$MSG" >"$TMP/req-json.json"
printf '{"model":"gpt-5",%s,"temperature":0,"stream":true}' "$MSG" >"$TMP/req-sse.json"
# Soak bodies are not cacheable, so a filling cache is not mistaken for a leak.
PLAIN='"messages":[{"role":"user","content":"Say hello in one short sentence."}]'
printf '{"model":"gpt-5",%s}' "$PLAIN" >"$TMP/soak-json.json"
printf '{"model":"gpt-5",%s,"stream":true}' "$PLAIN" >"$TMP/soak-sse.json"
printf '{"model":"drip",%s,"stream":true}' "$PLAIN" >"$TMP/req-drip.json"
printf '{"model":"hold",%s,"stream":true}' "$PLAIN" >"$TMP/req-hold.json"

# The fast upstream's answers, Poe-shaped. nginx strings take \n escapes.
ID='"id":"chatcmpl-bench0001","created":1767225600,"model":"gpt-5"'
JSON_REPLY="{$ID,\"object\":\"chat.completion\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"Hello! This is a fixed answer from the benchmark upstream.\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":14,\"completion_tokens\":12,\"total_tokens\":26}}"
chunk() { printf 'data: {%s,"object":"chat.completion.chunk","choices":[{"index":0,"delta":%s,"finish_reason":%s}]}\\n\\n' "$ID" "$1" "$2"; }
SSE_REPLY=$(
  chunk '{"role":"assistant","content":""}' null
  for w in 'Hello!' ' This' ' is' ' a' ' fixed' ' answer' ' from' ' the benchmark upstream.'; do
    chunk "{\"content\":\"$w\"}" null
  done
  chunk '{}' '"stop"'
  printf 'data: {%s,"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":14,"completion_tokens":12,"total_tokens":26}}\\n\\n' "$ID"
  printf 'data: [DONE]\\n\\n'
)
# Poe's model catalogue, trimmed: the gateway prices what it accounts from it.
# A catalogue the size of Poe's (a few hundred bots), with the benchmark's bot in the middle:
# per-request look-ups that scan it cost here what they cost against Poe (a one-entry
# catalogue once hid such a scan). Served from a file; nginx's `return` takes only short text.
CATALOGUE_FILE=$TMP/models.json
{
  printf '{"object":"list","data":['
  for i in $(seq 1 300); do
    [ "$i" = 1 ] || printf ','
    if [ "$i" = 150 ]; then
      printf '{"id":"gpt-5","object":"model","created":1767225600,"owned_by":"openai","pricing":{"prompt":"0.00000125","completion":"0.00001","request":"0"}}'
    else
      printf '{"id":"bench-bot-%03d","object":"model","created":1767225600,"owned_by":"bench","architecture":{"input_modalities":["text"],"output_modalities":["text"]},"pricing":{"prompt":"0.000001","completion":"0.000002","request":"0"}}' "$i"
    fi
  done
  printf ']}'
} >"$CATALOGUE_FILE"
chmod 644 "$CATALOGUE_FILE"
nginx_escape() { sed "s/'/\\\\'/g" <<<"$1"; }

# --- servers ------------------------------------------------------------------------------------
nginx_common() { # $1 prefix dir
  cat <<EOF
worker_processes 2;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 16384; multi_accept on; }
http {
  access_log off;
  client_body_temp_path $1/client_body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server_tokens off;
EOF
}

start_nginx() { # $1 name; the config is $TMP/$1/nginx.conf. Runs in the foreground (daemon off)
  local dir=$TMP/$1
  "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" || die "nginx config $1 is invalid"
  "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" </dev/null >"$dir/stdout.log" 2>&1 &
  PIDS+=($!)
}

wait_port() { # $1 port
  local i
  for i in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  die "nothing listens on 127.0.0.1:$1"
}

start_upstream_nginx() {
  mkdir -p "$TMP/nginx-upstream"
  chmod 755 "$TMP/nginx-upstream"
  {
    nginx_common "$TMP/nginx-upstream"
    cat <<EOF
  server {
    listen 127.0.0.1:$P_UP_JSON backlog=4096;
    location = /v1/chat/completions { default_type application/json; return 200 '$(nginx_escape "$JSON_REPLY")'; }
    location = /v1/models { default_type application/json; alias $CATALOGUE_FILE; }
    location / { return 404; }
  }
  server {
    listen 127.0.0.1:$P_UP_SSE backlog=4096;
    location = /v1/chat/completions {
      default_type text/event-stream;
      add_header Cache-Control no-cache;
      return 200 '$(nginx_escape "$SSE_REPLY")';
    }
    location = /v1/models { default_type application/json; alias $CATALOGUE_FILE; }
    location / { return 404; }
  }
}
EOF
  } >"$TMP/nginx-upstream/nginx.conf"
  start_nginx nginx-upstream
  UPSTREAM_NGINX_PID=$!
  wait_port "$P_UP_JSON"
  wait_port "$P_UP_SSE"
}

start_proxy_nginx() { # $1 slow upstream port
  mkdir -p "$TMP/nginx-proxy"
  chmod 755 "$TMP/nginx-proxy"
  {
    nginx_common "$TMP/nginx-proxy"
    local name port
    for name in json sse drip; do
      case $name in json) port=$P_UP_JSON ;; sse) port=$P_UP_SSE ;; drip) port=$1 ;; esac
      cat <<EOF
  upstream up_$name { server 127.0.0.1:$port; keepalive 64; keepalive_requests 100000000; keepalive_timeout 300s; }
EOF
    done
    for name in json sse drip; do
      case $name in json) port=$P_PX_JSON ;; sse) port=$P_PX_SSE ;; drip) port=$P_PX_DRIP ;; esac
      cat <<EOF
  server {
    listen 127.0.0.1:$port backlog=4096 reuseport;
    location / {
      proxy_pass http://up_$name;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
  }
EOF
    done
    echo "}"
  } >"$TMP/nginx-proxy/nginx.conf"
  start_nginx nginx-proxy
  NGINX_PROXY_PID=$!
  wait_port "$P_PX_JSON"
  wait_port "$P_PX_SSE"
  wait_port "$P_PX_DRIP"
}

SLOW_URL=
SLOW_TLS_URL=
start_slow_upstream() { # $1 name, then extra arguments; prints the URL
  "$LOAD_BIN" slow-upstream --listen 127.0.0.1:0 --hold-secs 240 --max-secs 7200 "${@:2}" </dev/null >"$TMP/$1.out" 2>"$TMP/$1.err" &
  PIDS+=($!)
  local i url
  for i in $(seq 1 100); do
    url=$(sed -n 's/^slow-upstream listening on //p' "$TMP/$1.out" 2>/dev/null || true)
    [ -n "$url" ] && { echo "$url"; return 0; }
    sleep 0.05
  done
  die "slow upstream $1 did not start: $(cat "$TMP/$1.err")"
}

declare -A GW_PID GW_URL
start_gateway() { # $1 name, $2 upstream base URL, $3 RUST_LOG, then extra VAR=value
  local name=$1 base=$2 level=$3 bin=$GW_BIN dir=$ROOT
  shift 3
  # The baseline runs where there is no policies/default.toml, so it uses its own built-in one.
  if [ "${name%-base}" != "$name" ]; then bin=$BASE_BIN dir=$TMP/base-cwd; mkdir -p "$dir"; fi
  # Each gateway keeps its own ledger in the temp dir (never ./data in the repo).
  (cd "$dir" && exec env POE_API_KEY=bench-not-a-key POE_BASE_URL="$base" POE_GATEWAY_LISTEN=127.0.0.1:0 \
    POE_GATEWAY_DATABASE_URL="sqlite://$TMP/$name.db" \
    POE_GATEWAY_LIMITS__UPSTREAM_RPM=100000000 RUST_LOG="$level" $GATEWAY_ENV "$@" \
    "$bin" serve) </dev/null >"$TMP/$name.out" 2>"$TMP/$name.err" &
  local pid=$!
  PIDS+=("$pid")
  local i url=
  for i in $(seq 1 200); do
    url=$(sed -n 's/^poe-gateway listening on //p' "$TMP/$name.out" 2>/dev/null || true)
    [ -n "$url" ] && break
    kill -0 "$pid" 2>/dev/null || die "gateway $name exited: $(cat "$TMP/$name.err")"
    sleep 0.05
  done
  [ -n "$url" ] || die "gateway $name did not start"
  GW_PID[$name]=$pid
  GW_URL[$name]=$url
}

# The floor (benches/floor.rs): a proxy of bare hyper, laid out like the gateway, in front of
# one upstream port. Sets FLOOR_URL[$1].
declare -A FLOOR_URL FLOOR_PID
start_floor() { # $1 name, $2 upstream port
  "$FLOOR_BIN" --listen 127.0.0.1:0 --upstream "127.0.0.1:$2" </dev/null >"$TMP/$1.out" 2>"$TMP/$1.err" &
  PIDS+=($!)
  FLOOR_PID[$1]=$!
  local i url=
  for i in $(seq 1 100); do
    url=$(sed -n 's/^floor listening on //p' "$TMP/$1.out" 2>/dev/null || true)
    [ -n "$url" ] && break
    sleep 0.05
  done
  [ -n "$url" ] || die "floor proxy $1 did not start: $(cat "$TMP/$1.err")"
  FLOOR_URL[$1]=$url
}

# A gateway key for a team's gateway (auth.mode = keys) in the SQLite ledger $1: a budget and
# an rpm limit, both far above what a run spends, so their checks run and never refuse. Prints
# the key.
bench_key() {
  local key
  key=$(cd "$ROOT" && POE_GATEWAY_DATABASE_URL="sqlite://$1" \
    "$GW_BIN" keys create --name bench --budget-usd 1000000 --period month --rpm 1000000 | tail -1)
  [[ $key == pgw_* ]] || die "keys create printed no key"
  echo "$key"
}

stop_gateway() { kill "${GW_PID[$1]}" 2>/dev/null || true; wait "${GW_PID[$1]}" 2>/dev/null || true; }

# Every live process this script started, and their children (nginx workers), comma-separated.
server_pids() {
  local p out=()
  for p in "${PIDS[@]}"; do
    kill -0 "$p" 2>/dev/null || continue
    out+=("$p")
    out+=($(pgrep -P "$p" || true))
  done
  local IFS=,
  echo "${out[*]}"
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

CHAT=/v1/chat/completions

# --- modes --------------------------------------------------------------------------------------
run_compare() {
  log "load comparison: $ROUNDS rounds x (${WARMUP}s warm-up + ${DURATION}s) per run: 1 connection pinned to CPU 0, 1 connection unpinned, $CONNS connections"
  start_gateway gw-json "http://127.0.0.1:$P_UP_JSON" warn
  start_gateway gw-sse "http://127.0.0.1:$P_UP_SSE" warn
  start_gateway gw-json-info "http://127.0.0.1:$P_UP_JSON" info
  start_gateway gw-sse-info "http://127.0.0.1:$P_UP_SSE" info
  start_gateway gw-drip "$SLOW_URL" warn
  start_floor floor-json "$P_UP_JSON"
  start_floor floor-sse "$P_UP_SSE"
  local base_targets=()
  if [ -n "$BASE_BIN" ]; then
    start_gateway gw-json-base "http://127.0.0.1:$P_UP_JSON" warn
    start_gateway gw-sse-base "http://127.0.0.1:$P_UP_SSE" warn
    base_targets=("json:gateway-base=${GW_URL[gw-json-base]}$CHAT" "sse:gateway-base=${GW_URL[gw-sse-base]}$CHAT")
    log "baseline gateway: $BASE_BIN ${BASELINE_REV:+($BASELINE_REV)}"
  fi
  # A team's gateway (auth.mode = keys): every request carries a gateway key, which has a
  # budget and a rate limit, so the key's look-up and both checks are on the path. One key,
  # made with the CLI, in both ledgers (the file is copied: keys are random).
  local keys_targets=() keys_args=()
  if [ -z "${ONLY:-}" ] || [[ " $ONLY " == *":gateway-keys "* ]]; then
    local key
    key=$(bench_key "$TMP/gw-json-keys.db")
    cp "$TMP/gw-json-keys.db" "$TMP/gw-sse-keys.db"
    start_gateway gw-json-keys "http://127.0.0.1:$P_UP_JSON" warn POE_GATEWAY_AUTH__MODE=keys
    start_gateway gw-sse-keys "http://127.0.0.1:$P_UP_SSE" warn POE_GATEWAY_AUTH__MODE=keys
    keys_targets=("json:gateway-keys=${GW_URL[gw-json-keys]}$CHAT" "sse:gateway-keys=${GW_URL[gw-sse-keys]}$CHAT")
    keys_args=(--bearer "$key")
  fi
  # Other work on the machine skews every number: say how busy it was.
  log "load average before the comparison: $(cut -d' ' -f1-3 /proc/loadavg)"
  # Fresh gateways, before any request.
  log "idle RSS of a fresh gateway: $(rss_kb "${GW_PID[gw-json]}") kB"
  local all=(
    "json:direct=http://127.0.0.1:$P_UP_JSON$CHAT"
    "json:nginx=http://127.0.0.1:$P_PX_JSON$CHAT"
    "json:gateway=${GW_URL[gw-json]}$CHAT"
    "json:gateway-info=${GW_URL[gw-json-info]}$CHAT"
    "json:hyper=${FLOOR_URL[floor-json]}$CHAT"
    "sse:direct=http://127.0.0.1:$P_UP_SSE$CHAT"
    "sse:nginx=http://127.0.0.1:$P_PX_SSE$CHAT"
    "sse:gateway=${GW_URL[gw-sse]}$CHAT"
    "sse:gateway-info=${GW_URL[gw-sse-info]}$CHAT"
    "sse:hyper=${FLOOR_URL[floor-sse]}$CHAT"
    "${base_targets[@]}"
    "${keys_targets[@]}"
    "drip:direct=$SLOW_URL$CHAT"
    "drip:nginx=http://127.0.0.1:$P_PX_DRIP$CHAT"
    "drip:gateway=${GW_URL[gw-drip]}$CHAT"
  )
  # ONLY="KIND:LABEL ..." keeps a subset, e.g. ONLY="json:nginx json:gateway" for a quick experiment.
  local targets=() t
  for t in "${all[@]}"; do
    if [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" ${t%%=*} "* ]]; then targets+=(--target "$t"); fi
  done
  [ ${#targets[@]} -gt 0 ] || die "ONLY=$ONLY matches no target"
  # CACHEABLE=0: plain requests the cache does not look at (x-cache: BYPASS) instead of misses.
  local bj=$TMP/req-json.json bs=$TMP/req-sse.json
  if [ "${CACHEABLE:-1}" = 0 ]; then bj=$TMP/soak-json.json bs=$TMP/soak-sse.json; log "requests are not cacheable (CACHEABLE=0)"; fi
  local conn_args=()
  if [ "${NEW_CONN:-0}" = 1 ]; then conn_args=(--new-conn); log "a connection per request (NEW_CONN=1)"; fi
  "$LOAD_BIN" compare \
    --rounds "$ROUNDS" --duration "$DURATION" --warmup "$WARMUP" --conns "$CONNS" \
    --body-json "$bj" --body-sse "$bs" --body-drip "$TMP/req-drip.json" \
    "${targets[@]}" "${keys_args[@]}" "${conn_args[@]}" \
    --pin-pids "$(server_pids)" --pin-cpu 0 \
    --markdown-out "$TMP/compare.md"
  log "load average after the comparison: $(cut -d' ' -f1-3 /proc/loadavg)"
  log "gateway RSS after the comparison: JSON $(rss_kb "${GW_PID[gw-json]}") kB, SSE $(rss_kb "${GW_PID[gw-sse]}") kB"
  log "access log written at RUST_LOG=info: $(wc -l <"$TMP/gw-json-info.err") + $(wc -l <"$TMP/gw-sse-info.err") lines, $(( ($(stat -c %s "$TMP/gw-json-info.err") + $(stat -c %s "$TMP/gw-sse-info.err")) / 1024 )) KiB"
  local w
  for w in gw-json gw-sse gw-drip; do
    if [ -s "$TMP/$w.err" ]; then log "$w wrote to stderr at RUST_LOG=warn:"; head -5 "$TMP/$w.err" >&2; fi
  done
  for w in "${!GW_PID[@]}"; do stop_gateway "$w"; done
  log "ledger rows written: $(for w in gw-json gw-sse; do [ -f "$TMP/$w.db" ] && du -h "$TMP/$w.db" | cut -f1; done | tr '\n' ' ')"
}

run_memory() {
  local base=(POE_GATEWAY_LIMITS__MAX_CONCURRENT_UPSTREAM=20000)
  log "memory: idle RSS"
  start_gateway gw-mem1 "$SLOW_URL" warn "${base[@]}"
  sleep 2
  local idle fds
  idle=$(rss_kb "${GW_PID[gw-mem1]}")
  fds=$(find "/proc/${GW_PID[gw-mem1]}/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  curl -sS -N --max-time 10 -H 'content-type: application/json' --data-binary "@$TMP/req-drip.json" \
    "${GW_URL[gw-mem1]}$CHAT" -o /dev/null || die "warm-up request failed"
  sleep 1
  echo "IDLE-RSS fresh=${idle}kB after_one_stream=$(rss_kb "${GW_PID[gw-mem1]}")kB open_files=$fds (target < 30 MB)"

  log "memory: $HOLD_STREAMS held SSE streams over HTTP/1.1 (limits.max_concurrent_upstream raised to 20000; the default is 1024)"
  local out
  out=$("$LOAD_BIN" hold --url "${GW_URL[gw-mem1]}$CHAT" --body "$TMP/req-hold.json" --pid "${GW_PID[gw-mem1]}" \
    --streams "$HOLD_STREAMS" --fit-fd-limit --checkpoint $((HOLD_STREAMS / 2)) --settle 5) || HOLD_FAIL=1
  echo "$out"
  stop_gateway gw-mem1
  # The same number of streams through nginx (its two workers summed), for scale.
  local n
  n=$(sed -n 's/.* streams=\([0-9]*\) .*/\1/p' <<<"$out")
  if [ -n "$n" ]; then
    log "memory: $n held SSE streams through the nginx proxy (HTTP/1.1), for comparison"
    local workers
    workers=$(pgrep -P "$NGINX_PROXY_PID" | paste -sd, -)
    "$LOAD_BIN" hold --name nginx --url "http://127.0.0.1:$P_PX_DRIP$CHAT" --body "$TMP/req-hold.json" \
      --pid "$workers" --streams "$n" --checkpoint $((n / 2)) --settle 5 || log "nginx did not hold every stream"
  fi

  log "memory: $HOLD_STREAMS held SSE streams over HTTP/1.1, upstream over TLS and HTTP/2 (Poe's path: 100 streams per upstream connection)"
  start_gateway gw-mem3 "$SLOW_TLS_URL" warn "${base[@]}" POE_GATEWAY_UPSTREAM__CA_FILE="$ROOT/tests/data/localhost.cert.pem"
  sleep 1
  # One descriptor per stream here (the upstream side is multiplexed), so all of them fit.
  "$LOAD_BIN" hold --url "${GW_URL[gw-mem3]}$CHAT" --body "$TMP/req-hold.json" --pid "${GW_PID[gw-mem3]}" \
    --streams "$HOLD_STREAMS" --checkpoint $((HOLD_STREAMS / 2)) --settle 5 || HOLD_FAIL=1
  stop_gateway gw-mem3

  log "memory: $HOLD_STREAMS held SSE streams over h2c (100 per connection), fresh gateway, twice"
  start_gateway gw-mem2 "$SLOW_URL" warn "${base[@]}"
  sleep 1
  local round
  for round in 1 2; do
    # The second round on the same process shows whether the first one's memory is reused.
    "$LOAD_BIN" hold --url "${GW_URL[gw-mem2]}$CHAT" --body "$TMP/req-hold.json" --pid "${GW_PID[gw-mem2]}" \
      --streams "$HOLD_STREAMS" --h2 --per-conn 100 --checkpoint $((HOLD_STREAMS / 2)) --settle 5 \
      | sed "s/^/[round $round] /" || HOLD_FAIL=1
  done
  stop_gateway gw-mem2
  [ -z "${HOLD_FAIL:-}" ] || die "not every stream was held (see above)"

  # What a stored cache entry costs against what the cache's weigher counts toward
  # [cache] max_bytes (alone in its process: it reads RSS). Fails if they are 15 % apart.
  log "memory: cache entries, RSS against weight"
  cargo test --release --lib entry_weights_match_their_memory -- --ignored --nocapture 2>&1 \
    | grep -E 'bytes of RSS per entry|panicked|weigher is' || die "the cache entry measurement failed"
}

run_soak() {
  log "soak: ${SOAK_SECS}s at ${SOAK_RATE} req/s per target (JSON, SSE, SSE hung up after the first event)"
  # SOAK_CACHEABLE=1: unique temperature-0 requests, so every answer is a cache miss that is
  # stored: RSS should then level off near [cache] max_bytes.
  local bj=$TMP/soak-json.json bs=$TMP/soak-sse.json
  if [ "${SOAK_CACHEABLE:-0}" = 1 ]; then bj=$TMP/req-json.json bs=$TMP/req-sse.json; log "soak: cacheable requests (every one a miss that is stored)"; fi
  start_gateway gw-json "http://127.0.0.1:$P_UP_JSON" warn
  start_gateway gw-sse "http://127.0.0.1:$P_UP_SSE" warn
  start_gateway gw-drip "$SLOW_URL" warn
  "$LOAD_BIN" soak --duration "$SOAK_SECS" --rate "$SOAK_RATE" --conns "$SOAK_CONNS" --sample-secs 5 \
    --body-json "$bj" --body-sse "$bs" --body-drip "$TMP/req-drip.json" \
    --target "json:gateway=${GW_URL[gw-json]}$CHAT" \
    --target "sse:gateway=${GW_URL[gw-sse]}$CHAT" \
    --target "drip-cancel:gateway=${GW_URL[gw-drip]}$CHAT" \
    --pid "json=${GW_PID[gw-json]}" --pid "sse=${GW_PID[gw-sse]}" --pid "sse-cancel=${GW_PID[gw-drip]}" \
    || SOAK_FAIL=1
  local w
  for w in gw-json gw-sse gw-drip; do
    log "$w /metrics: $(curl -s --max-time 5 "${GW_URL[$w]}/metrics" | grep -E '^[a-z_]*cache_(bytes|hits_total|misses_total|evictions_total)' | tr '\n' ' ')"
  done
  [ -z "${SOAK_FAIL:-}" ] || die "the soak failed (see above)"
}

# Runs $@ under callgrind (counters zeroed after a warm-up), sends 1,000 serial requests to
# $URL_OF_PROFILED, and writes the annotated profile. Instructions per request = total / 1,000.
profile_one() { # $1 label, $2 kind (json|sse), $3 "gateway", "floor" or "nginx:PORT", then VAR=value..., then the command
  local label=$1 kind=$2 urlsrc=$3
  shift 3
  local envs=()
  while [ $# -gt 0 ] && [[ $1 == *=* ]]; do envs+=("$1"); shift; done
  env "${envs[@]}" valgrind --tool=callgrind --callgrind-out-file="$TMP/callgrind.$label" --dump-instr=no "$@" \
    </dev/null >"$TMP/prof-$label.out" 2>"$TMP/prof-$label.err" &
  local pid=$! url= i
  PIDS+=("$pid")
  for i in $(seq 1 600); do
    case $urlsrc in
      nginx:*) (exec 3<>"/dev/tcp/127.0.0.1/${urlsrc#nginx:}") 2>/dev/null && url=http://127.0.0.1:${urlsrc#nginx:} ;;
      floor) url=$(sed -n 's/^floor listening on //p' "$TMP/prof-$label.out" 2>/dev/null || true) ;;
      *) url=$(sed -n 's/^poe-gateway listening on //p' "$TMP/prof-$label.out" 2>/dev/null || true) ;;
    esac
    [ -n "$url" ] && break
    sleep 0.1
  done
  [ -n "$url" ] || die "$label under valgrind did not start: $(tail -3 "$TMP/prof-$label.err")"
  local bj=$TMP/req-json.json bs=$TMP/req-sse.json
  # CACHEABLE=0: requests the cache skips, as in compare and perf.
  if [ "${CACHEABLE:-1}" = 0 ]; then bj=$TMP/soak-json.json bs=$TMP/soak-sse.json; fi
  # A team's gateway is sent its gateway key (PROFILE_BEARER, set by run_profile for it).
  local bearer=()
  [ -z "${PROFILE_BEARER:-}" ] || bearer=(--bearer "$PROFILE_BEARER")
  "$LOAD_BIN" compare --rounds 1 --duration 20 --warmup 0 --serial-only --max-requests 200 \
    --body-json "$bj" --body-sse "$bs" "${bearer[@]}" \
    --target "$kind:$label=$url$CHAT" >/dev/null 2>&1 || die "$label: warm-up requests failed"
  if [ "$urlsrc" = gateway ]; then
    # The model catalogue (fetched once per models_ttl, for pricing) and the warm-up's
    # ledger rows must be done before counting starts, or one catalogue parse (about 10M
    # instructions) lands among the measured requests.
    curl -sS --max-time 60 "$url/v1/models" -o /dev/null || die "$label: GET /v1/models failed"
    sleep 2
  fi
  callgrind_control -z "$pid" >/dev/null 2>&1 || die "callgrind_control -z failed"
  "$LOAD_BIN" compare --rounds 1 --duration 120 --warmup 0 --serial-only --max-requests 1000 \
    --body-json "$bj" --body-sse "$bs" "${bearer[@]}" \
    --target "$kind:$label=$url$CHAT" >/dev/null 2>&1 || die "$label: profiled requests failed"
  # Dumped before the process exits, so shutdown (dropping a full cache, the ledger's last
  # flush) is not counted as request work.
  callgrind_control -d "$pid" >/dev/null 2>&1 || die "callgrind_control -d failed"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  local dump
  dump=$(ls -t "$TMP/callgrind.$label".* 2>/dev/null | head -1)
  [ -n "$dump" ] || dump=$TMP/callgrind.$label
  callgrind_annotate --threshold=100 --inclusive=yes "$dump" >"$TMP/annotate-incl.$label" 2>/dev/null || true
  callgrind_annotate --threshold=100 "$dump" >"$TMP/annotate-self.$label" 2>/dev/null || true
  local total
  total=$(grep -m1 'PROGRAM TOTALS' "$TMP/annotate-self.$label" | awk '{gsub(",","",$1); print $1}')
  echo "PROFILE $label: $((total / 1000)) instructions per request (callgrind, 1,000 serial requests)"
  echo "---- $label: top self cost ----"
  grep -E '^ *[0-9,]+ \( *[0-9.]+%\)  ' "$TMP/annotate-self.$label" | grep -v -E 'clone.S|pthread_create|thread_start|call_once|begin_short_backtrace|blocking::pool|task::raw::poll|harness::Harness|core::Core|BlockingTask|worker::run |enter_runtime|Scoped<T>::set' | sed -n '1,25p' | cut -c1-200
}

run_profile() {
  command -v valgrind >/dev/null || die "valgrind is needed"
  # nginx as the same plain proxy, one process, for an instruction baseline.
  local kind port pport
  read -r PJ PS <<<"$("$LOAD_BIN" ports 2)"
  mkdir -p "$TMP/nginx-prof"
  chmod 755 "$TMP/nginx-prof"
  {
    nginx_common "$TMP/nginx-prof" | sed 's/^worker_processes 2;/worker_processes 1;\nmaster_process off;/'
    for kind in json sse; do
      port=$P_UP_JSON pport=$PJ
      [ $kind = sse ] && port=$P_UP_SSE pport=$PS
      cat <<EOF
  upstream prof_$kind { server 127.0.0.1:$port; keepalive 64; keepalive_requests 100000000; }
  server {
    listen 127.0.0.1:$pport;
    location / { proxy_pass http://prof_$kind; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
  }
EOF
    done
    echo "}"
  } >"$TMP/nginx-prof/nginx.conf"
  for kind in json sse; do
    port=$P_UP_JSON pport=$PJ
    [ $kind = sse ] && port=$P_UP_SSE pport=$PS
    log "profile ($kind): nginx proxy under callgrind"
    profile_one "nginx-$kind" $kind "nginx:$pport" "$NGINX" -p "$TMP/nginx-prof" -c "$TMP/nginx-prof/nginx.conf" -e "$TMP/nginx-prof/error.log"
    log "profile ($kind): the floor (bare hyper) under callgrind"
    profile_one "hyper-$kind" $kind floor "$FLOOR_BIN" --listen 127.0.0.1:0 --upstream "127.0.0.1:$port"
    log "profile ($kind): gateway under callgrind"
    profile_one "gateway-$kind" $kind gateway POE_API_KEY=bench-not-a-key POE_BASE_URL="http://127.0.0.1:$port" \
      POE_GATEWAY_LISTEN=127.0.0.1:0 POE_GATEWAY_LIMITS__UPSTREAM_RPM=100000000 RUST_LOG=warn \
      POE_GATEWAY_DATABASE_URL="sqlite://$TMP/prof-$kind.db" $GATEWAY_ENV "$GW_BIN" serve
    # A team's gateway, as `gateway-keys` in compare: auth.mode = keys, and every request
    # carries a key with a budget and a rate limit, so the key's look-up and both checks are
    # counted. PROFILE_KEYS=0 skips it.
    if [ "${PROFILE_KEYS:-1}" != 0 ]; then
      local key
      key=$(bench_key "$TMP/prof-keys-$kind.db")
      log "profile ($kind): a team's gateway (auth.mode = keys) under callgrind"
      PROFILE_BEARER=$key profile_one "gateway-keys-$kind" $kind gateway POE_API_KEY=bench-not-a-key \
        POE_BASE_URL="http://127.0.0.1:$port" POE_GATEWAY_LISTEN=127.0.0.1:0 POE_GATEWAY_AUTH__MODE=keys \
        POE_GATEWAY_LIMITS__UPSTREAM_RPM=100000000 RUST_LOG=warn \
        POE_GATEWAY_DATABASE_URL="sqlite://$TMP/prof-keys-$kind.db" $GATEWAY_ENV "$GW_BIN" serve
    fi
  done
  log "callgrind files and annotations: $TMP (KEEP_TMP=1 keeps them)"
}

# Samples the gateway's threads (user and kernel time) while $CONNS connections load it, and
# prints where the time goes. VMs without hardware counters still have cpu-clock.
run_perf() {
  command -v perf >/dev/null || die "perf is needed"
  local kind port bj bs
  bj=$TMP/req-json.json bs=$TMP/req-sse.json
  if [ "${CACHEABLE:-1}" = 0 ]; then bj=$TMP/soak-json.json bs=$TMP/soak-sse.json; log "requests are not cacheable (CACHEABLE=0)"; fi
  for kind in json sse; do
    port=$P_UP_JSON
    [ $kind = sse ] && port=$P_UP_SSE
    start_gateway "gw-perf-$kind" "http://127.0.0.1:$port" warn
    "$LOAD_BIN" compare --rounds 1 --duration $((DURATION + 2)) --warmup 1 --conns "$CONNS" --no-serial \
      --body-json "$bj" --body-sse "$bs" \
      --target "$kind:gateway=${GW_URL[gw-perf-$kind]}$CHAT" >"$TMP/perf-load-$kind.out" 2>&1 &
    local load=$!
    sleep 2
    perf record -e cpu-clock -F 1999 ${PERF_CALL_GRAPH:--g} -o "$TMP/perf-$kind.data" -p "${GW_PID[gw-perf-$kind]}" -- sleep "$DURATION" \
      >/dev/null 2>"$TMP/perf-$kind.err" || die "perf record failed: $(tail -3 "$TMP/perf-$kind.err")"
    wait "$load" || die "load failed: $(tail -5 "$TMP/perf-load-$kind.out")"
    grep -E 'req/s' "$TMP/perf-load-$kind.out" | tail -1
    stop_gateway "gw-perf-$kind"
    echo "---- gateway $kind: self time by symbol (cpu-clock samples) ----"
    perf report -i "$TMP/perf-$kind.data" --no-children --sort symbol --stdio 2>/dev/null \
      | grep -E '^ +[0-9]' | sed -n '1,40p' | cut -c1-160
    echo "---- gateway $kind: by shared object ----"
    perf report -i "$TMP/perf-$kind.data" --no-children --sort dso --stdio 2>/dev/null \
      | grep -E '^ +[0-9]' | sed -n '1,10p'
  done
  log "perf data: $TMP (KEEP_TMP=1 keeps it)"
}

# Counts the system calls of every thread of a server (the gateway, or the proxy nginx's
# workers) over a fixed number of requests, serial and at $CONNS connections: a request that
# takes more trips into the kernel than nginx's is paying for them in the 37 % of kernel time
# that perf shows. strace slows the server down; the counts, not the times, are the result.
syscalls_one() { # $1 label, $2 kind, $3 URL, then the server's pids
  local label=$1 kind=$2 url=$3 bj=$TMP/req-json.json bs=$TMP/req-sse.json mode conns
  shift 3
  if [ "${CACHEABLE:-1}" = 0 ]; then bj=$TMP/soak-json.json bs=$TMP/soak-sse.json; fi
  "$LOAD_BIN" compare --rounds 1 --duration 20 --warmup 0 --conns "$CONNS" --no-serial --max-requests 2000 \
    --body-json "$bj" --body-sse "$bs" --target "$kind:$label=$url$CHAT" >/dev/null 2>&1 || die "$label: warm-up failed"
  for mode in serial conns; do
    local args=(--serial-only) n=2000 attach=() p t
    [ $mode = conns ] && args=(--no-serial --conns "$CONNS") n=20000
    # Every thread: strace -p attaches to one thread only.
    for p in "$@"; do for t in /proc/"$p"/task/*; do attach+=(-p "${t##*/}"); done; done
    strace -f -c -o "$TMP/strace-$label-$mode" "${attach[@]}" 2>/dev/null &
    local st=$!
    sleep 1
    "$LOAD_BIN" compare --rounds 1 --duration 120 --warmup 0 "${args[@]}" --max-requests "$n" \
      --body-json "$bj" --body-sse "$bs" --target "$kind:$label=$url$CHAT" >"$TMP/strace-load-$label-$mode" 2>&1 \
      || die "$label: traced requests failed: $(tail -3 "$TMP/strace-load-$label-$mode")"
    kill -INT "$st"
    wait "$st" 2>/dev/null || true
    # strace -c: % time, seconds, usecs/call, calls, [errors,] syscall.
    awk -v n="$n" -v label="$label" -v mode="$mode" '
      $1 ~ /^[0-9.]+$/ && $NF == "total" { total = $4 }
      $1 ~ /^[0-9.]+$/ && $NF != "total" { calls[$NF] = $4; errs[$NF] = (NF == 6) ? $5 : 0 }
      END {
        printf "SYSCALLS %s %s: %.2f per request;", label, mode, total / n
        for (c in calls) if (calls[c] / n >= 0.05) {
          printf " %s %.2f", c, calls[c] / n
          if (errs[c] / n >= 0.05) printf " (%.2f failed)", errs[c] / n
        }
        printf "\n"
      }' "$TMP/strace-$label-$mode"
  done
}

run_syscalls() {
  local kind port pport pids
  for kind in json sse; do
    port=$P_UP_JSON pport=$P_PX_JSON
    [ $kind = sse ] && port=$P_UP_SSE pport=$P_PX_SSE
    pids=$(pgrep -f "nginx: worker process" -P "$(cat "$TMP/nginx-proxy/nginx.pid")" | tr '\n' ' ')
    log "syscalls ($kind): nginx proxy (workers $pids)"
    # shellcheck disable=SC2086
    syscalls_one nginx $kind "http://127.0.0.1:$pport" $pids
    start_gateway "gw-strace-$kind" "http://127.0.0.1:$port" warn
    log "syscalls ($kind): gateway"
    syscalls_one gateway $kind "${GW_URL[gw-strace-$kind]}" "${GW_PID[gw-strace-$kind]}"
    stop_gateway "gw-strace-$kind"
  done
}

# CPU time per request of each proxy at $CONNS connections, split into user and kernel time
# (/proc/PID/task/*/stat before and after each run, so every thread counts: the gateway's
# ledger writer too). On a shared 2-core machine req/s swings from run to run, but which
# process spends the time, and on which side of the system call line, holds; this is what
# says how much of the gateway's own work has to go for a throughput target.
cpu_ticks() { # pids; prints "user system" clock ticks, summed over all their threads
  local p
  # Fields 14 and 15 of stat, counted after the "(comm)" field, which may hold spaces.
  for p in "$@"; do cat /proc/"$p"/task/*/stat 2>/dev/null; done \
    | awk '{sub(/^.*\) /, ""); u += $12; s += $13} END {print u + 0, s + 0}'
}
cpu_one() { # $1 kind, $2 label, $3 URL, then the proxy's pids; prints one table row
  local kind=$1 label=$2 url=$3 bj=$TMP/req-json.json bs=$TMP/req-sse.json
  shift 3
  if [ "${CACHEABLE:-1}" = 0 ]; then bj=$TMP/soak-json.json bs=$TMP/soak-sse.json; fi
  local ups u0 s0 uu0 us0 u1 s1 uu1 us1 out n rps
  ups=$(pgrep -P "$UPSTREAM_NGINX_PID" | tr '\n' ' ')
  read -r u0 s0 <<<"$(cpu_ticks "$@")"
  # shellcheck disable=SC2086
  read -r uu0 us0 <<<"$(cpu_ticks $ups)"
  out=$("$LOAD_BIN" compare --rounds 1 --duration "$DURATION" --warmup 0 --conns "$CONNS" --no-serial \
    --body-json "$bj" --body-sse "$bs" --target "$kind:$label=$url$CHAT" 2>&1) || die "$label: load failed: $(tail -3 <<<"$out")"
  read -r u1 s1 <<<"$(cpu_ticks "$@")"
  # shellcheck disable=SC2086
  read -r uu1 us1 <<<"$(cpu_ticks $ups)"
  # The summary row: | KIND | label | req/s | min..max | ... | requests | errors |
  read -r rps n <<<"$(awk -F'|' -v l="$label" '$3 ~ "^ *"l" *$" {gsub(/ /, "", $4); gsub(/ /, "", $(NF-2)); print $4, $(NF-2)}' <<<"$out")"
  [ -n "$n" ] && [ "$n" -gt 0 ] || die "$label: no requests counted"
  # Clock ticks to µs per request.
  awk -v k="$kind" -v l="$label" -v r="$rps" -v n="$n" -v hz="$CLK_TCK" -v u=$((u1 - u0)) -v s=$((s1 - s0)) \
    -v up=$((uu1 - uu0 + us1 - us0)) \
    'BEGIN { t = 1e9 / hz / n; printf "| %s | %s | %s | %.1f | %.1f | %.1f | %.1f |\n", toupper(k), l, r, (u + s) * t / 1000, u * t / 1000, s * t / 1000, up * t / 1000 }'
}
run_cpu() {
  local kind port pport round
  CLK_TCK=$(getconf CLK_TCK)
  start_floor floor-json "$P_UP_JSON"
  start_floor floor-sse "$P_UP_SSE"
  echo "| payload | proxy | req/s @$CONNS | CPU µs/request | user | kernel | upstream nginx CPU µs/request |"
  echo "|---|---|---:|---:|---:|---:|---:|"
  for kind in json sse; do
    port=$P_UP_JSON pport=$P_PX_JSON
    [ $kind = sse ] && port=$P_UP_SSE pport=$P_PX_SSE
    start_gateway "gw-cpu-$kind" "http://127.0.0.1:$port" warn
    [ -z "$BASE_BIN" ] || start_gateway "gw-cpu-$kind-base" "http://127.0.0.1:$port" warn
    local fl=floor-$kind
    for round in $(seq 1 "$ROUNDS"); do
      # shellcheck disable=SC2046
      cpu_one $kind nginx "http://127.0.0.1:$pport" $(pgrep -P "$NGINX_PROXY_PID")
      cpu_one $kind hyper "${FLOOR_URL[$fl]}" "${FLOOR_PID[$fl]}"
      cpu_one $kind gateway "${GW_URL[gw-cpu-$kind]}" "${GW_PID[gw-cpu-$kind]}"
      [ -z "$BASE_BIN" ] || cpu_one $kind gateway-base "${GW_URL[gw-cpu-$kind-base]}" "${GW_PID[gw-cpu-$kind-base]}"
    done
    stop_gateway "gw-cpu-$kind"
    [ -z "$BASE_BIN" ] || stop_gateway "gw-cpu-$kind-base"
  done
  log "a proxy's throughput is about 2 cores / (its CPU per request + the upstream's + the load tool's); the load tool's share is what is left of nginx's row"
}

# Where one serial request's time goes when everything on its path shares CPU 0 (as the
# pinned serial runs of `compare` do): perf samples all of CPU 0 while one connection loads
# nginx as a proxy, then the gateway, and prints µs per request for each process (user and
# kernel together) and the gateway's symbols. Pinned, a request's latency is the sum of these.
run_serial_perf() {
  command -v perf >/dev/null || die "perf is needed"
  local kind port pport label url p bj=$TMP/req-json.json bs=$TMP/req-sse.json
  if [ "${CACHEABLE:-1}" = 0 ]; then bj=$TMP/soak-json.json bs=$TMP/soak-sse.json; log "requests are not cacheable (CACHEABLE=0)"; fi
  for kind in json sse; do
    port=$P_UP_JSON pport=$P_PX_JSON
    [ $kind = sse ] && port=$P_UP_SSE pport=$P_PX_SSE
    start_gateway "gw-sp-$kind" "http://127.0.0.1:$port" warn
    local labels=(nginx gateway)
    if [ -n "$BASE_BIN" ]; then start_gateway "gw-sp-$kind-base" "http://127.0.0.1:$port" warn; labels+=(gateway-base); fi
    for p in $(server_pids | tr ',' ' '); do taskset -a -p -c 0 "$p" >/dev/null; done
    for label in "${labels[@]}"; do
      url="http://127.0.0.1:$pport"
      [ $label = gateway ] && url=${GW_URL[gw-sp-$kind]}
      [ $label = gateway-base ] && url=${GW_URL[gw-sp-$kind-base]}
      taskset -c 0 "$LOAD_BIN" compare --rounds 1 --duration $((DURATION + 2)) --warmup 1 --serial-only \
        --body-json "$bj" --body-sse "$bs" --target "$kind:$label=$url$CHAT" >"$TMP/sp-load-$kind-$label.out" 2>&1 &
      local load=$!
      sleep 2
      perf record -a -C 0 -e cpu-clock -F 1999 ${PERF_CALL_GRAPH:--g} -o "$TMP/sp-$kind-$label.data" -- sleep "$DURATION" \
        >/dev/null 2>"$TMP/sp-$kind-$label.err" || die "perf record failed: $(tail -3 "$TMP/sp-$kind-$label.err")"
      wait "$load" || die "load failed: $(tail -5 "$TMP/sp-load-$kind-$label.out")"
      # Requests in the sampled window: the run's rate times the window.
      local rps
      rps=$(sed -n 's/.* 1 conn *: *\([0-9]*\) req\/s.*/\1/p' "$TMP/sp-load-$kind-$label.out" | head -1)
      [ -n "$rps" ] || die "no rate in $TMP/sp-load-$kind-$label.out"
      echo "---- $kind via $label, 1 connection pinned to CPU 0: $rps req/s, p50 $(sed -n 's/.* p50 *\([0-9.]*\) us.*/\1/p' "$TMP/sp-load-$kind-$label.out" | head -1) µs; µs per request by process ----"
      perf report -i "$TMP/sp-$kind-$label.data" --no-children --sort pid -n --stdio -g none 2>/dev/null \
        | awk -v r="$rps" -v hz=1999 -v d="$DURATION" '$1 ~ /%$/ && $2 ~ /^[0-9]+$/ { printf "  %-28s %7.1f µs\n", $3, $2 / hz / d / r * 1e6 }' | head -12
      if [ $label != nginx ]; then
        local gw=gw-sp-$kind
        [ $label = gateway-base ] && gw=gw-sp-$kind-base
        echo "---- $label's own threads, by symbol (% of CPU 0) ----"
        perf report -i "$TMP/sp-$kind-$label.data" --no-children --pid "${GW_PID[$gw]}" --sort dso,symbol --stdio -g none 2>/dev/null \
          | grep -E '^ +[0-9]' | sed -n '1,45p' | cut -c1-150
      fi
    done
    stop_gateway "gw-sp-$kind"
    [ -z "$BASE_BIN" ] || stop_gateway "gw-sp-$kind-base"
  done
  log "perf data: $TMP (KEEP_TMP=1 keeps it)"
}

# The training load of scripts/pgo-build.sh: every path a deployed gateway runs hot, so that
# profile-guided optimisation does not treat one of them as cold code. The benchmark's own
# load (JSON and SSE stored misses over HTTP/1.1, at RUST_LOG=warn and info), cache hits, a
# team's gateway (gateway keys with a budget and a rate limit), and Poe's path: SSE streams
# from a TLS upstream over HTTP/2, at 32 connections.
run_train() {
  ONLY="json:gateway sse:gateway json:gateway-info sse:gateway-info json:gateway-keys sse:gateway-keys" run_compare
  log "train: cache hits (one request body, sent again and again)"
  start_gateway gw-train-hits "http://127.0.0.1:$P_UP_JSON" info
  local i
  for i in $(seq 1 300); do
    curl -sS --max-time 5 -H 'content-type: application/json' --data-binary "@$TMP/req-json.json" \
      "${GW_URL[gw-train-hits]}$CHAT" -o /dev/null || die "train: hit request failed"
  done
  stop_gateway gw-train-hits
  log "train: SSE over TLS and HTTP/2 (Poe's path), no gaps between events"
  local tls_url
  tls_url=$(start_slow_upstream train-tls --tls-cert "$ROOT/tests/data/localhost.cert.pem" \
    --tls-key "$ROOT/tests/data/localhost.key.pem" --h2-max-streams 100 --drip-gap-ms 0)
  start_gateway gw-train-tls "$tls_url" info POE_GATEWAY_UPSTREAM__CA_FILE="$ROOT/tests/data/localhost.cert.pem"
  "$LOAD_BIN" compare --rounds "$ROUNDS" --duration "$DURATION" --warmup 0 --conns "$CONNS" --no-serial \
    --body-json "$TMP/req-json.json" --body-sse "$TMP/req-drip.json" \
    --target "sse:gateway-tls=${GW_URL[gw-train-tls]}$CHAT"
  stop_gateway gw-train-tls
}

# --- run ----------------------------------------------------------------------------------------
start_upstream_nginx
SLOW_URL=$(start_slow_upstream slow)
# Poe's path for the held streams: TLS with the test certificate, HTTP/2 by ALPN, 100 streams
# per connection (the gateway trusts the certificate through upstream.ca_file).
SLOW_TLS_URL=$(start_slow_upstream slow-tls --tls-cert "$ROOT/tests/data/localhost.cert.pem" \
  --tls-key "$ROOT/tests/data/localhost.key.pem" --h2-max-streams 100)
start_proxy_nginx "${SLOW_URL##*:}"
log "upstream nginx: JSON :$P_UP_JSON, SSE :$P_UP_SSE; proxy nginx: JSON :$P_PX_JSON, SSE :$P_PX_SSE, drip :$P_PX_DRIP; slow upstream $SLOW_URL"
# Smoke: every upstream answers as expected before anything is measured.
curl -sS --max-time 5 -H 'content-type: application/json' --data-binary "@$TMP/req-json.json" \
  "http://127.0.0.1:$P_PX_JSON$CHAT" | grep -q '"chat.completion"' || die "nginx JSON path broken"
curl -sS --max-time 5 -H 'content-type: application/json' --data-binary "@$TMP/req-sse.json" \
  "http://127.0.0.1:$P_PX_SSE$CHAT" | grep -q 'data: \[DONE\]' || die "nginx SSE path broken"

case "$MODE" in
  all) run_compare; run_memory ;;
  compare) run_compare ;;
  memory) run_memory ;;
  soak) run_soak ;;
  profile) run_profile ;;
  perf) run_perf ;;
  syscalls) run_syscalls ;;
  cpu) run_cpu ;;
  serial-perf) run_serial_perf ;;
  train) run_train ;;
esac
log "done"
