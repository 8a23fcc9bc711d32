#!/usr/bin/env bash
# Propagation through real agents: a control plane and N agent processes on
# their own 127.0.x.y addresses, all using `web`; agent 1 registers web and
# flips its TTL check CHANGES times; every other agent watches with a
# blocking query. Reports p50/p99 from the flip to each agent's answer.
# With `etcd`, three replicas share a local etcd: agent 1 is on the first,
# every watcher on the second or third, so each change crosses etcd.
#
#   bash bench/propagation.sh [AGENTS] [CHANGES] [file|etcd]   # default 50 20 file
set -euo pipefail
AGENTS=${1:-50}
CHANGES=${2:-20}
STORE=${3:-file}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-agent -p signpost-control-plane --features signpost-control-plane/etcd --bins
BIN="$CARGO_TARGET_DIR/release"
CP="$BIN/signpost-control-plane"
WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
TOKEN=bench-token-0123456789abcdef
# shellcheck source=bench/control-planes.sh
source bench/control-planes.sh
start_control_planes "$STORE"
ADDRS=()
for i in $(seq 1 "$AGENTS"); do
  # Agent 1 on the first replica, the others on the rest.
  via=${GRPC[0]}
  if [ "$i" -gt 1 ] && [ ${#GRPC[@]} -gt 1 ]; then via=${GRPC[$((1 + i % (${#GRPC[@]} - 1)))]}; fi
  ip="127.0.$((i / 250 + 1)).$((i % 250 + 1))"
  mkdir -p "$WORK/a$i/services.d"
  cat > "$WORK/a$i/agent.yaml" <<YAML
node_name: agent-$i
data_dir: $WORK/a$i/data
services_dir: $WORK/a$i/services.d
advertise_addr: $ip
api:
  listen: $ip:18500
dns:
  listen: $ip:18600
log:
  level: warn
control_plane:
  addresses: ["$via"]
  ca_file: $WORK/cp0/tls/ca.pem
  token: $TOKEN
upstreams: [web]
YAML
  "$BIN/signpost" agent --config "$WORK/a$i/agent.yaml" 2> "$WORK/a$i/log" &
  PIDS+=($!)
  ADDRS+=("$ip:18500")
done
for a in "${ADDRS[@]}"; do
  for _ in $(seq 1 100); do curl -sf "http://$a/v1/agent/self" > /dev/null && break; sleep 0.1; done
done
curl -sf -X PUT -d '{"ID":"web-1","Name":"web","Port":8080,"Check":{"TTL":"1h","Status":"passing"}}' \
  "http://${ADDRS[0]}/v1/agent/service/register"
sleep 2
python3 bench/propagation.py "$CHANGES" "${ADDRS[@]}"
echo "control planes (CPU s, peak RSS MiB):"
cp_usage
