#!/usr/bin/env bash
# A meshed call between two hosts against its peers, on one machine in one
# run. Two agents stand for two hosts (advertise addresses 127.0.0.2, the
# consumer, and 127.0.0.3, the provider) with a control plane that gives
# them their mesh certificates; one nginx answering `200 ok\n` on two
# loopback ports is the upstream (start_upstream). Four paths:
#   signpost-mesh       client -> the consumer agent's proxy (web's VIP on
#                       proxy.http_port) -> mutual TLS 1.3, HTTP/2 ->
#                       the provider agent's inbound listener -> nginx
#                       (`web`, registered on the provider with
#                       `connect: true`; the consumer calls as `load`, the
#                       one service registered on it)
#   signpost-plain      client -> the consumer's proxy (web-plain's VIP)
#                       -> nginx: the same upstream registered on the
#                       provider without connect, one plaintext hop (the
#                       path without the mesh)
#   haproxy-plain-2hop  client -> HAProxy A -> HAProxy B -> nginx, all
#                       plaintext HTTP/1.1, keep-alive, http-reuse always
#   haproxy-tls-2hop    the same two with TLS between them: A dials B with
#                       a client certificate, verifying B's (`ssl verify
#                       required ... crt client.pem alpn h2`: HTTP/2
#                       between them, as between the agents), B requires
#                       and verifies A's; certificates (ECDSA P-256, as
#                       the mesh's) from a CA made here with openssl; TLS
#                       session reuse at HAProxy's default (on)
# The two HAProxy pairs are separate processes (four in all), each with
# HAProxy's default threads (one per core); the agents' proxies use one
# thread per core too.
# Measures, every target in each round, in an order that changes from
# round to round, ROUNDS rounds (default 5), medians:
#   - the most requests/s wrk (one thread, 64 connections) gets, with
#     keep-alive and with `Connection: close` (a new client connection per
#     request; the proxies keep theirs to each other and to nginx);
#   - CPU per request over each of those runs: utime + stime from /proc of
#     the row's two proxy processes (both agents, whose DNS, API and
#     checks idle meanwhile, for the Signpost rows; both HAProxies for the
#     HAProxy rows), divided by the requests wrk counted;
#   - latency: p50/p99 at fixed rates (RATES, default "1000 5000"; oha,
#     keep-alive, constant rate with --latency-correction, as in
#     bench/proxy.sh) and what each path adds to a direct call, with the
#     CPU per request at that rate; without oha, only wrk's p50/p99 at max
#     load (its --latency, which a saturating load dominates; said so in
#     the output);
#   - the mesh handshakes each agent counted over the whole run
#     (signpost_agent_proxy_mesh_handshakes_total, full and resumed, and
#     any failures), from the agents' /metrics, and those during the
#     signpost-mesh runs. The consumer closes mesh connections idle for
#     proxy.pool_idle_timeout (3 s), so a signpost-mesh run that follows
#     the other targets' runs starts with none open: the handshakes
#     counted in it are those of that start, the steady state needing
#     none.
#   - how long an intention change takes to be in force: written on the
#     control plane, to the first call through the consumer that obeys it
#     (PROPAGATION_CHANGES denies and as many allows, default 20 each).
# Ratios are against haproxy-tls-2hop, the mesh's closest peer. Nothing is
# pinned: wrk, the proxies and nginx share the machine's cores, so compare
# rows of one run.
#
#   bash bench/mesh.sh [SECONDS]     # default 10 s per run: about 15 minutes with oha (7 without), plus the build
#   ROUNDS=1 RATES=2000 bash bench/mesh.sh 2
#   BIN=path/to/signpost CP_BIN=path/to/signpost-control-plane bash bench/mesh.sh
# BIN and CP_BIN use binaries already built; otherwise the agent is built
# as packaged (packaging/optimise.sh, as bench/proxy.sh) and the control
# plane with cargo build --release.
# Needs: haproxy, nginx, wrk, openssl, jq, dig, curl (apt-get install
# haproxy nginx wrk openssl jq bind9-dnsutils curl), and oha for the
# fixed-rate rows (see bench/proxy.sh's header).
# Ports, all on loopback: 19701-19702 (nginx), 19710-19714 (the consumer
# agent), 19720-19724 (the provider agent), 19730-19731 (the control
# plane), 19740-19743 (HAProxy); VIPs from 127.93.0.0/24 and
# 127.94.0.0/24.
set -euo pipefail
SECONDS_PER_RUN=${1:-10}
RATES=${RATES:-"1000 5000"}
ROUNDS=${ROUNDS:-5}
cd "$(dirname "$0")/.."
# shellcheck source=bench/proxy-common.sh disable=SC1091 # followed with -x
. bench/proxy-common.sh
missing=()
for tool in haproxy nginx wrk openssl jq dig curl; do
  command -v "$tool" > /dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "needs ${missing[*]} (apt-get install haproxy nginx wrk openssl jq bind9-dnsutils curl)" >&2
  exit 1
