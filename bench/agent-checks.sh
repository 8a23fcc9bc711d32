#!/usr/bin/env bash
# CPU and memory of one agent running N services x 1 HTTP check at 1 s
# interval against a local HTTP server (default N=1000).
#
#   bash bench/agent-checks.sh [N] [SECONDS]
#   KEEP_ALIVE=false bash bench/agent-checks.sh   # a new connection per probe
#
# Builds the release binary, writes N service definitions, starts the
# agent on 127.0.0.1 ports of its own, waits until every check passes,
# then samples the agent's CPU time (utime+stime from /proc) and RSS over
# SECONDS (default 60). Only loopback addresses are used.
set -euo pipefail
N=${1:-1000}
SECONDS_TO_MEASURE=${2:-60}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-agent --bin signpost
BIN="$CARGO_TARGET_DIR/release/signpost"

WORK=$(mktemp -d)
cleanup() { kill "${AGENT_PID:-}" "${HTTP_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

HTTP_ADDR=127.0.0.1
HTTP_PORT=18081
API=127.0.0.1:18500
python3 bench/http_ok.py "$HTTP_ADDR" "$HTTP_PORT" &
HTTP_PID=$!

mkdir -p "$WORK/services.d" "$WORK/data"
python3 - "$WORK/services.d" "$N" "$HTTP_ADDR" "$HTTP_PORT" <<'PY'
import sys
d, n, host, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
per_file = 100
for f in range(0, n, per_file):
    with open(f"{d}/bench-{f // per_file:03}.yaml", "w") as out:
        out.write("services:\n")
        for i in range(f, min(f + per_file, n)):
            out.write(f"  - name: svc-{i}\n    port: {port}\n    address: {host}\n"
                      f"    checks:\n      - http: http://{host}:{port}/health/{i}\n"
                      f"        interval: 1s\n        timeout: 2s\n")
PY
cat > "$WORK/agent.yaml" <<YAML
node_name: bench
data_dir: $WORK/data
services_dir: $WORK/services.d
api:
  listen: $API
dns:
  enabled: false
log:
  level: warn
checks:
  http_keep_alive: ${KEEP_ALIVE:-true}
YAML
"$BIN" agent --config "$WORK/agent.yaml" 2> "$WORK/agent.log" &
AGENT_PID=$!

echo "waiting for $N passing checks..."
for _ in $(seq 1 120); do
  passing=$(curl -s "http://$API/v1/health/state/passing" | python3 -c 'import json,sys; print(sum(1 for c in json.load(sys.stdin) if c["ServiceID"]))' 2>/dev/null || echo 0)
  [ "$passing" -ge "$N" ] && break
  sleep 1
done
echo "passing checks: $passing / $N"
sleep 5

ticks=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$AGENT_PID/stat"; }
probes() { curl -s "http://$API/metrics" | awk '/^signpost_agent_check_probes_total/ {s += $2} END {print s + 0}'; }
c0=$(cpu); p0=$(probes); t0=$(date +%s.%N)
max_rss=0
for _ in $(seq 1 "$SECONDS_TO_MEASURE"); do
  sleep 1
  rss=$(awk '/^VmRSS/ {print $2}' "/proc/$AGENT_PID/status")
  [ "$rss" -gt "$max_rss" ] && max_rss=$rss
done
c1=$(cpu); p1=$(probes); t1=$(date +%s.%N)
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$AGENT_PID/status")
critical=$(curl -s "http://$API/v1/health/state/critical" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
python3 - "$c0" "$c1" "$t0" "$t1" "$ticks" "$max_rss" "$hwm" "$p0" "$p1" "$N" "$critical" "${KEEP_ALIVE:-true}" <<'PY'
import sys
c0, c1, t0, t1, ticks, rss, hwm, p0, p1, n, crit, _ = sys.argv[1:]
elapsed = float(t1) - float(t0)
cpu = (float(c1) - float(c0)) / float(ticks) / elapsed * 100
print(f"services x checks: {n} x 1 HTTP @ 1s, http_keep_alive={sys.argv[12]}, measured {elapsed:.0f}s")
print(f"probes/s:          {(float(p1) - float(p0)) / elapsed:.0f}")
print(f"agent CPU:         {cpu:.1f}% of one core")
print(f"agent RSS:         max {int(rss) / 1024:.1f} MiB while measuring, peak (VmHWM) {int(hwm) / 1024:.1f} MiB")
print(f"critical checks at the end: {crit}")
PY
