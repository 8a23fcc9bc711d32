#!/usr/bin/env bash
# Control-plane fan-out: N simulated agents (real TLS gRPC sessions opened
# by control-plane/examples/sync_load.rs) subscribed to one service; one
# more session flips that service's check K times. Reports propagation
# latency, bytes per agent per change, and the control plane's CPU and RSS.
# With `etcd`, three replicas share a local etcd: the publisher is on the
# first, the subscribers on the other two, and etcd's writes and received
# bytes per registration and per flip are reported too.
#
#   bash bench/sync.sh [AGENTS] [CHANGES] [file|etcd]   # default 50 50 file
set -euo pipefail
AGENTS=${1:-50}
CHANGES=${2:-50}
STORE=${3:-file}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-control-plane --features etcd --bin signpost-control-plane --example sync_load
CP="$CARGO_TARGET_DIR/release/signpost-control-plane"
LOAD="$CARGO_TARGET_DIR/release/examples/sync_load"

WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
TOKEN=bench-token-0123456789abcdef
# shellcheck source=bench/control-planes.sh
source bench/control-planes.sh
ulimit -n 65536 2>/dev/null || true
start_control_planes "$STORE"
ARGS=()
for g in "${GRPC[@]}"; do ARGS+=(--grpc "$g"); done
snap() { echo "$(etcd_counter etcd_mvcc_txn_total) $(etcd_counter etcd_mvcc_put_total) $(etcd_counter etcd_network_client_grpc_received_bytes_total)"; }
[ "$STORE" != etcd ] || S0=$(snap)
"$LOAD" "${ARGS[@]}" --ca "$WORK/cp0/tls/ca.pem" --token "$TOKEN" --agents "$AGENTS" --changes "$CHANGES" > "$WORK/load.out" &
LOAD_PID=$!
until grep -q '^registered' "$WORK/load.out" || ! kill -0 "$LOAD_PID" 2> /dev/null; do sleep 0.05; done
[ "$STORE" != etcd ] || S1=$(snap)
wait "$LOAD_PID"
[ "$STORE" != etcd ] || S2=$(snap)
cat "$WORK/load.out"
echo "control planes (CPU s, peak RSS MiB):"
cp_usage
if [ "$STORE" = etcd ]; then
  python3 - "$AGENTS" "$CHANGES" $S0 $S1 $S2 <<'PY'
import sys
agents, changes = int(sys.argv[1]), int(sys.argv[2])
t0, p0, b0, t1, p1, b1, t2, p2, b2 = map(int, sys.argv[3:])
print(f"etcd per registration: {(t1 - t0) / (agents + 1):.2f} txns, {(p1 - p0) / (agents + 1):.2f} puts, {(b1 - b0) / (agents + 1):.0f} client bytes received")
print(f"etcd per health flip: {(t2 - t1) / changes:.2f} txns, {(p2 - p1) / changes:.2f} puts, {(b2 - b1) / changes:.0f} client bytes received")
PY
fi