fi

# The binaries: as given, else built (the agent as packaged, as
# bench_start does; the control plane as bench/commands.sh builds it).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
if [ -z "${BIN:-}" ]; then
  bash packaging/optimise.sh
  BIN="$CARGO_TARGET_DIR/release/signpost"
fi
if [ -z "${CP_BIN:-}" ]; then
  cargo build --release -q -p signpost-control-plane --bin signpost-control-plane
  CP_BIN="$CARGO_TARGET_DIR/release/signpost-control-plane"
fi
for b in "$BIN" "$CP_BIN"; do
  [ -x "$b" ] || { echo "$b: not an executable" >&2; exit 1; }
done
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
trap cleanup EXIT

UP1=19701 UP2=19702                     # nginx: web (meshed), web-plain
C_ADDR=127.0.0.2 C_API=19710 C_DNS=19711 C_HTTP=19712 C_LIVE=19713 C_INBOUND=19714
P_ADDR=127.0.0.3 P_API=19720 P_DNS=19721 P_HTTP=19722 P_LIVE=19723 P_INBOUND=19724
CP_GRPC=19730 CP_HTTP=19731
HA_PLAIN_A=19740 HA_PLAIN_B=19741 HA_TLS_A=19742 HA_TLS_B=19743
TOKEN=bench-agent-token

start_upstream $UP1 $UP2

# The control plane: its mesh CA is made at its first start.
cat > "$WORK/cp.yaml" <<YAML
data_dir: $WORK/cp
grpc:
  listen: 127.0.0.1:$CP_GRPC
http:
  listen: 127.0.0.1:$CP_HTTP
  plaintext: true   # loopback only: read with plain curl
agent_tokens: [$TOKEN]
log:
  level: warn
