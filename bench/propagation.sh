#!/usr/bin/env bash
# Propagation through real agents: a control plane and N agent processes on
# their own 127.0.0.x addresses, all using `web`; agent 1 registers web and
# flips its TTL check CHANGES times; every other agent watches with a
# blocking query. Reports p50/p99 from the flip to each agent's answer.
#
#   bash bench/propagation.sh [AGENTS] [CHANGES]     # default 50 and 20
set -euo pipefail
AGENTS=${1:-50}
CHANGES=${2:-20}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-agent -p signpost-control-plane --bins
BIN="$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
TOKEN=bench-token-0123456789abcdef
cat > "$WORK/cp.yaml" <<YAML
data_dir: $WORK/cp
agent_tokens: [$TOKEN]
grpc:
  listen: 127.0.0.1:18300
http:
  listen: 127.0.0.1:18700
log:
  level: warn
YAML
"$BIN/signpost-control-plane" --config "$WORK/cp.yaml" init-tls --name 127.0.0.1 > /dev/null
"$BIN/signpost-control-plane" --config "$WORK/cp.yaml" 2> "$WORK/cp.log" &
PIDS+=($!)
sleep 0.5
ADDRS=()
for i in $(seq 1 "$AGENTS"); do
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
  addresses: ["127.0.0.1:18300"]
  ca_file: $WORK/cp/tls/ca.pem
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
