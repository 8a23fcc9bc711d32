#!/usr/bin/env bash
# Control-plane fan-out: N simulated agents (real TLS gRPC sessions opened
# by control-plane/examples/sync_load.rs) subscribed to one service; one
# more session flips that service's check K times. Reports propagation
# latency, bytes per agent per change, and the control plane's CPU and RSS.
#
#   bash bench/sync.sh [AGENTS] [CHANGES]     # default 50 and 50
set -euo pipefail
AGENTS=${1:-50}
CHANGES=${2:-50}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-control-plane --bin signpost-control-plane --example sync_load
CP="$CARGO_TARGET_DIR/release/signpost-control-plane"
LOAD="$CARGO_TARGET_DIR/release/examples/sync_load"

WORK=$(mktemp -d)
cleanup() { kill "${CP_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
TOKEN=bench-token-0123456789abcdef
cat > "$WORK/cp.yaml" <<YAML
data_dir: $WORK/data
agent_tokens: [$TOKEN]
grpc:
  listen: 127.0.0.1:18300
http:
  listen: 127.0.0.1:18700
log:
  level: warn
YAML
"$CP" --config "$WORK/cp.yaml" init-tls --name 127.0.0.1 > /dev/null
ulimit -n 65536 2>/dev/null || true
"$CP" --config "$WORK/cp.yaml" 2> "$WORK/cp.log" &
CP_PID=$!
sleep 1
ticks=$(getconf CLK_TCK)
c0=$(awk '{print $14 + $15}' "/proc/$CP_PID/stat"); t0=$(date +%s.%N)
"$LOAD" --grpc 127.0.0.1:18300 --ca "$WORK/data/tls/ca.pem" --token "$TOKEN" --agents "$AGENTS" --changes "$CHANGES"
c1=$(awk '{print $14 + $15}' "/proc/$CP_PID/stat"); t1=$(date +%s.%N)
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$CP_PID/status")
python3 -c "
c0,c1,t0,t1,ticks,hwm=$c0,$c1,$t0,$t1,$ticks,$hwm
print(f'control plane: CPU {(c1-c0)/ticks:.2f} s over the {t1-t0:.1f} s run ({(c1-c0)/ticks/(t1-t0)*100:.1f}% of one core), peak RSS {hwm/1024:.1f} MiB')
"
