#!/usr/bin/env bash
# The local proxy against HAProxy and nginx: the same two upstream HTTP
# instances (an nginx answering `200 ok\n` on two loopback ports) and one
# TCP upstream (an iperf3 server), reached four ways, interleaved within
# each measurement in this order:
#   direct     the client talks to the upstream itself (the first instance)
#   signpost   the agent's proxy: web.service.internal's VIP, on
#              proxy.http_port (balancing over both instances), and
#              bulk.service.internal's VIP for L4; every setting default
#              but the ports (so retries: 2, p2c_ewma)
#   haproxy    Debian's HAProxy 2.6: mode http, roundrobin, keep-alive to
#              the servers with `http-reuse always`; a mode tcp listener
#   nginx      Debian's nginx 1.22: upstream keepalive 64,
#              proxy_http_version 1.1; a stream listener for L4
# Measures:
#   - the most requests/s wrk (one thread, 64 connections) gets, with
#     keep-alive and with `Connection: close` (a new client connection per
#     request; the proxies keep theirs to the upstreams);
#   - latency p50/p99/p99.9 at fixed rates (oha, keep-alive, constant rate
#     with --latency-correction) and what each proxy adds to direct, with
#     the proxy's CPU time (utime + stime from /proc, all its processes)
#     per request over that run;
#   - L4 throughput: iperf3 pushes a fixed amount (4 GiB) through each, and
#     the proxy's CPU seconds per GiB;
#   - the proxies' peak RSS (VmHWM, summed over an nginx's processes; the
#     agent's includes its DNS server, API and checks) at the end.
# Non-2xx answers and socket errors are counted in every row (oha's
# "aborted due to deadline", the requests still in flight when a run
# ends, is not an error and is left out). Nothing is
# pinned: wrk/oha/iperf3, the proxy and the upstream share the machine's
# cores (2 on our machines), so the ceiling of each row is the sum of
# three programs' CPU, not the proxy's alone; compare rows of one run.
#
# Each HTTP row runs ROUNDS times (default 5), the targets interleaved
# within each round in an order that changes from round to round (so
# that no target always runs after the same one), and reports the
# median (and every round's value for requests/s): on a shared 2-core VM
# one run of one target swings by up to 20 %, more than the differences
# measured.
#
#   bash bench/proxy.sh [SECONDS]        # default 10 s per run: about 14 minutes, plus the build
# Needs: haproxy, nginx (with libnginx-mod-stream for its L4 row), wrk,
# iperf3, jq, dig, curl (apt-get install haproxy nginx libnginx-mod-stream
# wrk iperf3 jq bind9-dnsutils curl), and oha for the fixed-rate rows:
#   CARGO_TARGET_DIR=$HOME/.cache/signpost/oha-target nice -n 19 \
#     cargo install oha --locked --root $HOME/.cache/signpost/tools
# (without oha those rows are skipped, with a note); and what
# packaging/optimise.sh needs to build the agent as packaged (llvm-N,
# bolt-16). L4_BYTES=1G etc.
# changes the amount pushed per L4 run.
set -euo pipefail
SECONDS_PER_RUN=${1:-10}
L4_BYTES=${L4_BYTES:-4G}
RATES=${RATES:-"1000 5000"}
ROUNDS=${ROUNDS:-5}
cd "$(dirname "$0")/.."
# shellcheck source=bench/proxy-common.sh
. bench/proxy-common.sh
for tool in haproxy nginx wrk iperf3 jq dig curl; do
  command -v "$tool" > /dev/null || {
    echo "needs $tool (apt-get install haproxy nginx libnginx-mod-stream wrk iperf3 jq bind9-dnsutils curl)" >&2
    exit 1
  }
done
bench_start

# Ports, all on loopback.
UP1=19001 UP2=19002 BULK=19003          # upstreams: two HTTP instances, iperf3
HAPROXY_HTTP=19101 HAPROXY_TCP=19103
NGINX_HTTP=19201 NGINX_TCP=19203
SP_API=19500 SP_DNS=19600 SP_HTTP=19080 # the agent; its VIPs come from 127.99.0.0/24
STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so

# The upstreams: one nginx serving both HTTP instances; iperf3 for L4.
start_upstream $UP1 $UP2
iperf3 -s -B 127.0.0.1 -p $BULK > "$WORK/iperf3.log" 2>&1 &
PIDS+=($!)

