#!/usr/bin/env bash
# Lays out a release `signpost` binary by how its proxy runs, with BOLT
# (LLVM's post-link optimiser): the binary is instrumented, runs
# `signpost dev` (a control plane, an agent and two demo instances) while
# wrk and curl send it HTTP/1.1 requests with keep-alive, a new connection
# each, and HTTP/2 ones through the demo service's VIP, and is then
# rewritten from that profile with the code that ran placed together and
# each function's rarely taken blocks moved apart. Under callgrind's cache
# simulation a proxied request then misses the instruction cache half as
# often, and the agent spends 11 to 17 % less user CPU per request
# (bench/RESULTS.md, ninth day). Behaviour is unchanged: same code, other
# addresses.
#
#   bash packaging/bolt.sh BIN   # rewrites BIN in place (stripped); a
#                                # binary BOLT already rewrote is left alone
#
# BIN must keep its symbols and relocations: the release profile strips
# only debug information, and .cargo/config.toml links with
# --emit-relocs. Needs (Debian): bolt-16, wrk, curl, dnsutils; loopback
# ports 18500 and 18600 and the demo's VIP port 8080 free.
set -euo pipefail
BIN=${1:?usage: bolt.sh BIN}
for tool in llvm-bolt-16 wrk curl dig strip readelf; do
  command -v "$tool" > /dev/null || {
    echo "bolt.sh needs $tool (apt-get install bolt-16 wrk curl dnsutils binutils)" >&2
    exit 1
  }
done
sections=$(readelf -SW "$BIN")
if [[ "$sections" == *.note.bolt_info* ]]; then
  echo "$BIN: laid out by BOLT already" >&2
  exit 0
fi
[[ "$sections" == *.rela.text* ]] || {
  echo "$BIN has no relocations: link it with -Wl,--emit-relocs (.cargo/config.toml)" >&2
  exit 1
}

WORK=$(mktemp -d)
DEV=
cleanup() {
  [ -z "$DEV" ] || kill "$DEV" 2> /dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
log() { echo "[$(date +%T)] bolt: $*" >&2; }

# Debian's bolt-16 looks for its runtime under /usr/lib, whatever the path.
RUNTIME=llvm-16/lib/libbolt_rt_instr.a
[ -e "/usr/lib/$RUNTIME" ] || { echo "bolt.sh: /usr/lib/$RUNTIME missing (apt-get install libbolt-16-dev)" >&2; exit 1; }
log "instrumenting $BIN"
llvm-bolt-16 "$BIN" -instrument -o "$WORK/signpost" \
  --runtime-instrumentation-lib="$RUNTIME" \
  --instrumentation-file="$WORK/profile.fdata" > "$WORK/instrument.log" 2>&1 \
  || { tail -20 "$WORK/instrument.log" >&2; exit 1; }

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
  echo "bolt.sh: the demo service never answered through its VIP" >&2
  exit 1
}
stop_demo() {
  kill -INT "$DEV"
  wait "$DEV" || true
  DEV=
}

log "profiling signpost dev under load"
demo "$WORK/signpost"
wrk -t1 -c16 -d4s "$URL" > /dev/null
wrk -t1 -c16 -d4s -H 'Connection: close' "$URL" > /dev/null
# One request per connection: Debian 12's curl cannot reuse an h2c one.
for _ in $(seq 100); do
  curl -sf --http2-prior-knowledge "$URL" > /dev/null
done
stop_demo
[ -s "$WORK/profile.fdata" ] || { tail -20 "$WORK/dev.log" >&2; echo "bolt.sh: no profile written" >&2; exit 1; }

log "rewriting $BIN"
llvm-bolt-16 "$BIN" -o "$WORK/signpost.bolt" -data="$WORK/profile.fdata" \
  -reorder-blocks=ext-tsp -reorder-functions=hfsort+ \
  -split-functions -split-all-cold -use-gnu-stack > "$WORK/optimize.log" 2>&1 \
  || { tail -20 "$WORK/optimize.log" >&2; exit 1; }
strip -o "$WORK/signpost.stripped" "$WORK/signpost.bolt"
log "checking the rewritten binary: the demo through its VIP, HTTP/1.1 and h2c"
demo "$WORK/signpost.stripped"
for version in --http1.1 --http2-prior-knowledge; do
  answer=$(curl -sf "$version" "$URL" || true)
  [[ "$answer" == "hello from demo-"* ]] || { echo "bolt.sh: the rewritten binary answers '$answer' ($version)" >&2; exit 1; }
done
stop_demo
# Replaced, not written over: the file is a hard link to cargo's copy in
# deps/, which stays as built (the next cargo build links it back).
mv -f "$WORK/signpost.stripped" "$BIN"
log "done: $(stat -c %s "$BIN") bytes"
