#!/usr/bin/env bash
# Operator commands: how long a command takes from the control plane's API
# call to its receipt by every agent. N simulated agents (real TLS gRPC
# sessions opened by control-plane/examples/command_load.rs) are connected;
# an operator token issues K commands one at a time; each agent
# acknowledges what it received. Reports p50/p99/max over all deliveries,
# and the control plane's CPU and RSS.
#
#   bash bench/commands.sh [AGENTS] [COMMANDS]     # default 1000 and 50
set -euo pipefail
AGENTS=${1:-1000}
COMMANDS=${2:-50}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-control-plane --bin signpost-control-plane --example command_load
CP="$CARGO_TARGET_DIR/release/signpost-control-plane"
LOAD="$CARGO_TARGET_DIR/release/examples/command_load"

WORK=$(mktemp -d)
cleanup() { kill "${CP_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
TOKEN=bench-token-0123456789abcdef
cat > "$WORK/cp.yaml" <<YAML
data_dir: $WORK/data
agent_tokens: [$TOKEN]
grpc:
  listen: 127.0.0.1:18301
http:
  listen: 127.0.0.1:18701
  plaintext: true   # loopback only; the load generator speaks plain HTTP
log:
  level: warn
YAML
"$CP" --config "$WORK/cp.yaml" init-tls --name 127.0.0.1 > /dev/null
ulimit -n 65536 2>/dev/null || true
"$CP" --config "$WORK/cp.yaml" 2> "$WORK/cp.log" &
CP_PID=$!
sleep 1
ADMIN=$(cat "$WORK/data/bootstrap-token")
OPERATOR=$(curl -s -X PUT -H "X-Consul-Token: $ADMIN" -H 'content-type: application/json' -d '{"Role":"operator","Description":"bench"}' \
  http://127.0.0.1:18701/v1/acl/token | python3 -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])')
ticks=$(getconf CLK_TCK)
c0=$(awk '{print $14 + $15}' "/proc/$CP_PID/stat"); t0=$(date +%s.%N)
"$LOAD" --grpc 127.0.0.1:18301 --http 127.0.0.1:18701 --ca "$WORK/data/tls/ca.pem" \
  --agent-token "$TOKEN" --operator-token "$OPERATOR" --agents "$AGENTS" --commands "$COMMANDS"
c1=$(awk '{print $14 + $15}' "/proc/$CP_PID/stat"); t1=$(date +%s.%N)
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$CP_PID/status")
python3 -c "
c0,c1,t0,t1,ticks,hwm=$c0,$c1,$t0,$t1,$ticks,$hwm
print(f'control plane: CPU {(c1-c0)/ticks:.2f} s over the {t1-t0:.1f} s run ({(c1-c0)/ticks/(t1-t0)*100:.1f}% of one core), peak RSS {hwm/1024:.1f} MiB')
"
