#!/usr/bin/env bash
# Instructions per proxied request: the agent's L7 proxy and HAProxy 2.6,
# each run under callgrind in front of the same two upstream nginx
# instances (`200 ok\n`). Unlike CPU time on a shared VM (which swings by
# ±10 % from run to run), the count repeats to about ±0.3 %, so it shows
# what a change to the request path costs or saves.
#
# For each target: start it under `valgrind --tool=callgrind
# --instr-atstart=no`, send WARMUP keep-alive requests (pools filled),
# switch counting on (`callgrind_control -i on`), send REQUESTS with
# `oha -n REQUESTS -c 16`, dump, and divide the instructions counted by
# the requests. Every answer must be a 200. With CLOSE=1 every request
# comes on a new client connection (`oha --disable-keepalive`), so the
# count includes accepting and closing it. With RATE=N the counted
# requests come at N per second (`oha -q N`) rather than as fast as the
# target answers, so that most requests wake the target up: the count
# then includes what each wake-up costs, as at the fixed rates of
# bench/proxy.sh (keep RATE low, such as 500: callgrind runs the target
# some 50 times slower).
#
#   bash bench/proxy-instructions.sh [REQUESTS]   # default 20000; about 1 minute, plus the build
#   CLOSE=1 bash bench/proxy-instructions.sh
#   RATE=500 bash bench/proxy-instructions.sh 5000
# Needs: valgrind, haproxy, nginx, oha, jq, dig, curl (apt-get install
# valgrind haproxy nginx jq bind9-dnsutils curl; oha as in bench/proxy.sh).
set -euo pipefail
REQUESTS=${1:-20000}
WARMUP=${WARMUP:-2000}
CLOSE=${CLOSE:-0}
RATE=${RATE:-}
OHA_MODE=()
MODE=keep-alive
if [ "$CLOSE" = 1 ]; then
  OHA_MODE=(--disable-keepalive)
  MODE="a new connection each"
fi
OHA_RATE=()
if [ -n "$RATE" ]; then
  OHA_RATE=(-q "$RATE")
  MODE="$MODE, $RATE req/s"
fi
cd "$(dirname "$0")/.."
# shellcheck source=bench/proxy-common.sh
. bench/proxy-common.sh
for tool in valgrind callgrind_control haproxy nginx jq dig curl "$OHA"; do
  command -v "$tool" > /dev/null || {
    echo "needs $tool (apt-get install valgrind haproxy nginx jq bind9-dnsutils curl; oha: see bench/proxy.sh)" >&2
    exit 1
  }
done
bench_start

UP1=19011 UP2=19012 HAPROXY_HTTP=19111 SP_API=19510 SP_DNS=19610 SP_HTTP=19090
start_upstream $UP1 $UP2

web_agent "$WORK/signpost" instructions $SP_API $SP_DNS $SP_HTTP 127.97.0.0/24 $UP1 $UP2
haproxy_http_conf $HAPROXY_HTTP $UP1 $UP2 > "$WORK/haproxy.cfg"

# count NAME URL -> instructions per request of the process last started
# (its pid in $TARGET_PID), under callgrind.
count() {
  local name=$1 url=$2 ok=""
  for _ in $(seq 1 300); do
    ok=$(curl -fsS --max-time 2 "$url" 2> /dev/null) || true
    [ "$ok" = ok ] && break
    sleep 0.2
  done
  [ "$ok" = ok ] || { echo "$name ($url) does not answer 200 ok" >&2; exit 1; }
  "$OHA" -n "$WARMUP" -c 16 "${OHA_MODE[@]}" --no-tui "$url" > /dev/null
  callgrind_control -i on "$TARGET_PID" > /dev/null 2>&1
  local answered
  answered=$("$OHA" -n "$REQUESTS" -c 16 "${OHA_MODE[@]}" "${OHA_RATE[@]}" --no-tui --output-format json "$url" |
    jq -r '.statusCodeDistribution["200"] // 0')
  callgrind_control -d "$TARGET_PID" > /dev/null 2>&1
  # Not the shutdown.
  callgrind_control -i off "$TARGET_PID" > /dev/null 2>&1
  kill "$TARGET_PID"
  wait "$TARGET_PID" 2> /dev/null || true
  [ "$answered" = "$REQUESTS" ] || { echo "$name: $answered of $REQUESTS answers were 200" >&2; exit 1; }
  # Every dump of the process (one per thread group), summed.
  cat "$WORK/$name".cg* | awk -v n="$REQUESTS" '/^totals:/ { s += $2 } END { printf "%.0f", s / n }'
}

log "signpost under callgrind"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/signpost.cg" \
  "$BIN" agent --config "$WORK/signpost/agent.yaml" 2> "$WORK/signpost.log" &
TARGET_PID=$!
PIDS+=("$TARGET_PID")
vip=""
for _ in $(seq 1 300); do
  vip=$(dig +short +time=1 +tries=1 @127.0.0.1 -p $SP_DNS web.service.internal A 2> /dev/null |
    grep -E '^[0-9.]+$' | head -n 1) || true
  [ -n "$vip" ] && break
  sleep 0.2
done
[ -n "$vip" ] || { echo "the agent does not resolve web.service.internal" >&2; exit 1; }
SIGNPOST=$(count signpost "http://$vip:$SP_HTTP/")
log "  $SIGNPOST instructions per request"

log "haproxy under callgrind"
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$WORK/haproxy.cg" \
  haproxy -db -f "$WORK/haproxy.cfg" > "$WORK/haproxy.log" 2>&1 &
TARGET_PID=$!
PIDS+=("$TARGET_PID")
HAPROXY=$(count haproxy "http://127.0.0.1:$HAPROXY_HTTP/")
log "  $HAPROXY instructions per request"

echo
echo "| callgrind, oha -n $REQUESTS -c 16, $MODE | instructions per request | vs haproxy |"
echo "| --- | ---: | ---: |"
echo "| signpost | $SIGNPOST | $(awk -v a="$SIGNPOST" -v b="$HAPROXY" 'BEGIN { printf "%.2fx", a / b }') |"
echo "| haproxy | $HAPROXY | 1.00x |"
