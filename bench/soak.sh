#!/usr/bin/env bash
# A soak of a control plane and two agents (release binaries, loopback)
# under churn, proxy and DNS load and idle-connection floods, with RSS and
# open descriptors sampled every 10 s (see tests/examples/soak.rs):
#
#   bash bench/soak.sh [SECONDS]      # default 600
#
# The example builds the release signpost binaries it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo run --release -q -p signpost-tests --example soak -- "${1:-600}"
