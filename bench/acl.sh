#!/usr/bin/env bash
# What ACLs cost on the agent's local API: an authorized registration
# (PUT /v1/agent/service/register, each token writing its own service)
# and a filtered health query (GET /v1/health/service/web-0, through the
# read filter), with TOKENS service-identity tokens cached by the agent,
# picked at random per request by wrk; against the same requests on the
# same agent restarted with ACLs open (default_policy: allow, no token).
# The agent's resolutions counter shows that no measured request went to
# the control plane (all cache hits).
#
#   bash bench/acl.sh [TOKENS] [SECONDS]   # default 1000 10
set -euo pipefail
TOKENS=${1:-1000}
SECS=${2:-10}
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
cargo build --release -q -p signpost-agent -p signpost-control-plane --bins
BIN="$CARGO_TARGET_DIR/release"
command -v wrk > /dev/null || { echo "needs wrk (apt install wrk)"; exit 1; }

WORK=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
CA="$WORK/cp/tls/ca.pem"
CP=https://127.0.0.1:18700
API=http://127.0.0.1:18500

cat > "$WORK/cp.yaml" <<EOF
data_dir: $WORK/cp
grpc:
  listen: 127.0.0.1:18300
http:
  listen: 127.0.0.1:18700
acl:
  default_policy: deny
log:
  level: warn
EOF
"$BIN/signpost-control-plane" --config "$WORK/cp.yaml" init-tls > /dev/null
"$BIN/signpost-control-plane" --config "$WORK/cp.yaml" 2> "$WORK/cp.log" &
PIDS+=($!)
until curl -sf --cacert "$CA" -o /dev/null -H "X-Consul-Token: $(cat "$WORK/cp/bootstrap-token" 2>/dev/null)" "$CP/v1/nodes"; do sleep 0.1; done
ADMIN=$(cat "$WORK/cp/bootstrap-token")

# Makes the node's token and TOKENS service tokens (web-0 ... ), one
# secret per line in tokens.txt.
python3 - "$CP" "$CA" "$ADMIN" "$TOKENS" "$WORK" <<'EOF'
import json, ssl, sys, urllib.request
cp, ca, admin, n, work = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
ctx = ssl.create_default_context(cafile=ca)
def token(body):
    req = urllib.request.Request(cp + "/v1/acl/token", method="PUT", data=json.dumps(body).encode(),
                                 headers={"X-Consul-Token": admin})
    return json.load(urllib.request.urlopen(req, context=ctx))["SecretID"]
open(work + "/node-token", "w").write(token({"NodeIdentities": [{"NodeName": "bench"}]}))
with open(work + "/tokens.txt", "w") as f:
    for i in range(n):
        f.write(token({"ServiceIdentities": [{"ServiceName": f"web-{i}"}]}) + "\n")
EOF

agent_config() {
  cat > "$WORK/agent.yaml" <<EOF
node_name: bench
data_dir: $WORK/agent
services_dir: $WORK/services.d
advertise_addr: 127.0.0.1
liveness_port: 0
api:
  listen: 127.0.0.1:18500
dns:
  enabled: false
proxy:
  enabled: false
log:
  level: warn
control_plane:
  addresses: ["127.0.0.1:18300"]
  ca_file: $CA
  token: $(cat "$WORK/node-token")
acl:
  default_policy: $1
EOF
}
start_agent() {
  agent_config "$1"
  "$BIN/signpost" agent --config "$WORK/agent.yaml" 2>> "$WORK/agent.log" &
  AGENT=$!
  PIDS+=("$AGENT")
  until curl -sf -o /dev/null "$API/v1/status/leader"; do sleep 0.1; done
  until curl -sf "$API/v1/signpost/status" -H "X-Consul-Token: $(cat "$WORK/node-token")" | grep -q '"connected":true'; do sleep 0.1; done
}
mkdir -p "$WORK/services.d"

# wrk scripts: a random token per request (none with ACLs open).
cat > "$WORK/common.lua" <<EOF
tokens = {}
for line in io.lines("$WORK/tokens.txt") do tokens[#tokens + 1] = line end
use_tokens = os.getenv("ACL") == "1"
EOF
cat > "$WORK/register.lua" <<EOF
dofile("$WORK/common.lua")
request = function()
  local i = math.random(#tokens)
  local headers = {}
  if use_tokens then headers["X-Consul-Token"] = tokens[i] end
  local body = string.format('{"Name":"web-%d","ID":"web-%d","Port":%d}', i - 1, i - 1, 8000 + (i % 1000))
  return wrk.format("PUT", "/v1/agent/service/register", headers, body)
end
EOF
cat > "$WORK/health.lua" <<EOF
dofile("$WORK/common.lua")
request = function()
  local headers = {}
  if use_tokens then headers["X-Consul-Token"] = tokens[math.random(#tokens)] end
  return wrk.format("GET", "/v1/health/service/web-0", headers)
end
EOF

resolutions() {
  local v
  v=$(curl -s "$API/metrics" -H "X-Consul-Token: $(cat "$WORK/node-token")" | awk -v o="$1" '$1 == "signpost_agent_acl_token_resolutions_total{outcome=\""o"\"}" {print $2}')
  echo "${v:-0}"
}
rate() { awk '/Requests\/sec/ {print $2}' "$1"; }
p99() { awk '/ 99%/ {print $2}' "$1"; }

run() { # MODE(acl|open) SCRIPT -> $WORK/MODE-SCRIPT.out
  local acl=0; [ "$1" = acl ] && acl=1
  ACL=$acl wrk -t2 -c16 -d"${SECS}s" --latency -s "$WORK/$2.lua" "$API" > "$WORK/$1-$2.out"
}

# ACLs on: warm the cache (one request per token), then measure.
start_agent deny
while read -r t; do curl -s -o /dev/null -H "X-Consul-Token: $t" "$API/v1/health/service/web-0"; done < "$WORK/tokens.txt"
R0=$(resolutions resolved)
run acl register
run acl health
R1=$(resolutions resolved)
C1=$(resolutions cached)
kill "$AGENT"; wait "$AGENT" 2>/dev/null || true

# ACLs open: the same agent and requests without tokens.
start_agent allow
run open register
run open health
kill "$AGENT"; wait "$AGENT" 2>/dev/null || true

echo "tokens cached: $TOKENS; round trips to the control plane while measuring: $((R1 - R0)) (cache hits: $C1)"
printf '%-22s %12s %12s %8s %10s %10s\n' request "acl req/s" "open req/s" ratio "acl p99" "open p99"
for s in register health; do
  a=$(rate "$WORK/acl-$s.out"); o=$(rate "$WORK/open-$s.out")
  printf '%-22s %12s %12s %8.2f %10s %10s\n' "$s" "$a" "$o" "$(echo "$a / $o" | bc -l)" "$(p99 "$WORK/acl-$s.out")" "$(p99 "$WORK/open-$s.out")"
done
