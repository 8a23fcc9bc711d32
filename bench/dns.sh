#!/usr/bin/env bash
# Local DNS throughput: dnsperf against the Signpost agent's DNS server and,
# in the same run on the same machine, unbound and dnsmasq serving the same
# names on loopback. Three query mixes:
#   hits       service names the server answers itself (Signpost: VIP mode)
#   nxdomain   unknown names under the local domain
#   forwarded  names under fwd.test, forwarded to a local upstream (a
#              dnsmasq that answers every fwd.test name) and then cached
# Reports queries/s and mean latency per server, and the ratio to unbound.
#
#   bash bench/dns.sh [SECONDS]        # default 10 s per run
# Needs: dnsperf, unbound, dnsmasq (apt-get install dnsperf unbound dnsmasq-base)
set -euo pipefail
SECONDS_PER_RUN=${1:-10}
cd "$(dirname "$0")/.."
for tool in dnsperf unbound dnsmasq; do
  command -v "$tool" > /dev/null || { echo "needs $tool (apt-get install dnsperf unbound dnsmasq-base)" >&2; exit 1; }
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-agent --bins
BIN="$CARGO_TARGET_DIR/release/signpost"
WORK=$(mktemp -d)
chmod 755 "$WORK"
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

UPSTREAM=15399 SIGNPOST=15300 UNBOUND=15301 DNSMASQ=15302
SERVICES="web payments search"

# The upstream every server forwards fwd.test to.
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port=$UPSTREAM --listen-address=127.0.0.1 \
  --bind-interfaces --address=/fwd.test/192.0.2.1 --local-ttl=300 --cache-size=0 \
  --pid-file="$WORK/upstream.pid" --user="$(id -un)" 2> "$WORK/upstream.log" &
PIDS+=($!)

# Signpost: one instance per service, VIP answers (the default).
mkdir -p "$WORK/signpost/services.d"
{
  echo "services:"
  for s in $SERVICES; do printf '  - name: %s\n    port: 8080\n' "$s"; done
} > "$WORK/signpost/services.d/bench.yaml"
cat > "$WORK/signpost/agent.yaml" <<YAML
node_name: bench
data_dir: $WORK/signpost/data
services_dir: $WORK/signpost/services.d
api:
  listen: 127.0.0.1:15500
dns:
  listen: 127.0.0.1:$SIGNPOST
  recursors: ["127.0.0.1:$UPSTREAM"]
log:
  level: warn
YAML
"$BIN" agent --config "$WORK/signpost/agent.yaml" 2> "$WORK/signpost.log" &
PIDS+=($!)

# unbound: the same names as local data, fwd.test forwarded; one thread per core.
{
  cat <<CONF
server:
  interface: 127.0.0.1@$UNBOUND
  num-threads: $(nproc)
  so-reuseport: yes
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  username: ""
  chroot: ""
  directory: "$WORK"
  pidfile: "$WORK/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  module-config: "iterator"
  msg-cache-size: 32m
  rrset-cache-size: 64m
  local-zone: "internal." static
CONF
  for s in $SERVICES; do echo "  local-data: \"$s.service.internal. 5 IN A 127.77.0.1\""; done
  cat <<CONF
forward-zone:
  name: "fwd.test."
  forward-addr: 127.0.0.1@$UPSTREAM
remote-control:
  control-enable: no
CONF
} > "$WORK/unbound.conf"
unbound -d -c "$WORK/unbound.conf" 2> "$WORK/unbound.log" &
PIDS+=($!)

# dnsmasq: the same names as host records, the domain local, fwd.test forwarded.
HOSTS=()
for s in $SERVICES; do HOSTS+=("--host-record=$s.service.internal,127.77.0.1"); done
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port=$DNSMASQ --listen-address=127.0.0.1 \
  --bind-interfaces --local=/internal/ "${HOSTS[@]}" --local-ttl=5 \
  --server=/fwd.test/127.0.0.1#$UPSTREAM --cache-size=10000 \
  --pid-file="$WORK/dnsmasq.pid" --user="$(id -un)" 2> "$WORK/dnsmasq.log" &
PIDS+=($!)

for s in $SERVICES; do echo "$s.service.internal A"; done > "$WORK/hits.txt"
for i in $(seq 1 1000); do echo "nope-$i.service.internal A"; done > "$WORK/nxdomain.txt"
for i in $(seq 1 10000); do echo "h$i.fwd.test A"; done > "$WORK/forwarded.txt"

# Every server answers before measuring.
for port in $SIGNPOST $UNBOUND $DNSMASQ; do
  for _ in $(seq 1 100); do
    dig +short +time=1 +tries=1 @127.0.0.1 -p $port web.service.internal A 2> /dev/null | grep -q . && break
    sleep 0.1
  done
  dig +short @127.0.0.1 -p $port web.service.internal A | grep -q . || { echo "server on $port does not answer" >&2; cat "$WORK"/*.log >&2; exit 1; }
done

# run PORT FILE -> "qps mean_ms"
run() {
  dnsperf -s 127.0.0.1 -p "$1" -d "$2" -l 2 -c 8 -T 1 > /dev/null 2>&1   # warm-up (caches, VIPs)
  dnsperf -s 127.0.0.1 -p "$1" -d "$2" -l "$SECONDS_PER_RUN" -c 8 -T 1 2>&1 | awk '
    /Queries per second:/ { qps = $4 }
    /Average Latency/ { lat = $4 * 1000 }
    /Queries lost:/ { lost = $3 }
    END { printf "%.0f %.3f %s\n", qps, lat, lost }'
}

echo "| mix | server | queries/s | mean latency (ms) | lost | vs unbound |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
for mix in hits nxdomain forwarded; do
  read -r u_qps u_lat u_lost < <(run $UNBOUND "$WORK/$mix.txt")
  read -r s_qps s_lat s_lost < <(run $SIGNPOST "$WORK/$mix.txt")
  read -r d_qps d_lat d_lost < <(run $DNSMASQ "$WORK/$mix.txt")
  for row in "signpost $s_qps $s_lat $s_lost" "unbound $u_qps $u_lat $u_lost" "dnsmasq $d_qps $d_lat $d_lost"; do
    read -r name qps lat lost <<< "$row"
    ratio=$(awk -v a="$qps" -v b="$u_qps" 'BEGIN { printf "%.2fx", a / b }')
    echo "| $mix | $name | $qps | $lat | $lost | $ratio |"
  done
done
