#!/usr/bin/env bash
# The KV store (issue 30):
#  1. WATCHERS blocking watchers of one key spread over AGENTS agents
#     (each agent's cache holds one upstream watch); one write through an
#     agent, and the time until each watcher has its answer: p50, p99 and
#     max over ROUNDS writes. Goal: p99 < 200 ms.
#  2. Write and read throughput through an agent (wrk, 16 connections:
#     PUT /v1/kv/bench/k; GET served from the agent's cache; GET
#     ?consistent from the control plane), against etcd on the same
#     machine in the same run: its gRPC gateway with the same wrk load
#     (POST /v3/kv/put, /v3/kv/range), and etcdctl put/get run one after
#     another for SECONDS each (the rate of etcd's own CLI).
#
#   bash bench/kv.sh [WATCHERS] [AGENTS] [ROUNDS] [SECONDS]   # default 1000 10 5 10
set -euo pipefail
WATCHERS=${1:-1000}
AGENTS=${2:-10}
ROUNDS=${3:-5}
SECS=${4:-10}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-agent -p signpost-control-plane --bins
BIN="$CARGO_TARGET_DIR/release"
# etcd and etcdctl: Debian's etcd-server and etcd-client.
for tool in wrk etcd etcdctl curl python3 bc; do
  command -v "$tool" > /dev/null || { echo "needs $tool"; exit 1; }
done

WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
CP=http://127.0.0.1:18700

cat > "$WORK/cp.yaml" <<EOF
data_dir: $WORK/cp
grpc:
  listen: 127.0.0.1:18300
http:
  listen: 127.0.0.1:18700
  plaintext: true
agent_tokens: [bench-agent-token]
log:
  level: warn
EOF
"$BIN/signpost-control-plane" --config "$WORK/cp.yaml" init-tls > /dev/null
"$BIN/signpost-control-plane" --config "$WORK/cp.yaml" 2> "$WORK/cp.log" &
PIDS+=($!)
until curl -sf -o /dev/null "$CP/v1/nodes"; do sleep 0.1; done

for i in $(seq 1 "$AGENTS"); do
  mkdir -p "$WORK/a$i/services.d"
  cat > "$WORK/a$i/agent.yaml" <<EOF
node_name: bench-$i
data_dir: $WORK/a$i/data
services_dir: $WORK/a$i/services.d
advertise_addr: 127.0.1.$i
liveness_port: 0
api:
  listen: 127.0.1.$i:18500
dns:
  enabled: false
proxy:
  enabled: false
log:
  level: warn
control_plane:
  addresses: ["127.0.0.1:18300"]
  ca_file: $WORK/cp/tls/ca.pem
  token: bench-agent-token
  http: $CP
EOF
  "$BIN/signpost" agent --config "$WORK/a$i/agent.yaml" 2>> "$WORK/a$i/agent.log" &
  PIDS+=($!)
done
for i in $(seq 1 "$AGENTS"); do
  until curl -sf -o /dev/null "http://127.0.1.$i:18500/v1/status/leader"; do sleep 0.1; done
done
curl -sf -X PUT --data-binary start "http://127.0.1.1:18500/v1/kv/bench/watched" > /dev/null

echo "== $WATCHERS watchers of one key over $AGENTS agents, $ROUNDS writes"
python3 - "$WATCHERS" "$AGENTS" "$ROUNDS" <<'EOF'
import asyncio, statistics, sys, time
watchers, agents, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

