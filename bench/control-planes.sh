# shellcheck shell=bash
# What the control-plane benchmarks (bench/sync.sh, bench/propagation.sh)
# share, sourced from the repository root after WORK, PIDS, TOKEN and CP
# (the release signpost-control-plane) are set:
#   start_control_planes file   one control plane on files
#   start_control_planes etcd   a local etcd member and three replicas on it
# Replica n (from 0) listens for agents on 127.0.0.1:1830n and for HTTP on
# 127.0.0.1:1870n; they share one certificate ($WORK/cp0/tls). GRPC lists
# the replicas' gRPC addresses; ETCD_URL is etcd's client URL (etcd only).

start_control_planes() {
  local store=$1 replicas=1
  local extra=""
  if [ "$store" = etcd ]; then
    replicas=3
    ETCD_URL=http://127.0.0.1:12379
    etcd --name bench --data-dir "$WORK/etcd" \
      --listen-client-urls "$ETCD_URL" --advertise-client-urls "$ETCD_URL" \
      --listen-peer-urls http://127.0.0.1:12380 \
      --initial-advertise-peer-urls http://127.0.0.1:12380 \
      --initial-cluster bench=http://127.0.0.1:12380 \
      --log-level warn 2> "$WORK/etcd.log" &
    PIDS+=($!)
    for _ in $(seq 1 100); do curl -sf "$ETCD_URL/health" | grep -q true && break; sleep 0.1; done
    extra=$(printf 'store: etcd\netcd:\n  endpoints: ["%s"]\n  prefix: /bench/\n' "$ETCD_URL")
  fi
  GRPC=()
  CP_PIDS=()
  for n in $(seq 0 $((replicas - 1))); do
    local tls=""
    if [ "$n" -gt 0 ]; then
      tls=$(printf '  cert_file: %s\n  key_file: %s\n' "$WORK/cp0/tls/server.pem" "$WORK/cp0/tls/server-key.pem")
    fi
    cat > "$WORK/cp$n.yaml" <<YAML
data_dir: $WORK/cp$n
agent_tokens: [$TOKEN]
grpc:
  listen: 127.0.0.1:1830$n
$tls
http:
  listen: 127.0.0.1:1870$n
  plaintext: true   # loopback only: the scripts read it with plain curl
log:
  level: warn
$extra
YAML
    [ "$n" -gt 0 ] || "$CP" --config "$WORK/cp0.yaml" init-tls --name 127.0.0.1 > /dev/null
    "$CP" --config "$WORK/cp$n.yaml" 2> "$WORK/cp$n.log" &
    PIDS+=($!)
    CP_PIDS+=($!)
    GRPC+=("127.0.0.1:1830$n")
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:1870$n/v1/nodes" > /dev/null && break; sleep 0.1; done
  done
}

# etcd_counter NAME: the sum of a counter in etcd's /metrics (0 if absent).
etcd_counter() {
  curl -sf "$ETCD_URL/metrics" | awk -v name="$1" '$1 == name || index($1, name "{") == 1 {s += $2} END {printf "%d\n", s}'
}

# cp_usage: CPU seconds and peak RSS (MiB) of every control-plane process.
cp_usage() {
  local ticks
  ticks=$(getconf CLK_TCK)
  for pid in "${CP_PIDS[@]}"; do
    awk -v t="$ticks" '{printf "%.2f ", ($14 + $15) / t}' "/proc/$pid/stat"
    awk '/^VmHWM/ {printf "%.1f\n", $2 / 1024}' "/proc/$pid/status"
  done
}
