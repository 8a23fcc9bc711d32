#!/usr/bin/env bash
# Builds the release `signpost` binary optimised by how its proxy runs and
# writes it, stripped, to $CARGO_TARGET_DIR/release/signpost, where
# packaging/build.sh and the proxy benchmarks take it. Two passes over one
# workload: `signpost dev` (a control plane, an agent and two demo
# instances) while wrk and curl send it HTTP/1.1 requests with keep-alive,
# a new connection each, and HTTP/2 ones through the demo service's VIP.
#
#  1. Profile-guided optimisation (PGO): the agent is built instrumented
#     (rustc -Cprofile-generate), runs the workload, and is built again
#     from the counts it wrote (-Cprofile-use), so that LLVM inlines, lays
#     out blocks and allocates registers for the paths that run: a
#     proxied request takes about a quarter fewer instructions
#     (bench/RESULTS.md, profile-guided optimisation).
#  2. BOLT (LLVM's post-link optimiser): that binary is instrumented again,
#     runs the workload, and is rewritten with the code that ran placed
#     together and each function's rarely taken blocks moved apart: half
#     the instruction-cache misses (bench/RESULTS.md).
#
# Behaviour is unchanged (the same source; the rewritten binary answers
# the demo over HTTP/1.1 and h2c before it is kept). Both passes are
# cached under $CARGO_TARGET_DIR/pgo, keyed by the binary they start from:
# run again on unchanged sources, this rebuilds nothing.
#
#   bash packaging/optimise.sh
#
# The release profile strips only debug information, and the builds here
# link with --emit-relocs: BOLT needs the symbols and relocations to move
# whole functions. They compile C (mimalloc's) with gcc's
# -fno-reorder-blocks-and-partition: split into hot and cold parts, every C
# function would make BOLT rewrite all functions rather than those that
# ran, keeping the old code beside the new (a binary twice the size).
# Needs (Debian): llvm-N
# (llvm-profdata of rustc's LLVM version N, `rustc -vV`), bolt-16, wrk,
# curl, dnsutils; loopback ports 18500 and 18600 and the demo's VIP port
# 8080 free.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
LLVM=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
for tool in "llvm-profdata-$LLVM" llvm-bolt-16 wrk curl dig strip readelf sha256sum; do
  command -v "$tool" > /dev/null || {
    echo "optimise.sh needs $tool (apt-get install llvm-$LLVM bolt-16 wrk curl dnsutils binutils)" >&2
    exit 1
  }
done
# Debian's bolt-16 looks for its runtime under /usr/lib, whatever the path.
RUNTIME=llvm-16/lib/libbolt_rt_instr.a
[ -e "/usr/lib/$RUNTIME" ] || { echo "optimise.sh: /usr/lib/$RUNTIME missing (apt-get install libbolt-16-dev)" >&2; exit 1; }

