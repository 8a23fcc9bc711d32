#!/usr/bin/env bash
# Runs every fuzz harness for a long dose (default 600 s each) in release
# mode and prints how many inputs each went through:
#
#   bash bench/fuzz.sh [SECONDS]          # SIGNPOST_FUZZ_SEED=N for another seed
#
# The harnesses are ordinary tests (see fuzz/src/lib.rs): service files,
# configuration and operator commands (core), API bodies (agent), DNS
# messages (dns), HTTP requests through a live proxy (proxy), agents'
# messages into the catalog (control-plane). CI runs each with a short
# fixed dose. A failure prints its seed and iteration (and a hang its
# input); keep it as a regression test. Only loopback addresses are used.
set -euo pipefail
SECS=${1:-600}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
export SIGNPOST_FUZZ_SECONDS=$SECS

run() {
    local what=$1; shift
    local log
    log=$(mktemp)
    local start=$SECONDS
    if cargo test --release -q "$@" -- --nocapture --test-threads=1 >"$log" 2>&1; then
        local iterations
        iterations=$(grep -o 'fuzz: [0-9]* iterations' "$log" | awk '{s += $2} END {print s + 0}')
        printf '%-34s ok      %10s inputs in %4d s\n' "$what" "$iterations" $((SECONDS - start))
    else
        printf '%-34s FAILED  (log below)\n' "$what"
        tail -40 "$log"
        FAILED=1
    fi
    rm -f "$log"
}

FAILED=0
cargo build --release -q --tests -p signpost-core -p signpost-agent -p signpost-dns -p signpost-proxy -p signpost-control-plane
run "service files" -p signpost-core --test fuzz service_files
run "configuration files" -p signpost-core --test fuzz configurations
run "operator commands" -p signpost-core --test fuzz operator_commands
run "agent API bodies" -p signpost-agent --lib api::fuzz
run "DNS messages (UDP and TCP)" -p signpost-dns --test malformed random_and_mutated
run "HTTP requests through the proxy" -p signpost-proxy --test fuzz
run "agents' messages (control plane)" -p signpost-control-plane --lib sync::fuzz
exit $FAILED
