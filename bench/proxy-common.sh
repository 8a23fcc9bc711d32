# shellcheck shell=bash
# What bench/proxy.sh and bench/proxy-instructions.sh share, sourced by
# both: the nginx configuration pieces, the upstream (one nginx serving
# two HTTP instances that answer `200 ok\n`) and HAProxy's HTTP part.
# Expects WORK (a directory), ME (the user nginx runs as) and PIDS (the
# processes to stop at exit).

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
