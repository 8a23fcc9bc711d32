# shellcheck shell=bash
# What the proxy benchmarks (bench/proxy.sh, proxy-instructions.sh,
# proxy-ab.sh) share, sourced from the repository root: finding oha,
# building the agent with a work directory cleaned up at exit
# (bench_start), the nginx configuration pieces, the upstream (one nginx
# serving two HTTP instances that answer `200 ok\n`), an agent proxying
# to it (web_agent) and HAProxy's HTTP part.

OHA=${OHA:-$HOME/.cache/signpost/tools/bin/oha}
[ -x "$OHA" ] || OHA=$(command -v oha || true)
ME=$(id -un)

log() { echo "[$(date +%T)] $*" >&2; }

# bench_start: builds the agent (BIN) and makes WORK, removed at exit
# with the processes in PIDS stopped; on a failure, the logs' last lines.
bench_start() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
  # As packaged: built and laid out by its profile.
  bash packaging/optimise.sh
  # shellcheck disable=SC2034 # used by the scripts that source this
  BIN="$CARGO_TARGET_DIR/release/signpost"
  WORK=$(mktemp -d)
  chmod 755 "$WORK"
  PIDS=()
  trap cleanup EXIT
}

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "failed (exit $rc); the last lines of the logs in $WORK:" >&2
    for log in "$WORK"/*.log "$WORK"/*/*.log; do
      [ -s "$log" ] && { echo "== $log" >&2; tail -n 30 "$log" >&2; }
    done
  fi
  kill "${PIDS[@]}" 2> /dev/null || true
  wait 2> /dev/null || true
  rm -rf "$WORK"
}

# nginx_conf DIR -> the global part of an nginx configuration kept in DIR.
nginx_conf() {
  mkdir -p "$1"
  cat <<CONF
daemon off;
master_process on;
worker_processes auto;
user $ME;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 8192; }
CONF
}

# nginx_http_common DIR -> what every http block here starts with.
nginx_http_common() {
  cat <<CONF
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path $1/body;
  proxy_temp_path $1/proxy;
  fastcgi_temp_path $1/fastcgi;
  uwsgi_temp_path $1/uwsgi;
  scgi_temp_path $1/scgi;
CONF
}

# start_upstream PORT1 PORT2: one nginx serving both HTTP instances.
start_upstream() {
  {
    nginx_conf "$WORK/upstream"
    echo "http {"
    nginx_http_common "$WORK/upstream"
    cat <<CONF
  server { listen 127.0.0.1:$1; location / { return 200 "ok\n"; } }
  server { listen 127.0.0.1:$2; location / { return 200 "ok\n"; } }
}
CONF
  } > "$WORK/upstream.conf"
  nginx -p "$WORK/upstream" -c "$WORK/upstream.conf" 2> "$WORK/upstream.log" &
  PIDS+=($!)
}

# web_agent DIR NAME API DNS HTTP VIP_RANGE UPSTREAM1 UPSTREAM2: an agent's
# configuration in DIR/agent.yaml (API, DNS and the proxy's HTTP port on
# loopback, VIPs from VIP_RANGE) with the service web, both upstream
# instances, in DIR/services.d.
web_agent() {
  mkdir -p "$1/services.d"
  cat > "$1/services.d/web.yaml" <<YAML
services:
  - {name: web, id: web-1, address: 127.0.0.1, port: $7, protocol: http}
  - {name: web, id: web-2, address: 127.0.0.1, port: $8, protocol: http}
YAML
  cat > "$1/agent.yaml" <<YAML
node_name: $2
data_dir: $1/data
services_dir: $1/services.d
advertise_addr: 127.0.0.1
api: {listen: "127.0.0.1:$3"}
dns: {listen: "127.0.0.1:$4", recursors: []}
proxy: {vip_range: $6, http_port: $5, access_log: false}
log: {level: warn}
YAML
}

# haproxy_http_conf PORT UPSTREAM1 UPSTREAM2 -> HAProxy in mode http on
# PORT, round robin over both instances, keep-alive to them.
haproxy_http_conf() {
  cat <<CONF
global
  maxconn 8000
defaults
  mode http
  option http-keep-alive
  http-reuse always
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  timeout http-keep-alive 75s
frontend web
  bind 127.0.0.1:$1
  default_backend web
backend web
  balance roundrobin
  server web-1 127.0.0.1:$2
  server web-2 127.0.0.1:$3
CONF
}