# Signpost: web (http, both instances) and bulk (tcp), from a service file.
mkdir -p "$WORK/signpost/services.d"
cat > "$WORK/signpost/services.d/bench.yaml" <<YAML
services:
  - {name: web, id: web-1, address: 127.0.0.1, port: $UP1, protocol: http}
  - {name: web, id: web-2, address: 127.0.0.1, port: $UP2, protocol: http}
  - {name: bulk, id: bulk-1, address: 127.0.0.1, port: $BULK, protocol: tcp}
YAML
cat > "$WORK/signpost/agent.yaml" <<YAML
node_name: bench
data_dir: $WORK/signpost/data
services_dir: $WORK/signpost/services.d
advertise_addr: 127.0.0.1
api:
  listen: 127.0.0.1:$SP_API
dns:
  listen: 127.0.0.1:$SP_DNS
  recursors: []
proxy:
  vip_range: 127.99.0.0/24
  http_port: $SP_HTTP
  access_log: false
log:
  level: warn
YAML
"$BIN" agent --config "$WORK/signpost/agent.yaml" 2> "$WORK/agent.log" &
PIDS+=($!)
SIGNPOST_PID=$!

# HAProxy: one process, one thread per core (its default).
{
  haproxy_http_conf $HAPROXY_HTTP $UP1 $UP2
  cat <<CONF
listen bulk
  mode tcp
  bind 127.0.0.1:$HAPROXY_TCP
  server bulk-1 127.0.0.1:$BULK
CONF
} > "$WORK/haproxy.cfg"
haproxy -db -f "$WORK/haproxy.cfg" > "$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
HAPROXY_PID=$!

# nginx: one worker per core, pooled upstream connections.
NGINX_L4=no
{
  if [ -f "$STREAM_MODULE" ]; then
    echo "load_module $STREAM_MODULE;"
    NGINX_L4=yes
  fi
  nginx_conf "$WORK/nginx"
  echo "http {"
  nginx_http_common "$WORK/nginx"
  cat <<CONF
  upstream web {
    server 127.0.0.1:$UP1;
    server 127.0.0.1:$UP2;
    keepalive 64;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_HTTP;
    location / {
      proxy_pass http://web;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
  if [ $NGINX_L4 = yes ]; then
    echo "stream { server { listen 127.0.0.1:$NGINX_TCP; proxy_pass 127.0.0.1:$BULK; } }"
  fi
} > "$WORK/nginx.conf"
nginx -p "$WORK/nginx" -c "$WORK/nginx.conf" 2> "$WORK/nginx.log" &
PIDS+=($!)
NGINX_PID=$!

# The VIPs, from the agent's DNS (the lookup is what opens their listeners).
resolve() {
  local vip=""
  for _ in $(seq 1 100); do
    # Only an address: dig prints its errors (";; communications error
    # ...", while the agent starts) on stdout.
    vip=$(dig +short +time=1 +tries=1 @127.0.0.1 -p $SP_DNS "$1" A 2> /dev/null |
      grep -E '^[0-9.]+$' | head -n 1) || true
    [ -n "$vip" ] && break
    sleep 0.1
  done
  [ -n "$vip" ] || { echo "the agent does not resolve $1" >&2; exit 1; }
  echo "$vip"
}
WEB_VIP=$(resolve web.service.internal)
BULK_VIP=$(resolve bulk.service.internal)

TARGETS="direct signpost haproxy nginx"
declare -A HTTP_URL=(
  [direct]="http://127.0.0.1:$UP1/" [signpost]="http://$WEB_VIP:$SP_HTTP/"
  [haproxy]="http://127.0.0.1:$HAPROXY_HTTP/" [nginx]="http://127.0.0.1:$NGINX_HTTP/"
)
declare -A L4_ADDR=(
  [direct]="127.0.0.1 $BULK" [signpost]="$BULK_VIP $BULK" [haproxy]="127.0.0.1 $HAPROXY_TCP"
)
[ $NGINX_L4 = yes ] && L4_ADDR[nginx]="127.0.0.1 $NGINX_TCP"

# Every target answers 200 "ok" before measuring.
for t in $TARGETS; do
  ok=""
  for _ in $(seq 1 100); do
    ok=$(curl -fsS --max-time 1 "${HTTP_URL[$t]}" 2> /dev/null) || true
    [ "$ok" = ok ] && break
    sleep 0.1
  done
  [ "$ok" = ok ] || { echo "$t (${HTTP_URL[$t]}) does not answer 200 ok" >&2; exit 1; }
done
log "web VIP $WEB_VIP:$SP_HTTP, bulk VIP $BULK_VIP:$BULK; all answer"

# pids TARGET -> the processes whose CPU and memory count as the proxy's.
pids() {
  case $1 in
    signpost) echo $SIGNPOST_PID ;;
    haproxy) echo $HAPROXY_PID ;;
    nginx) echo $NGINX_PID $(pgrep -P $NGINX_PID) ;;
    *) ;;
  esac
}
# cpu_ticks PID... -> utime + stime, in clock ticks.
cpu_ticks() {
  local total=0 p
  for p in "$@"; do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo $total
}
HZ=$(getconf CLK_TCK)

