#!/usr/bin/env bash
# Checks the packages built by packaging/build.sh the way a user meets
# them: lintian (no errors) on the .debs, the monitoring assets in both
# formats (Prometheus rules that load, dashboards that parse), the .rpms'
# contents, config files and scripts (rpm -qip/-qlp), then on this
# machine (as root, without systemd) install the agent .deb, run the
# installed binary as the signpost user with the installed configuration,
# as the unit would, query its DNS and API, upgrade over itself (also
# under load: wrk and dnsperf through the running agent while the package
# is upgraded and the agent restarts into the new program as the postinst
# makes it under systemd: 0 failed requests, 0 lost queries), remove
# (config and state stay), purge (they go).
#
#   bash packaging/check.sh
# Needs: lintian, rpm, dig, curl, wrk, dnsperf, python3, promtool (prometheus); root.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
DEBS="$CARGO_TARGET_DIR/debian"
AGENT_DEB=$(ls "$DEBS"/signpost_*.deb)
CP_DEB=$(ls "$DEBS"/signpost-control-plane_*.deb)
fail() { echo "FAIL: $*" >&2; exit 1; }

echo "== lintian"
out=$(lintian "$AGENT_DEB" "$CP_DEB" 2>&1 | grep -v "root privileges" || true)
echo "$out"
if echo "$out" | grep -q '^E:'; then fail "lintian errors"; fi

echo "== monitoring assets: Prometheus rules and the control-plane dashboard with the control plane, the agents' dashboard with the agent"
MON=usr/share/signpost/monitoring
deb_files() { dpkg-deb -c "$1" | awk '{print $6}' | sed 's|^\./||'; }
agent_deb=$(deb_files "$AGENT_DEB")
cp_deb=$(deb_files "$CP_DEB")
echo "$agent_deb" | grep -qx "$MON/grafana-signpost-agents.json" || fail "$AGENT_DEB: no agents dashboard"
echo "$cp_deb" | grep -qx "$MON/signpost-alerts.yml" || fail "$CP_DEB: no alerting rules"
echo "$cp_deb" | grep -qx "$MON/grafana-signpost-control-plane.json" || fail "$CP_DEB: no control-plane dashboard"
agent_rpm=$(rpm -qlp "$CARGO_TARGET_DIR"/generate-rpm/signpost-0*.rpm)
cp_rpm=$(rpm -qlp "$CARGO_TARGET_DIR"/generate-rpm/signpost-control-plane-*.rpm)
echo "$agent_rpm" | grep -qx "/$MON/grafana-signpost-agents.json" || fail "agent rpm: no agents dashboard"
echo "$cp_rpm" | grep -qx "/$MON/signpost-alerts.yml" || fail "control-plane rpm: no alerting rules"
echo "$cp_rpm" | grep -qx "/$MON/grafana-signpost-control-plane.json" || fail "control-plane rpm: no control-plane dashboard"
# What was packaged loads: the rules in Prometheus's checker, the dashboards as JSON.
dpkg-deb --fsys-tarfile "$CP_DEB" | tar -xO "./$MON/signpost-alerts.yml" > /tmp/signpost-alerts.yml
promtool check rules /tmp/signpost-alerts.yml || fail "the packaged alerting rules do not load"
for deb in "$AGENT_DEB" "$CP_DEB"; do
  for dashboard in $(deb_files "$deb" | grep "^$MON/grafana-.*\.json$"); do
    dpkg-deb --fsys-tarfile "$deb" | tar -xO "./$dashboard" | python3 -m json.tool > /dev/null \
      || fail "$deb: $dashboard is not JSON"
  done
done

echo "== rpm contents and scripts"
for rpm in "$CARGO_TARGET_DIR"/generate-rpm/signpost-*.rpm; do
  rpm -qip "$rpm" > /dev/null || fail "$rpm: unreadable"
  files=$(rpm -qlp "$rpm")
  scripts=$(rpm -qp --scripts "$rpm")
  echo "$files" | grep -q '^/usr/bin/signpost' || fail "$rpm: no binary"
  echo "$files" | grep -q '^/usr/lib/systemd/system/signpost' || fail "$rpm: no unit"
  echo "$files" | grep -q '^/usr/share/man/man1/' || fail "$rpm: no man page"
  rpm -qp --configfiles "$rpm" | grep -q '^/etc/signpost/' || fail "$rpm: no config file"
  echo "$scripts" | grep -q 'useradd --system' || fail "$rpm: no user creation"
  echo "$rpm: $(echo "$files" | wc -l) files"
done

echo "== install"
apt-get install -y -qq "$AGENT_DEB" > /dev/null
getent passwd signpost > /dev/null || fail "no signpost user"
[ "$(stat -c %U /var/lib/signpost)" = signpost ] || fail "/var/lib/signpost not owned by signpost"
[ -f /etc/signpost/agent.yaml ] || fail "no /etc/signpost/agent.yaml"
[ -f /lib/systemd/system/signpost.service ] || fail "no unit"
[ -f /usr/share/man/man1/signpost.1.gz ] || fail "no man page"