YAML
"$CP_BIN" --config "$WORK/cp.yaml" init-tls > /dev/null
"$CP_BIN" --config "$WORK/cp.yaml" 2> "$WORK/cp.log" &
PIDS+=($!)
ok=""
for _ in $(seq 1 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$CP_HTTP/v1/nodes" && { ok=yes; break; }
  sleep 0.1
done
[ -n "$ok" ] || { echo "the control plane does not answer on 127.0.0.1:$CP_HTTP" >&2; exit 1; }

# mesh_agent NAME ADDR API DNS HTTP LIVENESS INBOUND VIP_RANGE MESH_EXTRA:
# an agent's configuration in WORK/NAME (its services in WORK/NAME/services.d).
mesh_agent() {
  mkdir -p "$WORK/$1/services.d"
  cat > "$WORK/$1/agent.yaml" <<YAML
node_name: $1
data_dir: $WORK/$1/data
services_dir: $WORK/$1/services.d
advertise_addr: $2
liveness_port: $6
api: {listen: "127.0.0.1:$3"}
dns: {listen: "127.0.0.1:$4", recursors: []}
proxy: {vip_range: $8, http_port: $5, access_log: false}
mesh: {inbound_port: $7$9}
log: {level: warn}
control_plane:
  addresses: ["127.0.0.1:$CP_GRPC"]
  ca_file: $WORK/cp/tls/ca.pem
  token: $TOKEN
  http: http://127.0.0.1:$CP_HTTP
YAML
}
# The consumer: the load generator calls as `load`, the one service here
# (its source address, 127.0.0.1, is no service's own).
mesh_agent consumer $C_ADDR $C_API $C_DNS $C_HTTP $C_LIVE $C_INBOUND 127.93.0.0/24 ", default_source: load"
cat > "$WORK/consumer/services.d/load.yaml" <<YAML
services:
  - {name: load, id: load-1, port: 9999}
YAML
# The provider: the same nginx as web (meshed) and web-plain (not).
mesh_agent provider $P_ADDR $P_API $P_DNS $P_HTTP $P_LIVE $P_INBOUND 127.94.0.0/24 ""
cat > "$WORK/provider/services.d/web.yaml" <<YAML
services:
  - {name: web, id: web-1, address: 127.0.0.1, port: $UP1, protocol: http, connect: true}
  - {name: web-plain, id: web-plain-1, address: 127.0.0.1, port: $UP2, protocol: http, connect: false}
YAML
"$BIN" agent --config "$WORK/consumer/agent.yaml" 2> "$WORK/consumer.log" &
PIDS+=($!)
CONSUMER_PID=$!
"$BIN" agent --config "$WORK/provider/agent.yaml" 2> "$WORK/provider.log" &
PIDS+=($!)
PROVIDER_PID=$!

# HAProxy: certificates (a CA; B's server certificate for haproxy-b, A's
# client certificate), then the two pairs.
TLS=$WORK/tls
mkdir -p "$TLS"
ec_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2> /dev/null; }
ec_key "$TLS/ca-key.pem"
openssl req -x509 -new -key "$TLS/ca-key.pem" -subj /CN=bench-ca -days 2 \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
  -out "$TLS/ca.pem" 2> /dev/null
# leaf NAME EXTENDED_KEY_USAGE -> TLS/NAME.pem: certificate and key.
leaf() {
  ec_key "$TLS/$1-key.pem"
  openssl req -new -key "$TLS/$1-key.pem" -subj "/CN=haproxy-$1" -out "$TLS/$1.csr" 2> /dev/null
  printf 'subjectAltName=DNS:haproxy-%s\nextendedKeyUsage=%s\nkeyUsage=critical,digitalSignature\n' "$1" "$2" > "$TLS/$1.ext"
  openssl x509 -req -in "$TLS/$1.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca-key.pem" -set_serial "0x$(openssl rand -hex 8)" \
    -days 2 -extfile "$TLS/$1.ext" -out "$TLS/$1-cert.pem" 2> /dev/null
  cat "$TLS/$1-cert.pem" "$TLS/$1-key.pem" > "$TLS/$1.pem"
}
leaf b serverAuth
leaf a clientAuth

# haproxy_hop BIND SERVER -> one hop: mode http, keep-alive, http-reuse
# always (the defaults of haproxy_http_conf), everything from BIND to
# SERVER (the rest of their `bind` and `server` lines).
haproxy_hop() {
  cat <<CONF
global
  maxconn 8000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 75s
frontend hop
  bind $1
  default_backend next
backend next
  server next $2
CONF
}
# start_haproxy NAME BIND SERVER -> its pid in HAPROXY_PID[NAME].
declare -A HAPROXY_PID
start_haproxy() {
  haproxy_hop "$2" "$3" > "$WORK/haproxy-$1.cfg"
  haproxy -db -f "$WORK/haproxy-$1.cfg" > "$WORK/haproxy-$1.log" 2>&1 &
  PIDS+=($!)
  HAPROXY_PID[$1]=$!
}
start_haproxy plain-b "127.0.0.1:$HA_PLAIN_B" "127.0.0.1:$UP1"
start_haproxy plain-a "127.0.0.1:$HA_PLAIN_A" "127.0.0.1:$HA_PLAIN_B"
start_haproxy tls-b "127.0.0.1:$HA_TLS_B ssl crt $TLS/b.pem verify required ca-file $TLS/ca.pem alpn h2,http/1.1" \
  "127.0.0.1:$UP1"
