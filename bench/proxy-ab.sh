#!/usr/bin/env bash
# Two builds of the agent side by side: CPU per proxied request (user and
# system, from /proc) and requests/s, each agent in front of the same two
# upstream nginx instances (`200 ok\n`), wrk runs alternating between
# them (the order swapped every round) so that the VM's slow spells fall
# on both. On a shared VM one run swings by 10 % and more; pairs of runs
# a few seconds apart show what a change to the request path does to the
# CPU it takes, which max requests/s (bench/proxy.sh) shows only through
# the noise.
#
# Either may be `haproxy` instead: HAProxy as bench/proxy.sh runs it, so
# that the agent is measured against it with the same fine interleaving.
#
#   bash bench/proxy-ab.sh BIN_A BIN_B            # keep-alive, 10 rounds of 3 s each
#   MODE=close ROUNDS=16 bash bench/proxy-ab.sh BIN_A BIN_B   # Connection: close
#   MODE=close ROUNDS=30 bash bench/proxy-ab.sh BIN haproxy
# Prints each run and the medians, and in how many rounds B took less
# user CPU than A and served more requests/s, with the median of the
# rounds' requests/s ratios. Needs: nginx, wrk, dig, curl (haproxy).
set -euo pipefail
A=${1:?usage: proxy-ab.sh BIN_A BIN_B}
B=${2:?usage: proxy-ab.sh BIN_A BIN_B}
ROUNDS=${ROUNDS:-10}
MODE=${MODE:-keep-alive}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
cd "$(dirname "$0")/.."
# shellcheck source=bench/proxy-common.sh
. bench/proxy-common.sh
for tool in nginx wrk dig curl $([ "$A" = haproxy ] || [ "$B" = haproxy ] && echo haproxy); do
  command -v "$tool" > /dev/null || { echo "needs $tool (apt-get install nginx wrk bind9-dnsutils curl haproxy)" >&2; exit 1; }
done
WRK_MODE=()
case "$MODE" in
  keep-alive) ;;
  close) WRK_MODE=(-H 'Connection: close') ;;
  *) echo "MODE is keep-alive or close, not '$MODE'" >&2; exit 1 ;;
esac
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
trap cleanup EXIT

UP1=19021 UP2=19022
start_upstream $UP1 $UP2
declare -A PID URL
# start NAME BIN API_PORT DNS_PORT HTTP_PORT VIP_RANGE
start() {
  if [ "$2" = haproxy ]; then
    haproxy_http_conf "$5" $UP1 $UP2 > "$WORK/$1.cfg"
    haproxy -db -f "$WORK/$1.cfg" > "$WORK/$1.log" 2>&1 &
    PIDS+=($!)
    PID[$1]=$!
    URL[$1]="http://127.0.0.1:$5/"
    for _ in $(seq 1 50); do
      [ "$(curl -fsS --max-time 2 "${URL[$1]}" 2> /dev/null)" = ok ] && return
      sleep 0.2
    done
    echo "$1 (haproxy) does not answer 200 ok" >&2
    exit 1
  fi
  web_agent "$WORK/$1" "$1" "$3" "$4" "$5" "$6" $UP1 $UP2
  "$2" agent --config "$WORK/$1/agent.yaml" 2> "$WORK/$1.log" &
  PIDS+=($!)
  PID[$1]=$!
  local vip="" answer=""
  for _ in $(seq 1 100); do
    vip=$(dig +short +time=1 +tries=1 @127.0.0.1 -p "$4" web.service.internal A 2> /dev/null |
      grep -E '^[0-9.]+$' | head -n 1) || true
    [ -n "$vip" ] && answer=$(curl -fsS --max-time 2 "http://$vip:$5/" 2> /dev/null) || true
    [ "$answer" = ok ] && break
    sleep 0.2
  done
  [ "$answer" = ok ] || { echo "$1 ($2) does not answer 200 ok through its VIP" >&2; exit 1; }
  URL[$1]="http://$vip:$5/"
}
start A "$A" 19521 19621 19091 127.95.0.0/24
start B "$B" 19522 19622 19092 127.96.0.0/24

TICK=$(getconf CLK_TCK)
# run NAME: one wrk run against NAME; prints NAME, user and system µs per
# request, requests/s.
run() {
  local before after out
  before=$(cut -d' ' -f14,15 "/proc/${PID[$1]}/stat")
  out=$(wrk -t1 -c64 -d"${SECONDS_PER_RUN}s" "${WRK_MODE[@]}" "${URL[$1]}")
  after=$(cut -d' ' -f14,15 "/proc/${PID[$1]}/stat")
  echo "$out" | grep -q "Non-2xx" && { echo "$1: non-2xx answers" >&2; echo "$out" >&2; exit 1; }
  awk -v name="$1" -v b="$before" -v a="$after" -v t="$TICK" \
    -v n="$(echo "$out" | awk '/requests in/ { print $1 }')" \
    -v r="$(echo "$out" | awk '/Requests\/sec/ { print $2 }')" \
    'BEGIN { split(b, x, " "); split(a, y, " ");
             printf "%s %.2f %.2f %.0f\n", name, (y[1] - x[1]) * 1e6 / t / n, (y[2] - x[2]) * 1e6 / t / n, r }'
}
log "A: $A"
log "B: $B"
log "$MODE, wrk -t1 -c64, ${SECONDS_PER_RUN}s per run, $ROUNDS rounds"
RESULTS="$WORK/results"
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then order="A B"; else order="B A"; fi
  for name in $order; do
    line=$(run "$name")
    echo "$line" >> "$RESULTS"
    log "  round $round, $line"
  done
done
echo
echo "| $MODE, wrk -t1 -c64, ${SECONDS_PER_RUN}s, median of $ROUNDS | user µs per request | system µs per request | requests/s |"
echo "| --- | ---: | ---: | ---: |"
# median NAME FIELD: the median of FIELD over NAME's runs.
median() {
  awk -v name="$1" -v f="$2" '$1 == name { print $f }' "$RESULTS" | sort -n |
    awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
for name in A B; do
  echo "| $name | $(median "$name" 2) | $(median "$name" 3) | $(median "$name" 4) |"
done
# Round by round (each round's two runs): B's user CPU and requests/s
# against A's.
awk '{ cpu[$1, int((NR - 1) / 2)] = $2; rps[$1, int((NR - 1) / 2)] = $4 }
  END { for (i = 0; i < NR / 2; i++) print (cpu["B", i] < cpu["A", i]), (rps["B", i] > rps["A", i]), rps["B", i] / rps["A", i] }' \
  "$RESULTS" | sort -k3 -n > "$WORK/rounds"
awk '{ less += $1; more += $2; v[NR] = $3 }
  END {
    median = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "\nB took less user CPU than A in %d of %d rounds\n", less, NR
    printf "B served more requests/s than A in %d of %d rounds; median of the rounds\047 B/A: %.3f\n", more, NR, median
  }' "$WORK/rounds"
