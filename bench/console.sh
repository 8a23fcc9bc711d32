#!/usr/bin/env bash
# The web console at fleet size: one control plane (files), N simulated
# agents (real TLS gRPC sessions opened by
# control-plane/examples/console_load.rs) reporting 10 instances each over
# 500 services, then the latency of what the console's pages request
# (the page, the services summary, a service, the nodes, the commands,
# the token, the first change notice), and the control plane's CPU and
# RSS. The console's pages must answer within 200 ms at 2,000 nodes and
# 20,000 instances.
#
#   bash bench/console.sh [AGENTS] [PER_AGENT]   # default 2000 10
set -euo pipefail
AGENTS=${1:-2000}
PER_AGENT=${2:-10}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-control-plane --bin signpost-control-plane --example console_load
CP="$CARGO_TARGET_DIR/release/signpost-control-plane"
LOAD="$CARGO_TARGET_DIR/release/examples/console_load"

WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
TOKEN=bench-token-0123456789abcdef
# shellcheck source=bench/control-planes.sh
source bench/control-planes.sh
ulimit -n 65536 2>/dev/null || true
start_control_planes file
ADMIN=$(cat "$WORK/cp0/bootstrap-token")
"$LOAD" --grpc "${GRPC[0]}" --http http://127.0.0.1:18700 --ca "$WORK/cp0/tls/ca.pem" \
  --token "$TOKEN" --admin "$ADMIN" --agents "$AGENTS" --per-agent "$PER_AGENT"
echo "control plane: CPU seconds and peak RSS (MiB): $(cp_usage)"
