#!/usr/bin/env bash
# Local DNS throughput: dnsperf against the Signpost agent's DNS server and,
# in the same run on the same machine, unbound and dnsmasq serving the same
# names on loopback. Three query mixes:
#   hits       service names the server answers itself (Signpost: VIP mode)
#   nxdomain   unknown names under the local domain
#   forwarded  names under fwd.test, forwarded to a local upstream (a
#              dnsmasq that answers every fwd.test name) and then cached
# Signpost and unbound each run with one serving thread and with one per
# core; dnsmasq has one. Reports queries/s and mean latency per server, and
# the ratio to unbound with as many threads. dnsperf itself runs on the same
# cores (one thread, 8 sockets).
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

# Signpost and unbound run twice: one serving thread, and one per core.
UPSTREAM=15399 SIGNPOST1=15300 UNBOUND1=15301 DNSMASQ=15302 SIGNPOSTN=15303 UNBOUNDN=15304
CORES=$(nproc)
SERVICES="web payments search"

# The upstream every server forwards fwd.test to.
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port=$UPSTREAM --listen-address=127.0.0.1 \
  --bind-interfaces --address=/fwd.test/192.0.2.1 --local-ttl=300 --cache-size=0 \
  --pid-file="$WORK/upstream.pid" --user="$(id -un)" 2> "$WORK/upstream.log" &
PIDS+=($!)

# Signpost: one instance per service, VIP answers (the default).
start_signpost() { # port threads
  local dir="$WORK/signpost-$2"
  mkdir -p "$dir/services.d"
  {
    echo "services:"
    for s in $SERVICES; do printf '  - name: %s\n    port: 8080\n' "$s"; done
  } > "$dir/services.d/bench.yaml"
  cat > "$dir/agent.yaml" <<YAML
node_name: bench
data_dir: $dir/data
services_dir: $dir/services.d
api:
  listen: 127.0.0.1:$(($1 + 200))
dns:
  listen: 127.0.0.1:$1
  threads: $2
  recursors: ["127.0.0.1:$UPSTREAM"]
log:
  level: warn
YAML
  "$BIN" agent --config "$dir/agent.yaml" 2> "$dir.log" &
  PIDS+=($!)
}
start_signpost $SIGNPOST1 1
SIGNPOST1_PID=$!
start_signpost $SIGNPOSTN "$CORES"

# unbound: the same names as local data, fwd.test forwarded.
start_unbound() { # port threads
  local conf="$WORK/unbound-$2.conf"
  {
    cat <<CONF
server:
  interface: 127.0.0.1@$1
  num-threads: $2
  so-reuseport: yes
  access-control: 127.0.0.0/8 allow
  do-not-query-localhost: no
  username: ""
  chroot: ""
  directory: "$WORK"
  pidfile: "$WORK/unbound-$2.pid"
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
  } > "$conf"
  unbound -d -c "$conf" 2> "$WORK/unbound-$2.log" &
  PIDS+=($!)
}
start_unbound $UNBOUND1 1
UNBOUND1_PID=$!
start_unbound $UNBOUNDN "$CORES"

# dnsmasq: the same names as host records, the domain local, fwd.test forwarded.
HOSTS=()
for s in $SERVICES; do HOSTS+=("--host-record=$s.service.internal,127.77.0.1"); done
dnsmasq --keep-in-foreground --no-resolv --no-hosts --port=$DNSMASQ --listen-address=127.0.0.1 \
  --bind-interfaces --local=/internal/ "${HOSTS[@]}" --local-ttl=5 \
  --server=/fwd.test/127.0.0.1#$UPSTREAM --cache-size=10000 \
  --pid-file="$WORK/dnsmasq.pid" --user="$(id -un)" 2> "$WORK/dnsmasq.log" &
PIDS+=($!)
DNSMASQ_PID=$!

for s in $SERVICES; do echo "$s.service.internal A"; done > "$WORK/hits.txt"
for i in $(seq 1 1000); do echo "nope-$i.service.internal A"; done > "$WORK/nxdomain.txt"
for i in $(seq 1 10000); do echo "h$i.fwd.test A"; done > "$WORK/forwarded.txt"

# Every server answers before measuring.
for port in $SIGNPOST1 $SIGNPOSTN $UNBOUND1 $UNBOUNDN $DNSMASQ; do
  for _ in $(seq 1 100); do
    dig +short +time=1 +tries=1 @127.0.0.1 -p $port web.service.internal A 2> /dev/null | grep -qE '^[0-9.]+$' && break
    sleep 0.1
  done
  dig +short @127.0.0.1 -p $port web.service.internal A | grep -qE '^[0-9.]+$' || { echo "server on $port does not answer" >&2; cat "$WORK"/*.log >&2; exit 1; }
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

echo "| mix | server | threads | queries/s | mean latency (ms) | lost | vs unbound, same threads |"
echo "| --- | --- | ---: | ---: | ---: | ---: | ---: |"
for mix in hits nxdomain forwarded; do
  read -r u1_qps u1_lat u1_lost < <(run $UNBOUND1 "$WORK/$mix.txt")
  read -r s1_qps s1_lat s1_lost < <(run $SIGNPOST1 "$WORK/$mix.txt")
  read -r un_qps un_lat un_lost < <(run $UNBOUNDN "$WORK/$mix.txt")
  read -r sn_qps sn_lat sn_lost < <(run $SIGNPOSTN "$WORK/$mix.txt")
  read -r d_qps d_lat d_lost < <(run $DNSMASQ "$WORK/$mix.txt")
  for row in "signpost 1 $s1_qps $s1_lat $s1_lost $u1_qps" "unbound 1 $u1_qps $u1_lat $u1_lost $u1_qps" \
             "signpost $CORES $sn_qps $sn_lat $sn_lost $un_qps" "unbound $CORES $un_qps $un_lat $un_lost $un_qps" \
             "dnsmasq 1 $d_qps $d_lat $d_lost $u1_qps"; do
    read -r name threads qps lat lost base <<< "$row"
    ratio=$(awk -v a="$qps" -v b="$base" 'BEGIN { printf "%.2fx", a / b }')
    echo "| $mix | $name | $threads | $qps | $lat | $lost | $ratio |"
  done
done

# CPU per query at a fixed 50,000 queries/s (hits, one serving thread):
# the servers' own CPU time (utime + stime) over the run, per query. This
# is steadier than peak queries/s, which moves with how the kernel
# schedules dnsperf and the server on the same cores.
cpu() { # port pid
  dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/hits.txt" -l 2 -c 8 -T 1 > /dev/null 2>&1
  local t0 t1 n
  t0=$(awk '{print $14 + $15}' "/proc/$2/stat")
  n=$(dnsperf -s 127.0.0.1 -p "$1" -d "$WORK/hits.txt" -l "$SECONDS_PER_RUN" -c 8 -T 1 -Q 50000 2>&1 | awk '/Queries completed/ {print $3}')
  t1=$(awk '{print $14 + $15}' "/proc/$2/stat")
  awk -v a="$t0" -v b="$t1" -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f", (b - a) * 1e6 / hz / n }'
}
echo
echo "| hits at 50,000 queries/s, one thread | CPU per query (µs) |"
echo "| --- | ---: |"
echo "| signpost | $(cpu $SIGNPOST1 $SIGNPOST1_PID) |"
echo "| unbound | $(cpu $UNBOUND1 $UNBOUND1_PID) |"
echo "| dnsmasq | $(cpu $DNSMASQ $DNSMASQ_PID) |"