async def request(host, method, path, body=b""):
    r, w = await asyncio.open_connection(host, 18500)
    w.write(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    await w.drain()
    data = await r.read()
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    index = [int(l.split(":")[1]) for l in lines if l.lower().startswith("x-consul-index")]
    if not index:
        raise SystemExit(f"{method} {host}{path}: {lines[0] if lines else 'no answer'} {body[:200]!r}")
    return index[0]

async def watch(host, index, done):
    await request(host, "GET", f"/v1/kv/bench/watched?index={index}&wait=5m")
    done.append(time.monotonic())

async def main():
    hosts = [f"127.0.1.{1 + i % agents}" for i in range(watchers)]
    all_ms = []
    for n in range(rounds):
        index = await request(hosts[0], "GET", "/v1/kv/bench/watched")
        done = []
        tasks = [asyncio.create_task(watch(h, index, done)) for h in hosts]
        await asyncio.sleep(2)  # every watcher's request is in
        t0 = time.monotonic()
        await request(hosts[0], "PUT", "/v1/kv/bench/watched", f"v{n}".encode())
        await asyncio.gather(*tasks)
        ms = sorted((t - t0) * 1000 for t in done)
        all_ms += ms
        print(f"  round {n + 1}: {len(ms)} woken, p50 {ms[len(ms) // 2]:.1f} ms, p99 {ms[int(len(ms) * 0.99) - 1]:.1f} ms, max {ms[-1]:.1f} ms")
    all_ms.sort()
    print(f"  all: {len(all_ms)} wakes, p50 {statistics.median(all_ms):.1f} ms, p99 {all_ms[int(len(all_ms) * 0.99) - 1]:.1f} ms, max {all_ms[-1]:.1f} ms")

asyncio.run(main())
EOF

cat > "$WORK/put.lua" <<'EOF'
wrk.method = "PUT"
wrk.body = "a-value-of-some-thirty-bytes!!"
EOF
rate() { awk '/Requests\/sec/ {print $2}'; }
echo "== throughput, wrk -t2 -c16 -d${SECS}s"
A=http://127.0.1.2:18500
SP_PUT=$(wrk -t2 -c16 -d"${SECS}s" -s "$WORK/put.lua" "$A/v1/kv/bench/k" | rate)
SP_GET=$(wrk -t2 -c16 -d"${SECS}s" "$A/v1/kv/bench/k" | rate)
SP_CGET=$(wrk -t2 -c16 -d"${SECS}s" "$A/v1/kv/bench/k?consistent" | rate)

etcd --name bench --data-dir "$WORK/etcd" --listen-client-urls http://127.0.0.1:23791 \
  --advertise-client-urls http://127.0.0.1:23791 --listen-peer-urls http://127.0.0.1:23801 \
  --initial-advertise-peer-urls http://127.0.0.1:23801 --initial-cluster bench=http://127.0.0.1:23801 \
  > "$WORK/etcd.log" 2>&1 &
PIDS+=($!)
export ETCDCTL_API=3
until etcdctl --endpoints=127.0.0.1:23791 endpoint health > /dev/null 2>&1; do sleep 0.2; done
cat > "$WORK/etcd-put.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"key": "YmVuY2gvaw==", "value": "YS12YWx1ZS1vZi1zb21lLXRoaXJ0eS1ieXRlcyEh"}'
EOF
cat > "$WORK/etcd-get.lua" <<'EOF'
wrk.method = "POST"
wrk.body = '{"key": "YmVuY2gvaw=="}'
EOF
ETCD_PUT=$(wrk -t2 -c16 -d"${SECS}s" -s "$WORK/etcd-put.lua" http://127.0.0.1:23791/v3/kv/put | rate)
ETCD_GET=$(wrk -t2 -c16 -d"${SECS}s" -s "$WORK/etcd-get.lua" http://127.0.0.1:23791/v3/kv/range | rate)
count_for() {  # runs "$@" one after another for SECS seconds; prints the rate
  local n=0 end=$((SECONDS + SECS))
  while [ $SECONDS -lt $end ]; do "$@" > /dev/null; n=$((n + 1)); done
  echo "scale=1; $n / $SECS" | bc
}
CTL_PUT=$(count_for etcdctl --endpoints=127.0.0.1:23791 put bench/k a-value)
CTL_GET=$(count_for etcdctl --endpoints=127.0.0.1:23791 get bench/k)
CURL_PUT=$(count_for curl -sf -X PUT --data-binary a-value "$A/v1/kv/bench/k")
CURL_GET=$(count_for curl -sf "$A/v1/kv/bench/k")

ratio() { echo "scale=2; $1 / $2" | bc; }
printf '  %-44s %10s req/s\n' "signpost PUT through an agent" "$SP_PUT"
printf '  %-44s %10s req/s\n' "signpost GET (agent cache)" "$SP_GET"
printf '  %-44s %10s req/s\n' "signpost GET ?consistent (control plane)" "$SP_CGET"
printf '  %-44s %10s req/s\n' "etcd gateway put" "$ETCD_PUT"
printf '  %-44s %10s req/s\n' "etcd gateway range" "$ETCD_GET"
printf '  %-44s %10s /s\n' "etcdctl put, one after another" "$CTL_PUT"
printf '  %-44s %10s /s\n' "etcdctl get, one after another" "$CTL_GET"
printf '  %-44s %10s /s\n' "curl PUT through an agent, one after another" "$CURL_PUT"
printf '  %-44s %10s /s\n' "curl GET through an agent, one after another" "$CURL_GET"
echo "  ratios (signpost / etcd): put $(ratio "$SP_PUT" "$ETCD_PUT"), get $(ratio "$SP_GET" "$ETCD_GET"), consistent get $(ratio "$SP_CGET" "$ETCD_GET"); one after another: put $(ratio "$CURL_PUT" "$CTL_PUT"), get $(ratio "$CURL_GET" "$CTL_GET")"
