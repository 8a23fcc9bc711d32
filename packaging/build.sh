#!/usr/bin/env bash
# Builds the Signpost packages from release binaries: signpost (agent and
# CLI) and signpost-control-plane, as .deb (cargo-deb) and .rpm
# (cargo-generate-rpm). Man pages and shell completions are generated from
# the binaries' clap definitions.
#
#   bash packaging/build.sh       # writes target/debian/*.deb and target/generate-rpm/*.rpm
# Needs: cargo install --locked cargo-deb cargo-generate-rpm; and for
# packaging/optimise.sh, Debian's llvm-N (rustc's LLVM version), bolt-16,
# wrk, curl and dnsutils
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/signpost/target}"
PATH="$HOME/.cache/signpost/tools/bin:$PATH"
for tool in cargo-deb cargo-generate-rpm; do
  command -v "$tool" > /dev/null || { echo "needs $tool: cargo install --locked $tool" >&2; exit 1; }
done
# The agent built and laid out by its profile (packaging/optimise.sh),
# stripped; the control plane a plain release build, stripped.
bash packaging/optimise.sh
# With the etcd store (`store: etcd`): needs protoc (protobuf-compiler).
cargo build --release --locked -p signpost-control-plane --bins --features etcd
REL="$CARGO_TARGET_DIR/release"
strip "$REL/signpost-control-plane"
GEN="$REL/gen"
mkdir -p "$GEN"
for bin in signpost signpost-control-plane; do
  "$REL/$bin" man | gzip -9n > "$GEN/$bin.1.gz"
  "$REL/$bin" completions bash > "$GEN/$bin.bash"
  "$REL/$bin" completions zsh > "$GEN/_$bin"
  "$REL/$bin" completions fish > "$GEN/$bin.fish"
done
cargo deb --no-build --locked -p signpost-agent
cargo deb --no-build --locked -p signpost-control-plane
cargo generate-rpm -p agent
cargo generate-rpm -p control-plane
ls -1 "$CARGO_TARGET_DIR"/debian/*.deb "$CARGO_TARGET_DIR"/generate-rpm/*.rpm
