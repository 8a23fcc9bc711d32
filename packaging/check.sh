#!/usr/bin/env bash
# Checks the packages built by packaging/build.sh the way a user meets
# them: lintian (no errors) on the .debs, the .rpms' contents, config
# files and scripts (rpm -qip/-qlp), then on this machine (as root, without
# systemd) install the agent .deb, run the installed binary as the
# signpost user with the installed configuration, as the unit would,
# query its DNS and API, upgrade over itself, remove (config and state
# stay), purge (they go).
#
#   bash packaging/check.sh
# Needs: lintian, rpm, dig, curl; root.
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
