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
#   RATE=1000 ROUNDS=20 bash bench/proxy-ab.sh BIN haproxy   # latency at a fixed rate
# Prints each run and the medians, and in how many rounds B took less
# user CPU than A and served more requests/s, with the median of the
# rounds' requests/s ratios. With RATE, oha sends that many requests/s
# (-c 32, --latency-correction, as bench/proxy.sh) instead of wrk's
# most, and the latency percentiles are printed too, with in how many
# rounds B's p99 was lower than A's and the median of the rounds' B - A
# p99: as both are in front of the same upstream, a round at a time, that
# is the difference of what each adds to it. Needs: nginx, wrk (oha and jq
# with RATE), dig, curl (haproxy).
set -euo pipefail
A=${1:?usage: proxy-ab.sh BIN_A BIN_B}
B=${2:?usage: proxy-ab.sh BIN_A BIN_B}
ROUNDS=${ROUNDS:-10}
MODE=${MODE:-keep-alive}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
RATE=${RATE:-}
cd "$(dirname "$0")/.."
# shellcheck source=bench/proxy-common.sh
. bench/proxy-common.sh
if [ -n "$RATE" ]; then
  [ -n "$OHA" ] || { echo "RATE needs oha (see the header of bench/proxy.sh to install it)" >&2; exit 1; }
  command -v jq > /dev/null || { echo "RATE needs jq (apt-get install jq)" >&2; exit 1; }
fi
for tool in nginx wrk dig curl $([ "$A" = haproxy ] || [ "$B" = haproxy ] && echo haproxy); do
  command -v "$tool" > /dev/null || { echo "needs $tool (apt-get install nginx wrk bind9-dnsutils curl haproxy)" >&2; exit 1; }
done
WRK_MODE=() OHA_MODE=()
case "$MODE" in
  keep-alive) ;;
  close) WRK_MODE=(-H 'Connection: close') OHA_MODE=(--disable-keepalive) ;;
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
# run NAME: one wrk run (or oha run with RATE) against NAME; prints NAME,
# user and system µs per request, requests/s (with RATE also p50, p99 and
# p99.9 in µs).
run() {
  local before after out n r lat=""
  before=$(cut -d' ' -f14,15 "/proc/${PID[$1]}/stat")
  if [ -n "$RATE" ]; then
    "$OHA" -q "$RATE" -z "${SECONDS_PER_RUN}s" -c 32 --latency-correction --no-tui \
      "${OHA_MODE[@]}" --output-format json "${URL[$1]}" > "$WORK/oha.json" 2> "$WORK/oha.err"
    after=$(cut -d' ' -f14,15 "/proc/${PID[$1]}/stat")
    read -r n r lat bad < <(jq -r '
      [ ([.statusCodeDistribution | to_entries[] | .value] | add // 0), .summary.requestsPerSec,
        ([.latencyPercentiles.p50, .latencyPercentiles.p99, .latencyPercentiles["p99.9"]]
          | map(. * 1e6 | round | tostring) | join(",")),
        (([.statusCodeDistribution | to_entries[] | select(.key | startswith("2") | not) | .value] | add // 0)
          + ([.errorDistribution | to_entries[] | select(.key != "aborted due to deadline") | .value] | add // 0)) ]
      | map(tostring) | join(" ")' "$WORK/oha.json")
    [ "$bad" = 0 ] || { echo "$1: $bad non-2xx answers or errors" >&2; jq -c '.statusCodeDistribution, .errorDistribution' "$WORK/oha.json" >&2; exit 1; }
    lat=${lat//,/ }
  else
    out=$(wrk -t1 -c64 -d"${SECONDS_PER_RUN}s" "${WRK_MODE[@]}" "${URL[$1]}")
    after=$(cut -d' ' -f14,15 "/proc/${PID[$1]}/stat")
    echo "$out" | grep -q "Non-2xx" && { echo "$1: non-2xx answers" >&2; echo "$out" >&2; exit 1; }
    n=$(echo "$out" | awk '/requests in/ { print $1 }')
    r=$(echo "$out" | awk '/Requests\/sec/ { print $2 }')
  fi
  awk -v name="$1" -v b="$before" -v a="$after" -v t="$TICK" -v n="$n" -v r="$r" -v lat="$lat" \
    'BEGIN { split(b, x, " "); split(a, y, " ");
             printf "%s %.2f %.2f %.0f%s\n", name, (y[1] - x[1]) * 1e6 / t / n, (y[2] - x[2]) * 1e6 / t / n, r, (lat == "" ? "" : " " lat) }'
}
log "A: $A"
log "B: $B"
if [ -n "$RATE" ]; then
  LOAD="oha -q $RATE -c 32"
else
  LOAD="wrk -t1 -c64"
fi
log "$MODE, $LOAD, ${SECONDS_PER_RUN}s per run, $ROUNDS rounds"
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
# mid: the median of the numbers on stdin, one a line.
mid() {
  sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# median NAME FIELD: the median of FIELD over NAME's runs.
median() {
  awk -v name="$1" -v f="$2" '$1 == name { print $f }' "$RESULTS" | mid
}
HEAD="| $MODE, $LOAD, ${SECONDS_PER_RUN}s, median of $ROUNDS | user µs per request | system µs per request | requests/s |"
RULE="| --- | ---: | ---: | ---: |"
FIELDS="2 3 4"
if [ -n "$RATE" ]; then
  HEAD="$HEAD p50 (µs) | p99 (µs) | p99.9 (µs) |" RULE="$RULE ---: | ---: | ---: |" FIELDS="2 3 4 5 6 7"
fi
echo "$HEAD"
echo "$RULE"
for name in A B; do
  row="| $name |"
  for f in $FIELDS; do row="$row $(median "$name" "$f") |"; done
  echo "$row"
done
# Round by round (each round's two runs), B against A: took less user
# CPU, served more requests/s, requests/s ratio, p99 lower, p99
# difference (the last two with RATE).
awk '{ r = int((NR - 1) / 2); cpu[$1, r] = $2; rps[$1, r] = $4; p99[$1, r] = $6 }
  END { for (i = 0; i < NR / 2; i++)
          print (cpu["B", i] < cpu["A", i]), (rps["B", i] > rps["A", i]), rps["B", i] / rps["A", i],
            (p99["B", i] < p99["A", i]), p99["B", i] - p99["A", i] }' "$RESULTS" > "$WORK/rounds"
# count FIELD: in how many rounds FIELD is 1.
count() { awk -v f="$1" '{ n += $f } END { print n + 0 }' "$WORK/rounds"; }
N=$(wc -l < "$WORK/rounds")
echo
echo "B took less user CPU than A in $(count 1) of $N rounds"
if [ -n "$RATE" ]; then
  printf "B's p99 was lower than A's in %d of %d rounds; median of the rounds' B - A p99: %+.0f µs\n" \
    "$(count 4)" "$N" "$(cut -d' ' -f5 "$WORK/rounds" | mid)"
else
  printf "B served more requests/s than A in %d of %d rounds; median of the rounds' B/A: %.3f\n" \
    "$(count 2)" "$N" "$(cut -d' ' -f3 "$WORK/rounds" | mid)"
fi