start_haproxy tls-a "127.0.0.1:$HA_TLS_A" \
  "127.0.0.1:$HA_TLS_B ssl verify required ca-file $TLS/ca.pem verifyhost haproxy-b sni str(haproxy-b) crt $TLS/a.pem alpn h2"

# The agents up, then the VIPs from the consumer's DNS (the lookup is
# what opens their listeners).
for api in $C_API $P_API; do
  ok=""
  for _ in $(seq 1 300); do
    curl -sf -o /dev/null "http://127.0.0.1:$api/v1/status/leader" && { ok=yes; break; }
    sleep 0.1
  done
  [ -n "$ok" ] || { echo "the agent with its API on 127.0.0.1:$api does not answer" >&2; exit 1; }
done
resolve() {
  local vip=""
  for _ in $(seq 1 300); do
    vip=$(dig +short +time=1 +tries=1 @127.0.0.1 -p $C_DNS "$1" A 2> /dev/null |
      grep -E '^[0-9.]+$' | head -n 1) || true
    [ -n "$vip" ] && break
    sleep 0.1
  done
  [ -n "$vip" ] || { echo "the consumer agent does not resolve $1" >&2; exit 1; }
  echo "$vip"
}
WEB_VIP=$(resolve web.service.internal)
PLAIN_VIP=$(resolve web-plain.service.internal)

TARGETS="signpost-mesh signpost-plain haproxy-plain-2hop haproxy-tls-2hop"
REF=haproxy-tls-2hop
declare -A URL=(
  [direct]="http://127.0.0.1:$UP1/"
  [signpost-mesh]="http://$WEB_VIP:$C_HTTP/" [signpost-plain]="http://$PLAIN_VIP:$C_HTTP/"
  [haproxy-plain-2hop]="http://127.0.0.1:$HA_PLAIN_A/" [haproxy-tls-2hop]="http://127.0.0.1:$HA_TLS_A/"
)

# Every target answers 200 "ok" before measuring (the mesh once both
# agents have their certificates: up to a minute).
for t in direct $TARGETS; do
  ok=""
  for _ in $(seq 1 600); do
    ok=$(curl -fsS --max-time 1 "${URL[$t]}" 2> /dev/null) || true
    [ "$ok" = ok ] && break
    sleep 0.1
  done
  if [ "$ok" != ok ]; then
    echo "$t (${URL[$t]}) does not answer 200 ok; what it answers:" >&2
    curl -sS -i --max-time 2 "${URL[$t]}" >&2 || true
    exit 1
  fi
done
log "web VIP $WEB_VIP:$C_HTTP (meshed), web-plain VIP $PLAIN_VIP:$C_HTTP; all answer"

# What HAProxy A and B speak to each other: B offers h2 and A asks for it
# alone, so ALPN settles on h2 (else the handshake, and every request,
# would fail).
openssl s_client -connect "127.0.0.1:$HA_TLS_B" -servername haproxy-b -alpn h2 \
  -cert "$TLS/a-cert.pem" -key "$TLS/a-key.pem" -CAfile "$TLS/ca.pem" < /dev/null > "$TLS/s_client.out" 2>&1 || true
alpn=$(sed -n 's/^ALPN protocol: //p' "$TLS/s_client.out")
log "HAProxy B negotiates ALPN '${alpn:-none}' with A's certificate," \
  "$(sed -n 's/^New, //p' "$TLS/s_client.out" | head -n 1)"
