#!/usr/bin/env bash
# How many SendMessage requests `bulksend serve` accepts per second on ONE core.
#
#   benchmarks/bench_serve.sh [--signed] [--store] [--seconds N] [--connections N]
#
# The server is pinned to core 0 (taskset -c 0), wrk to core 1, so the figure is what one
# core of server does. Every request is a valid SendMessage (the same ~110-byte body); with
# --signed the server verifies an SDK-HMAC-SHA256 signature on each (the signature is made
# once by bulksend.signing.sign and is valid for 15 minutes, which is all the server
# checks); with --store it also journals to SQLite.
#
# Prints two figures: accepted msg/s on the wall clock, and accepted messages per CPU-second
# the server used (from /proc/PID/stat). On a machine where other work shares core 0 the
# first drops and the second does not: the second is the server's own cost.
#
# What limits it: the server is one Python thread, so one core, and it is CPU-bound
# (perf): ~35-40% of its time goes to the kernel (one recv and one send per request,
# epoll), uvloop and llhttp; the rest to the Python interpreter: httptools callbacks, JSON
# in and out, validation, the store, building the answer (~12 µs a request). --signed
# adds bulksend.signing.verify, ~35-40 µs a request (strptime of X-Sdk-Date ~9 µs, quote()
# per path segment ~7 µs, SHA-256 x2, HMAC), so about 3.5x the cost. wrk is not the limit:
# it does several times this on its core (if something else runs on core 1, the wall-clock
# figure drops and the server shows < 100% of its core; the per-CPU-second figure holds).
set -euo pipefail

SIGNED=0 STORE=0 SECONDS_=10 CONNS=64
while [[ $# -gt 0 ]]; do
  case "$1" in
    --signed) SIGNED=1 ;;
    --store) STORE=1 ;;
    --seconds) SECONDS_="$2"; shift ;;
    --connections) CONNS="$2"; shift ;;
    *) echo "usage: $0 [--signed] [--store] [--seconds N] [--connections N]" >&2; exit 2 ;;
  esac
  shift
done

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[[ -x "$PY" ]] || PY=python3

if ! command -v wrk >/dev/null; then
  echo "installing wrk ..." >&2
  SUDO=""; [[ "$(id -u)" != 0 ]] && SUDO=sudo
  $SUDO apt-get install -y wrk >/dev/null 2>&1 || { $SUDO apt-get update >/dev/null && $SUDO apt-get install -y wrk >/dev/null; }
fi

if [[ "$(nproc)" -ge 2 ]]; then SERVER_CPU=(taskset -c 0); CLIENT_CPU=(taskset -c 1)
else echo "warning: fewer than 2 cores: server and wrk share one" >&2; SERVER_CPU=(); CLIENT_CPU=(); fi

TMP="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT

AK=BENCHAK0000000000001 SK=bench-secret-key
FLAGS=(--port 0)
[[ "$STORE" == 1 ]] && FLAGS+=(--store "$TMP/bench.db")
if [[ "$SIGNED" == 1 ]]; then
  env HUAWEICLOUD_SDK_AK=$AK HUAWEICLOUD_SDK_SK=$SK "${SERVER_CPU[@]}" "$PY" -m bulksend serve "${FLAGS[@]}" >"$TMP/out" 2>"$TMP/err" &
else
  env -u HUAWEICLOUD_SDK_AK -u HUAWEICLOUD_SDK_SK -u HUAWEICLOUD_SDK_AUTH_TOKEN \
    "${SERVER_CPU[@]}" "$PY" -m bulksend serve "${FLAGS[@]}" >"$TMP/out" 2>"$TMP/err" &
fi
SERVER_PID=$!
for _ in $(seq 150); do [[ -s "$TMP/out" ]] && break; sleep 0.1; done
URL="$(head -n1 "$TMP/out")"
[[ "$URL" == http* ]] || { echo "server did not start:" >&2; cat "$TMP/err" >&2; exit 1; }
HOSTPORT="${URL#http://}"
PATH_="/v2/rocketmq/0a1b2c3d4e5f/instances/bench-instance/messages"

# The wrk script: one fixed body; with --signed, headers signed once here.
"$PY" - "$SIGNED" "$HOSTPORT" "$PATH_" "$AK" "$SK" >"$TMP/post.lua" <<'EOF'
import json, sys, time
from bulksend import signing
signed, hostport, path, ak, sk = sys.argv[1:]
body = '{"topic":"bench","body":"hello world 0123456789 a typical small payload","property_list":[{"name":"KEYS","value":"k1"}]}'
headers = {"Content-Type": "application/json", "Host": hostport}
if signed == "1":
    headers = signing.sign("POST", path, [], headers, body.encode(), ak=ak, sk=sk, now=time.time())
print('wrk.method = "POST"')
print(f"wrk.body = {json.dumps(body)}")
for k, v in headers.items():
    if k != "Host":
        print(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}")
EOF

accepted() { curl -s "$URL/metrics" | awk '/^bulksend_serve_messages_accepted_total /{print $2}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }

# Warm up (connections, allocator), then measure.
"${CLIENT_CPU[@]}" wrk -t1 -c"$CONNS" -d2s -s "$TMP/post.lua" "$URL$PATH_" >/dev/null
A0="$(accepted)"; T0="$(cpu_ticks)"; W0="$(date +%s.%N)"
"${CLIENT_CPU[@]}" wrk -t1 -c"$CONNS" -d"${SECONDS_}s" -s "$TMP/post.lua" "$URL$PATH_" \
  | grep -E "Latency|Requests/sec|Non-2xx|Socket errors" || true
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  wait "$SERVER_PID"; CODE=$?; SERVER_PID=""
  echo "the server died during the run (exit status $CODE); its stderr:" >&2
  cat "$TMP/err" >&2
  exit 1
fi
W1="$(date +%s.%N)"; T1="$(cpu_ticks)"; A1="$(accepted)"
HZ="$(getconf CLK_TCK)"

"$PY" - "$A0" "$A1" "$T0" "$T1" "$W0" "$W1" "$HZ" "$SIGNED" "$STORE" <<'EOF'
import sys
a0, a1, t0, t1, w0, w1, hz = map(float, sys.argv[1:8])
signed, store = sys.argv[8] == "1", sys.argv[9] == "1"
msgs, cpu, wall = a1 - a0, (t1 - t0) / hz, w1 - w0
mode = f"signature verification {'on' if signed else 'off'}, {'SQLite' if store else 'in-memory'} store"
print(f"\n{mode}: {msgs:.0f} messages accepted in {wall:.1f} s")
print(f"accepted msg/s (wall clock, one core): {msgs / wall:,.0f}")
print(f"accepted msg per server CPU-second:    {msgs / cpu:,.0f}  (server used {cpu:.2f} CPU-s, {cpu / wall:.0%} of its core)")
EOF
