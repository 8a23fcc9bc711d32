#!/usr/bin/env bash
# Propagation and failure detection across real hosts: the network-namespace
# fleet of the tests (tests/src/fleet.rs: one namespace per host, its own
# loopback and a 198.18.0.0/24 address, no default route; the control plane
# on a host of its own, every agent with the packaged configuration),
# release binaries. Measures, with WATCHERS hosts watching through blocking
# queries:
#   register on A -> visible on B (and on every watcher), CHANGES times
#   health flip on A -> visible on B (and on every watcher), CHANGES times
#   etcd put on A -> watch event on B, CHANGES times (the peer: one etcd
#     member on the control plane's host, Debian's etcd-server)
#   host death (link down, no reset) -> failed, DEATHS times
#
#   sudo bash bench/fleet.sh [CHANGES] [WATCHERS] [DEATHS]   # default 200 5 5
# Needs: root, iproute2, etcd-server (apt-get install etcd-server).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
command -v etcd > /dev/null || { echo "needs etcd (apt-get install etcd-server)" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
# The example builds the release signpost binaries it starts.
cargo run --release -q -p signpost-tests --example fleet_bench -- "${1:-200}" "${2:-5}" "${3:-5}"