[ "$alpn" = h2 ] || { echo "HAProxy B does not negotiate h2" >&2; exit 1; }

# pids TARGET -> the processes whose CPU counts as the path's.
pids() {
  case $1 in
    signpost-*) echo "$CONSUMER_PID $PROVIDER_PID" ;;
    haproxy-plain-2hop) echo "${HAPROXY_PID[plain-a]} ${HAPROXY_PID[plain-b]}" ;;
    haproxy-tls-2hop) echo "${HAPROXY_PID[tls-a]} ${HAPROXY_PID[tls-b]}" ;;
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

# metric_lines API NAME -> the agent's series of the metric NAME.
metric_lines() { curl -fsS --max-time 2 "http://127.0.0.1:$1/metrics" | grep -E "^$2[{ ]" || true; }
# label NAME SERIES -> the value of the label NAME in SERIES.
label() { sed -n "s/.*$1=\"\([^\"]*\)\".*/\1/p" <<< "$2"; }
# mesh_handshakes API -> "full resumed": the mesh handshakes the agent
# counted so far, both sides.
mesh_handshakes() {
  metric_lines "$1" signpost_agent_proxy_mesh_handshakes_total |
    awk '/resumed="true"/ { r += $NF; next } { f += $NF } END { printf "%d %d\n", f, r }'
}

# wrk_run URL [wrk args] -> "requests/s requests non_2xx socket_errors p50_us p99_us"
wrk_run() {
  local url=$1
  shift
  wrk -t1 -c64 -d"${SECONDS_PER_RUN}s" --latency "$@" "$url" 2>&1 | awk '
    function us(v) {
      if (v ~ /us$/) return v + 0
      if (v ~ /ms$/) return v * 1000
      if (v ~ /m$/) return v * 60e6
      if (v ~ /s$/) return v * 1e6
      return v + 0
    }
    /^Requests\/sec:/ { rps = $2 }
    / requests in / { requests = $1 }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    /Socket errors:/ { gsub(",", ""); errors = $4 + $6 + $8 + $10 }
    /^ +50%/ { p50 = us($2) }
    /^ +99%/ { p99 = us($2) }
    END { printf "%.0f %d %d %d %.0f %.0f\n", rps, requests, non2xx, errors, p50, p99 }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a != "-" && b != "-" && b > 0) printf "%.2fx", a / b; else printf "-" }'; }