run_agent() {
  setpriv --reuid signpost --regid signpost --init-groups /usr/bin/signpost agent --config /etc/signpost/agent.yaml --validate > /dev/null
  setpriv --reuid signpost --regid signpost --init-groups /usr/bin/signpost agent --config /etc/signpost/agent.yaml > /tmp/signpost-check.log 2>&1 &
  PID=$!
  for _ in $(seq 50); do
    curl -sf http://127.0.0.1:8500/v1/agent/self > /dev/null && break
    sleep 0.1
  done
  curl -sf http://127.0.0.1:8500/v1/agent/self | grep -q NodeName || { cat /tmp/signpost-check.log; fail "API does not answer"; }
  cp /usr/share/doc/signpost/README.md /dev/null
  cat > /etc/signpost/services.d/check.yaml <<YAML
services:
  - name: check-web
    port: 18080
YAML
  for _ in $(seq 50); do
    [ -n "$(dig +short @127.0.0.1 -p 8600 check-web.service.internal)" ] && break
    sleep 0.1
  done
  [ -n "$(dig +short @127.0.0.1 -p 8600 check-web.service.internal)" ] || { cat /tmp/signpost-check.log; fail "DNS does not answer"; }
  kill -TERM "$PID"; wait "$PID" || fail "the agent did not stop cleanly on SIGTERM"
}
echo "== run as the unit would"
run_agent
[ -f /var/lib/signpost/node-id ] || fail "no state in /var/lib/signpost"

echo "== upgrade under load: nothing dropped"
# The agent runs as the unit would; an instance behind it; wrk (keep-alive
# and a connection per request) and dnsperf through it while the package
# is upgraded. Without systemd here, this sends the SIGUSR2 the postinst
# sends with systemctl kill: the new program takes over the sockets.
setpriv --reuid signpost --regid signpost --init-groups /usr/bin/signpost agent --config /etc/signpost/agent.yaml > /tmp/signpost-check.log 2>&1 &
PID=$!
python3 -m http.server 18080 --bind 127.0.0.1 --directory /usr/share/doc/signpost > /dev/null 2>&1 &
WEB=$!
VIP=""
for _ in $(seq 100); do
  VIP=$(dig +short @127.0.0.1 -p 8600 check-web.service.internal 2> /dev/null | head -1 || true)
  [ -n "$VIP" ] && curl -sf "http://$VIP:18080/README.md" > /dev/null && break
  sleep 0.1
done
[ -n "$VIP" ] || { cat /tmp/signpost-check.log; fail "no VIP for check-web"; }
echo "check-web.service.internal A" > /tmp/signpost-queries
wrk -t1 -c4 -d300s "http://$VIP:18080/README.md" > /tmp/signpost-wrk-ka 2>&1 &
KA=$!
wrk -t1 -c2 -d300s -H "Connection: close" "http://$VIP:18080/README.md" > /tmp/signpost-wrk-close 2>&1 &
CL=$!
dnsperf -s 127.0.0.1 -p 8600 -d /tmp/signpost-queries -l 300 -Q 500 -t 2 > /tmp/signpost-dnsperf 2>&1 &
DP=$!
sleep 1
apt-get install -y -qq --reinstall "$AGENT_DEB" > /dev/null
kill -USR2 "$PID"
NEW=""
for _ in $(seq 100); do
  NEW=$(curl -sf http://127.0.0.1:8500/v1/signpost/status | python3 -c 'import json, sys; print(json.load(sys.stdin)["pid"])' 2> /dev/null || true)
  [ -n "$NEW" ] && [ "$NEW" != "$PID" ] && break
  sleep 0.1
done
if [ -z "$NEW" ] || [ "$NEW" = "$PID" ]; then
  cat /tmp/signpost-check.log
  fail "no new agent process after the upgrade"
fi
readlink "/proc/$NEW/exe" | grep -qv deleted || fail "the new process does not run the upgraded program"
wait "$PID" || fail "the old agent process did not exit cleanly"
sleep 1
kill -INT "$KA" "$CL" "$DP"
wait "$KA" "$CL" "$DP" || true
cat /tmp/signpost-wrk-ka /tmp/signpost-wrk-close
grep -E "Queries (sent|completed|lost)" /tmp/signpost-dnsperf
for out in /tmp/signpost-wrk-ka /tmp/signpost-wrk-close; do
  ! grep -qE "Socket errors|Non-2xx" "$out" || fail "requests failed during the upgrade ($out)"
  grep -q " requests in " "$out" || fail "no load ran ($out)"
done
grep -qE "Queries lost: +0 " /tmp/signpost-dnsperf || fail "DNS queries lost during the upgrade"
kill -TERM "$NEW"
# Not this script's child (the old agent started it): gone, or a zombie.
running() { [ -e "/proc/$1" ] && ! grep -qE '^State:\s+Z' "/proc/$1/status"; }
for _ in $(seq 100); do running "$NEW" || break; sleep 0.1; done
! running "$NEW" || fail "the new agent process did not stop on SIGTERM"
# The instance may have ended with the load already.
kill "$WEB" 2> /dev/null || true

echo "== upgrade over itself keeps config edits and state"
echo "# edited by the check" >> /etc/signpost/agent.yaml
id_before=$(cat /var/lib/signpost/node-id)
apt-get install -y -qq --reinstall "$AGENT_DEB" > /dev/null
grep -q "edited by the check" /etc/signpost/agent.yaml || fail "config edit lost on upgrade"
[ "$(cat /var/lib/signpost/node-id)" = "$id_before" ] || fail "state lost on upgrade"
run_agent

echo "== remove keeps config and state"
apt-get remove -y -qq signpost > /dev/null
[ ! -e /usr/bin/signpost ] || fail "binary left after remove"
[ -f /etc/signpost/agent.yaml ] || fail "config removed by remove"
[ -d /var/lib/signpost ] || fail "state removed by remove"

echo "== purge removes them"
apt-get purge -y -qq signpost > /dev/null
rm -f /etc/signpost/services.d/check.yaml
[ ! -e /etc/signpost/agent.yaml ] || fail "config left after purge"
[ ! -e /var/lib/signpost ] || fail "state left after purge"
! getent passwd signpost > /dev/null || fail "user left after purge"
echo "packages OK"