# wrk_run URL [wrk args] -> "requests/s non_2xx socket_errors"
wrk_run() {
  local url=$1
  shift
  wrk -t1 -c64 -d"${SECONDS_PER_RUN}s" "$@" "$url" 2>&1 | awk '
    /^Requests\/sec:/ { rps = $2 }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    /Socket errors:/ { gsub(",", ""); errors = $4 + $6 + $8 + $10 }
    END { printf "%.0f %d %d\n", rps, non2xx, errors }'
}

# Warm-up: pools filled, VIP listeners used once, the page cache warm.
for t in $TARGETS; do
  wrk -t1 -c64 -d2s "${HTTP_URL[$t]}" > /dev/null 2>&1
done

us() { awk -v s="$1" 'BEGIN { printf "%.0f", s * 1e6 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else printf "-" }'; }
# median VALUE... -> the middle value (the mean of the two middle ones for
# an even count); "-" when the values are "-".
median() {
  [ "$1" = - ] && { echo -; return; }
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# in_round ROUND -> the targets in the order of that round: rotated by
# one more each round, and reversed in even rounds, so that each target
# follows different ones (a rotation alone keeps the cyclic order).
in_round() {
  local -a all
  read -r -a all <<< "$TARGETS"
  local n=${#all[@]} i
  for ((i = 0; i < n; i++)); do
    if (($1 % 2)); then
      printf '%s ' "${all[$(((i + $1 - 1) % n))]}"
    else
      printf '%s ' "${all[$(((n - 1 - i + $1 - 1) % n))]}"
    fi
  done
}

log "max requests/s (wrk -t1 -c64, ${SECONDS_PER_RUN}s per run, $ROUNDS rounds)"
declare -A RPS RPS_ALL NON2XX ERRS
for mode in keep-alive close; do
  for round in $(seq 1 "$ROUNDS"); do
    for t in $(in_round "$round"); do
      if [ $mode = close ]; then
        read -r rps n e < <(wrk_run "${HTTP_URL[$t]}" -H 'Connection: close')
      else
        read -r rps n e < <(wrk_run "${HTTP_URL[$t]}")
      fi
      RPS_ALL[$mode.$t]="${RPS_ALL[$mode.$t]:-} $rps"
      NON2XX[$mode.$t]=$((${NON2XX[$mode.$t]:-0} + n)) ERRS[$mode.$t]=$((${ERRS[$mode.$t]:-0} + e))
      log "  $mode, round $round, $t: $rps req/s, $n non-2xx, $e socket errors"
    done
  done
  for t in $TARGETS; do
    # shellcheck disable=SC2086 # the rounds' values, one argument each
    RPS[$mode.$t]=$(median ${RPS_ALL[$mode.$t]})
  done
done

# Fixed rates (oha, keep-alive): latency percentiles and proxy CPU per
# request over the run.
declare -A P50 P99 P999 ACHIEVED CPU_REQ LAT_NON2XX LAT_ERRS
# Every round's values, medians taken after the last round.
declare -A R_P50 R_P99 R_P999 R_ACHIEVED R_CPU
if [ -n "$OHA" ]; then
  for rate in $RATES; do
   for round in $(seq 1 "$ROUNDS"); do
    log "latency at $rate req/s (oha, ${SECONDS_PER_RUN}s per run), round $round of $ROUNDS"
    for t in $(in_round "$round"); do
      read -r -a procs <<< "$(pids $t)"
      t0=0
      [ ${#procs[@]} -gt 0 ] && t0=$(cpu_ticks "${procs[@]}")
      "$OHA" -q "$rate" -z "${SECONDS_PER_RUN}s" -c 32 --latency-correction --no-tui \
        --output-format json "${HTTP_URL[$t]}" > "$WORK/oha.json" 2> "$WORK/oha.err"
      t1=0
      [ ${#procs[@]} -gt 0 ] && t1=$(cpu_ticks "${procs[@]}")
      read -r p50 p99 p999 achieved ok non2xx errs aborted < <(jq -r '
        [ .latencyPercentiles.p50, .latencyPercentiles.p99, .latencyPercentiles["p99.9"],
          .summary.requestsPerSec,
          ([.statusCodeDistribution | to_entries[] | select(.key | startswith("2")) | .value] | add // 0),
          ([.statusCodeDistribution | to_entries[] | select(.key | startswith("2") | not) | .value] | add // 0),
          ([.errorDistribution | to_entries[] | select(.key != "aborted due to deadline") | .value] | add // 0),
          (.errorDistribution["aborted due to deadline"] // 0) ]
        | map(tostring) | join(" ")' "$WORK/oha.json")
      key=$rate.$t
      cpu=-
      if [ ${#procs[@]} -gt 0 ]; then
        cpu=$(awk -v a="$t0" -v b="$t1" -v n="$((ok + non2xx))" -v hz="$HZ" \
          'BEGIN { if (n > 0) printf "%.1f", (b - a) * 1e6 / hz / n; else printf "-" }')
      fi
      R_P50[$key]="${R_P50[$key]:-} $p50" R_P99[$key]="${R_P99[$key]:-} $p99" R_P999[$key]="${R_P999[$key]:-} $p999"
      R_ACHIEVED[$key]="${R_ACHIEVED[$key]:-} $achieved" R_CPU[$key]="${R_CPU[$key]:-} $cpu"
      LAT_NON2XX[$key]=$((${LAT_NON2XX[$key]:-0} + non2xx)) LAT_ERRS[$key]=$((${LAT_ERRS[$key]:-0} + errs))
      log "  $t: p50 $p50 s, p99 $p99 s, p99.9 $p999 s, $ok ok, $non2xx non-2xx, $errs errors" \
        "($aborted in flight at the end), CPU $cpu us/req"
      if [ "$errs" != 0 ]; then
        jq -c .errorDistribution "$WORK/oha.json" >&2
      fi
    done
   done
    for t in $TARGETS; do
      key=$rate.$t
      # shellcheck disable=SC2086 # the rounds' values, one argument each
      P50[$key]=$(median ${R_P50[$key]}) P99[$key]=$(median ${R_P99[$key]}) P999[$key]=$(median ${R_P999[$key]})
      # shellcheck disable=SC2086
      ACHIEVED[$key]=$(median ${R_ACHIEVED[$key]}) CPU_REQ[$key]=$(median ${R_CPU[$key]})
    done
  done
else
  log "no oha: the fixed-rate rows are skipped (see the header of this script to install it)"
fi

# L4: a fixed amount through each, one stream.
declare -A L4_MBS L4_CPU
log "L4 throughput (iperf3 -n $L4_BYTES)"
for t in $TARGETS; do
  [ -n "${L4_ADDR[$t]:-}" ] || continue
  read -r host port <<< "${L4_ADDR[$t]}"
  read -r -a procs <<< "$(pids $t)"
  t0=0
  [ ${#procs[@]} -gt 0 ] && t0=$(cpu_ticks "${procs[@]}")
  iperf3 -c "$host" -p "$port" -n "$L4_BYTES" -J > "$WORK/iperf3.json" 2> "$WORK/iperf3.err" || true
  t1=0
  [ ${#procs[@]} -gt 0 ] && t1=$(cpu_ticks "${procs[@]}")
  err=$(jq -r '.error // empty' "$WORK/iperf3.json" 2> /dev/null || echo "no JSON from iperf3")
  if [ -n "$err" ]; then
    log "  $t: iperf3 failed: $err"
    L4_MBS[$t]=- L4_CPU[$t]=-
    continue
  fi
  read -r bytes bps < <(jq -r '[.end.sum_received.bytes, .end.sum_received.bits_per_second] | map(tostring) | join(" ")' "$WORK/iperf3.json")
  L4_MBS[$t]=$(awk -v b="$bps" 'BEGIN { printf "%.0f", b / 8 / 1e6 }')
  if [ ${#procs[@]} -gt 0 ]; then
    L4_CPU[$t]=$(awk -v a="$t0" -v b="$t1" -v n="$bytes" -v hz="$HZ" 'BEGIN { printf "%.2f", (b - a) / hz / (n / 2^30) }')
  else
    L4_CPU[$t]=-
  fi
  log "  $t: ${L4_MBS[$t]} MB/s, CPU ${L4_CPU[$t]} s/GiB"
done

declare -A RSS
for t in signpost haproxy nginx; do
  read -r -a procs <<< "$(pids $t)"
  RSS[$t]=$(for p in "${procs[@]}"; do awk '/^VmHWM:/ {print $2}' "/proc/$p/status"; done |
    awk '{ s += $1 } END { printf "%.1f", s / 1024 }')
done

echo
echo "| wrk -t1 -c64, ${SECONDS_PER_RUN}s, median of $ROUNDS | target | requests/s | each round | non-2xx | socket errors | vs direct | vs haproxy |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for mode in keep-alive close; do
  for t in $TARGETS; do
    k=$mode.$t
    echo "| $mode | $t | $(printf %.0f "${RPS[$k]}") |${RPS_ALL[$k]} | ${NON2XX[$k]} | ${ERRS[$k]} | $(ratio "${RPS[$k]}" "${RPS[$mode.direct]}") | $(ratio "${RPS[$k]}" "${RPS[$mode.haproxy]}") |"
  done
done

if [ -n "$OHA" ]; then
  echo
  echo "| oha keep-alive, -c 32, ${SECONDS_PER_RUN}s, medians of $ROUNDS | target | achieved req/s | p50 (µs) | p99 (µs) | p99.9 (µs) | added p50 / p99 / p99.9 (µs) | proxy CPU per request (µs) | CPU vs haproxy | non-2xx | errors |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for rate in $RATES; do
    d=$rate.direct
    for t in $TARGETS; do
      k=$rate.$t
      if [ $t = direct ]; then
        added="-"
      else
        added="$(awk -v a="${P50[$k]}" -v b="${P50[$d]}" -v c="${P99[$k]}" -v e="${P99[$d]}" -v f="${P999[$k]}" -v g="${P999[$d]}" \
          'BEGIN { printf "%+.0f / %+.0f / %+.0f", (a - b) * 1e6, (c - e) * 1e6, (f - g) * 1e6 }')"
      fi
      cpu_ratio=-
      [ "${CPU_REQ[$k]}" != - ] && cpu_ratio=$(ratio "${CPU_REQ[$k]}" "${CPU_REQ[$rate.haproxy]}")
      echo "| $rate req/s | $t | $(printf %.0f "${ACHIEVED[$k]}") | $(us "${P50[$k]}") | $(us "${P99[$k]}") | $(us "${P999[$k]}") | $added | ${CPU_REQ[$k]} | $cpu_ratio | ${LAT_NON2XX[$k]} | ${LAT_ERRS[$k]} |"
    done
  done
else
  echo
  echo "(no fixed-rate rows: oha is not installed; see the header of bench/proxy.sh)"
fi

echo
echo "| L4, iperf3 -n $L4_BYTES, one stream | target | MB/s | vs direct | vs haproxy | proxy CPU (s per GiB) |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
for t in $TARGETS; do
  [ -n "${L4_MBS[$t]:-}" ] || continue
  echo "| L4 | $t | ${L4_MBS[$t]} | $(ratio "${L4_MBS[$t]}" "${L4_MBS[direct]}") | $(ratio "${L4_MBS[$t]}" "${L4_MBS[haproxy]:-0}") | ${L4_CPU[$t]} |"
done

echo
echo "| peak RSS (VmHWM) after all runs | MiB | vs haproxy |"
echo "| --- | ---: | ---: |"
for t in signpost haproxy nginx; do
  echo "| $t | ${RSS[$t]} | $(ratio "${RSS[$t]}" "${RSS[haproxy]}") |"
done

# What the agent counted: requests per instance (both get traffic) and
# status class, retries, errors, ejections.
echo
echo "agent proxy counters:"
curl -fsS --max-time 2 "http://127.0.0.1:$SP_API/metrics" |
  grep -E '^[a-z_]*proxy_(requests|retries|retry_budget_exhausted|errors|ejections)[a-z_]*[{ ]' |
  grep -v '_created' | sed 's/^/    /' || echo "    (none)"

# What the agent logged (warn and above) during the runs.
if [ -s "$WORK/agent.log" ]; then
  echo "agent log: $(wc -l < "$WORK/agent.log") lines (warn and above); the last ones:"
  tail -n 10 "$WORK/agent.log" | sed 's/^/    /'
else
  echo "agent log: nothing at warn or above"
fi