# median VALUE... -> the middle value (the mean of the two middle ones for
# an even count); "-" when the values are "-".
median() {
  [ "$1" = - ] && { echo -; return; }
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
# in_round ROUND [TARGET...] -> the targets (default TARGETS) in the order
# of that round: rotated by one more each round, and reversed in even
# rounds, so that each target follows different ones.
in_round() {
  local r=$1
  shift
  local -a all
  if [ $# -gt 0 ]; then all=("$@"); else read -r -a all <<< "$TARGETS"; fi
  local n=${#all[@]} i
  for ((i = 0; i < n; i++)); do
    if ((r % 2)); then
      printf '%s ' "${all[$(((i + r - 1) % n))]}"
    else
      printf '%s ' "${all[$(((n - 1 - i + r - 1) % n))]}"
    fi
  done
}
# cpu_per_request T0 T1 REQUESTS -> µs of CPU per request ("-" for none).
cpu_per_request() {
  awk -v a="$1" -v b="$2" -v n="$3" -v hz="$HZ" \
    'BEGIN { if (n > 0) printf "%.1f", (b - a) * 1e6 / hz / n; else printf "-" }'
}

# Warm-up: pools and mesh connections open, VIP listeners used once.
for t in $TARGETS; do
  wrk -t1 -c64 -d2s "${URL[$t]}" > /dev/null 2>&1
done

read -r f r < <(mesh_handshakes $C_API)
log "mesh handshakes on the consumer after the set-up and warm-up: $f full, $r resumed"
log "max requests/s (wrk -t1 -c64, ${SECONDS_PER_RUN}s per run, $ROUNDS rounds)"
declare -A RPS RPS_ALL NON2XX ERRS CPU CPU_ALL P50 P50_ALL P99 P99_ALL RUN_FULL RUN_RESUMED
for mode in keep-alive close; do
  for round in $(seq 1 "$ROUNDS"); do
    for t in $(in_round "$round"); do
      read -r -a procs <<< "$(pids "$t")"
      [ "$t" != signpost-mesh ] || read -r f0 r0 < <(mesh_handshakes $C_API)
      t0=$(cpu_ticks "${procs[@]}")
      if [ $mode = close ]; then
        read -r rps n non2xx e p50 p99 < <(wrk_run "${URL[$t]}" -H 'Connection: close')
      else
        read -r rps n non2xx e p50 p99 < <(wrk_run "${URL[$t]}")
      fi
      t1=$(cpu_ticks "${procs[@]}")
      cpu=$(cpu_per_request "$t0" "$t1" "$n")
      k=$mode.$t
      hs=""
      if [ "$t" = signpost-mesh ]; then
        read -r f1 r1 < <(mesh_handshakes $C_API)
        RUN_FULL[$mode]=$((${RUN_FULL[$mode]:-0} + f1 - f0)) RUN_RESUMED[$mode]=$((${RUN_RESUMED[$mode]:-0} + r1 - r0))
        hs=", mesh handshakes (consumer) $((f1 - f0)) full, $((r1 - r0)) resumed"
      fi
      RPS_ALL[$k]="${RPS_ALL[$k]:-} $rps" CPU_ALL[$k]="${CPU_ALL[$k]:-} $cpu"
      P50_ALL[$k]="${P50_ALL[$k]:-} $p50" P99_ALL[$k]="${P99_ALL[$k]:-} $p99"
      NON2XX[$k]=$((${NON2XX[$k]:-0} + non2xx)) ERRS[$k]=$((${ERRS[$k]:-0} + e))
      log "  $mode, round $round, $t: $rps req/s ($n requests), $non2xx non-2xx, $e socket errors," \
        "CPU $cpu us/req, p50 $p50 us, p99 $p99 us$hs"
    done
  done
  for t in $TARGETS; do
    k=$mode.$t
    # shellcheck disable=SC2086 # the rounds' values, one argument each
    RPS[$k]=$(median ${RPS_ALL[$k]}) CPU[$k]=$(median ${CPU_ALL[$k]})
    # shellcheck disable=SC2086
    P50[$k]=$(median ${P50_ALL[$k]}) P99[$k]=$(median ${P99_ALL[$k]})
  done
done

# Fixed rates (oha, keep-alive): latency and CPU per request, with a
# direct call to nginx for what each path adds.
LAT_TARGETS=(direct signpost-mesh signpost-plain haproxy-plain-2hop haproxy-tls-2hop)
declare -A L_P50 L_P99 L_ACHIEVED L_CPU L_NON2XX L_ERRS R_P50 R_P99 R_ACHIEVED R_CPU
if [ -n "$OHA" ]; then
  for rate in $RATES; do
    for round in $(seq 1 "$ROUNDS"); do
      log "latency at $rate req/s (oha, ${SECONDS_PER_RUN}s per run), round $round of $ROUNDS"
      for t in $(in_round "$round" "${LAT_TARGETS[@]}"); do
        read -r -a procs <<< "$(pids "$t")"
        t0=0
        [ ${#procs[@]} -gt 0 ] && t0=$(cpu_ticks "${procs[@]}")
        "$OHA" -q "$rate" -z "${SECONDS_PER_RUN}s" -c 32 --latency-correction --no-tui \
          --output-format json "${URL[$t]}" > "$WORK/oha.json" 2> "$WORK/oha.err"
        t1=0
        [ ${#procs[@]} -gt 0 ] && t1=$(cpu_ticks "${procs[@]}")
        read -r p50 p99 achieved ok non2xx errs < <(jq -r '
          [ .latencyPercentiles.p50, .latencyPercentiles.p99, .summary.requestsPerSec,
            ([.statusCodeDistribution | to_entries[] | select(.key | startswith("2")) | .value] | add // 0),
            ([.statusCodeDistribution | to_entries[] | select(.key | startswith("2") | not) | .value] | add // 0),
            ([.errorDistribution | to_entries[] | select(.key != "aborted due to deadline") | .value] | add // 0) ]
          | map(tostring) | join(" ")' "$WORK/oha.json")
        cpu=-
        [ ${#procs[@]} -gt 0 ] && cpu=$(cpu_per_request "$t0" "$t1" "$((ok + non2xx))")
        k=$rate.$t
        R_P50[$k]="${R_P50[$k]:-} $p50" R_P99[$k]="${R_P99[$k]:-} $p99"
        R_ACHIEVED[$k]="${R_ACHIEVED[$k]:-} $achieved" R_CPU[$k]="${R_CPU[$k]:-} $cpu"
        L_NON2XX[$k]=$((${L_NON2XX[$k]:-0} + non2xx)) L_ERRS[$k]=$((${L_ERRS[$k]:-0} + errs))
        log "  $t: p50 $p50 s, p99 $p99 s, $ok ok, $non2xx non-2xx, $errs errors, CPU $cpu us/req"
        [ "$errs" = 0 ] || jq -c .errorDistribution "$WORK/oha.json" >&2
      done
    done
    for t in "${LAT_TARGETS[@]}"; do
      k=$rate.$t
      # shellcheck disable=SC2086 # the rounds' values, one argument each
      L_P50[$k]=$(median ${R_P50[$k]}) L_P99[$k]=$(median ${R_P99[$k]})
      # shellcheck disable=SC2086
      L_ACHIEVED[$k]=$(median ${R_ACHIEVED[$k]}) L_CPU[$k]=$(median ${R_CPU[$k]})
    done
  done
else
  log "no oha: no fixed-rate latency; wrk's p50/p99 at max load instead (see bench/proxy.sh's header to install oha)"
fi

us() { awk -v s="$1" 'BEGIN { printf "%.0f", s * 1e6 }'; }
echo
echo "| wrk -t1 -c64, ${SECONDS_PER_RUN}s, median of $ROUNDS | target | requests/s | each round | non-2xx | socket errors | vs $REF | CPU per request (µs) | CPU vs $REF | p50 at max load (µs) | p99 at max load (µs) |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
for mode in keep-alive close; do
  for t in $TARGETS; do
    k=$mode.$t
    echo "| $mode | $t | $(printf %.0f "${RPS[$k]}") |${RPS_ALL[$k]} | ${NON2XX[$k]} | ${ERRS[$k]} |" \
      "$(ratio "${RPS[$k]}" "${RPS[$mode.$REF]}") | ${CPU[$k]} | $(ratio "${CPU[$k]}" "${CPU[$mode.$REF]}") |" \
      "$(printf %.0f "${P50[$k]}") | $(printf %.0f "${P99[$k]}") |"
  done
done
echo
if [ -n "$OHA" ]; then
  echo "| oha keep-alive, -c 32, ${SECONDS_PER_RUN}s, medians of $ROUNDS | target | achieved req/s | p50 (µs) | p99 (µs) | added p50 / p99 (µs) | CPU per request (µs) | CPU vs $REF | non-2xx | errors |"
  echo "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  for rate in $RATES; do
    d=$rate.direct
    for t in "${LAT_TARGETS[@]}"; do
      k=$rate.$t
      added=-
      [ "$t" = direct ] || added=$(awk -v a="${L_P50[$k]}" -v b="${L_P50[$d]}" -v c="${L_P99[$k]}" -v e="${L_P99[$d]}" \
        'BEGIN { printf "%+.0f / %+.0f", (a - b) * 1e6, (c - e) * 1e6 }')
      echo "| $rate req/s | $t | $(printf %.0f "${L_ACHIEVED[$k]}") | $(us "${L_P50[$k]}") | $(us "${L_P99[$k]}") | $added |" \
        "${L_CPU[$k]} | $(ratio "${L_CPU[$k]}" "${L_CPU[$rate.$REF]}") | ${L_NON2XX[$k]} | ${L_ERRS[$k]} |"
    done
  done
else
  echo "(latency: oha is not installed, so no fixed-rate rows; the p50/p99 above are wrk's --latency at max load, where the queue wrk keeps full dominates them: not what a path adds at a given rate)"
fi

# The mesh's handshakes and calls over the whole run (setup and warm-up
# included), as each agent counted them.
echo
echo "| mesh handshakes (whole run) | side | full | resumed | failures |"
echo "| --- | --- | ---: | ---: | ---: |"
declare -A HS
for agent in consumer provider; do
  api=$C_API
  [ $agent = provider ] && api=$P_API
  HS=()
  while read -r line; do
    [ -n "$line" ] || continue
    side=$(label side "$line") resumed=$(label resumed "$line")
    HS[$side.$resumed]=$(( ${HS[$side.$resumed]:-0} + $(printf %.0f "${line##* }") ))
  done < <(metric_lines $api signpost_agent_proxy_mesh_handshakes_total)
  while read -r line; do
    [ -n "$line" ] || continue
    side=$(label side "$line")
    HS[$side.failed]=$(( ${HS[$side.failed]:-0} + $(printf %.0f "${line##* }") ))
  done < <(metric_lines $api signpost_agent_proxy_mesh_handshake_failures_total)
  sides=$(printf '%s\n' "${!HS[@]}" | sed 's/\..*//' | sort -u)
  [ -n "$sides" ] || sides="(none)"
  for side in $sides; do
    echo "| $agent | $side | ${HS[$side.false]:-0} | ${HS[$side.true]:-0} | ${HS[$side.failed]:-0} |"
  done
done
for mode in keep-alive close; do
  echo "| consumer, during the $mode runs | outbound | ${RUN_FULL[$mode]:-0} | ${RUN_RESUMED[$mode]:-0} | |"
done
echo
echo "mesh calls counted by the provider (signpost_agent_proxy_mesh_requests_total):"
metric_lines $P_API signpost_agent_proxy_mesh_requests_total | sed 's/^/    /'
[ -n "$(metric_lines $P_API signpost_agent_proxy_mesh_requests_total)" ] || echo "    (none)"

# What the agents logged (warn and above) during the runs.
for agent in consumer provider; do
  if [ -s "$WORK/$agent.log" ]; then
    echo "$agent agent log: $(wc -l < "$WORK/$agent.log") lines (warn and above); the last ones:"
    tail -n 10 "$WORK/$agent.log" | sed 's/^/    /'
  else
    echo "$agent agent log: nothing at warn or above"
  fi
done

# How long an intention change takes to be in force on the path: written
# on the control plane (its fsync included), sent to the provider on its
# stream, and obeyed by the provider's inbound listener on the next call
# through the consumer (bench/mesh_propagation.py; its denies are logged
# by the provider, after the check above).
read -r changes p50 p99 max < <(python3 bench/mesh_propagation.py \
  "http://127.0.0.1:$CP_HTTP" "${URL[signpost-mesh]}" load web "${PROPAGATION_CHANGES:-20}")
echo
echo "| intention changes (deny, then allow), $changes in all | p50 (ms) | p99 (ms) | max (ms) |"
echo "| --- | ---: | ---: | ---: |"
echo "| written on the control plane -> the first call through the consumer that obeys it | $p50 | $p99 | $max |"