PGO="$CARGO_TARGET_DIR/pgo"
OUT="$CARGO_TARGET_DIR/release/signpost"
RELOCS="-C link-arg=-Wl,--emit-relocs"
mkdir -p "$PGO" "$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d)
DEV=
cleanup() {
  [ -z "$DEV" ] || kill "$DEV" 2> /dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
log() { echo "[$(date +%T)] optimise: $*" >&2; }
fail() { echo "optimise.sh: $*" >&2; exit 1; }
hash() { sha256sum "$1" | cut -c1-16; }
# keep FILE: removes the other files of its kind (same prefix) in $PGO.
keep() {
  local name=${1##*/}
  find "$PGO" -maxdepth 1 -type f -name "${name%%-*}-*" ! -name "$name" -delete
}

API=127.0.0.1:18500
DNS=127.0.0.1:18600
# demo BIN: runs BIN's `signpost dev` (pid in DEV) until the demo
# service answers through its VIP; its URL in URL.
demo() {
  (cd "$WORK" && exec "$1" --http-addr "$API" dev --dns-addr "$DNS" > "$WORK/dev.log" 2>&1) &
  DEV=$!
  local vip=
  for _ in $(seq 100); do
    vip=$(dig +short +time=1 +tries=1 @"${DNS%:*}" -p "${DNS#*:}" demo.service.internal A 2> /dev/null \
      | grep -E '^[0-9.]+$' | head -1 || true)
    if [ -n "$vip" ] && curl -sf "http://$vip:8080/" > /dev/null 2>&1; then
      URL="http://$vip:8080/"
      return
    fi
    sleep 0.2
  done
  tail -20 "$WORK/dev.log" >&2
  fail "the demo service never answered through its VIP"
}
stop_demo() {
  kill -INT "$DEV"
  wait "$DEV" || true
  DEV=
}
# workload BIN: the load both passes profile, on BIN's `signpost dev`.
workload() {
  demo "$1"
  wrk -t1 -c16 -d4s "$URL" > /dev/null
  wrk -t1 -c16 -d4s -H 'Connection: close' "$URL" > /dev/null
  # One request per connection: Debian 12's curl cannot reuse an h2c one.
  for _ in $(seq 100); do
    curl -sf --http2-prior-knowledge "$URL" > /dev/null
  done
  stop_demo
}
# build DIR FLAGS...: the release agent built into target directory DIR
# with rustc FLAGS; prints the binary's path.
build() {
  local dir=$1
  shift
  RUSTFLAGS="$RELOCS $*" CFLAGS="-fno-reorder-blocks-and-partition" CARGO_TARGET_DIR="$dir" \
    cargo build --release --locked -q -p signpost-agent --bin signpost
  echo "$dir/release/signpost"
}

# 1. PGO. The raw counts' directory is part of the instrumented build's
# flags, so it stays the same; the merged profile is named after the
# instrumented binary, which changes with the sources.
log "building the agent instrumented for PGO"
RAW="$PGO/raw"
INSTRUMENTED=$(build "$PGO/generate" "-Cprofile-generate=$RAW")
PROFILE="$PGO/profile-$(hash "$INSTRUMENTED").profdata"
if [ ! -s "$PROFILE" ]; then
  log "profiling the instrumented agent under load"
  rm -rf "$RAW"
  workload "$INSTRUMENTED"
  compgen -G "$RAW/*.profraw" > /dev/null || { tail -20 "$WORK/dev.log" >&2; fail "no PGO profile written"; }
  "llvm-profdata-$LLVM" merge -o "$PROFILE" "$RAW"/*.profraw
  keep "$PROFILE"
fi
log "building the agent from its profile"
PROFILED=$(build "$PGO/use" "-Cprofile-use=$PROFILE")

# 2. BOLT, on the binary PGO built.
LAID_OUT="$PGO/bolt-$(hash "$PROFILED")"
if [ ! -s "$LAID_OUT" ]; then
  [[ "$(readelf -SW "$PROFILED")" == *.rela.text* ]] \
    || fail "$PROFILED has no relocations: link it with -Wl,--emit-relocs"
  log "instrumenting the agent for BOLT"
  llvm-bolt-16 "$PROFILED" -instrument -o "$WORK/signpost" \
    --runtime-instrumentation-lib="$RUNTIME" \
    --instrumentation-file="$WORK/profile.fdata" > "$WORK/instrument.log" 2>&1 \
    || { tail -20 "$WORK/instrument.log" >&2; exit 1; }
  log "profiling it under load"
  workload "$WORK/signpost"
  [ -s "$WORK/profile.fdata" ] || { tail -20 "$WORK/dev.log" >&2; fail "no BOLT profile written"; }
  log "rewriting it"
  llvm-bolt-16 "$PROFILED" -o "$WORK/signpost.bolt" -data="$WORK/profile.fdata" \
    -reorder-blocks=ext-tsp -reorder-functions=hfsort+ \
    -split-functions -split-all-cold -use-gnu-stack > "$WORK/optimize.log" 2>&1 \
    || { tail -20 "$WORK/optimize.log" >&2; exit 1; }
  strip -o "$WORK/signpost.stripped" "$WORK/signpost.bolt"
  log "checking the rewritten binary: the demo through its VIP, HTTP/1.1 and h2c"
  demo "$WORK/signpost.stripped"
  for version in --http1.1 --http2-prior-knowledge; do
    answer=$(curl -sf "$version" "$URL" || true)
    [[ "$answer" == "hello from demo-"* ]] || fail "the rewritten binary answers '$answer' ($version)"
  done
  stop_demo
  mv "$WORK/signpost.stripped" "$LAID_OUT"
  keep "$LAID_OUT"
fi
# A new file, not written over: $OUT may be a hard link to cargo's copy
# in deps/ of a plain release build, which stays as built.
cp "$LAID_OUT" "$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"
log "done: $OUT, $(stat -c %s "$OUT") bytes"
