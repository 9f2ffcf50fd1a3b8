#!/usr/bin/env bash
# What the integration tests need besides the build tools, skipping what is present:
# - nats-server (a real NATS server with JetStream), openssl (the TLS test makes its
#   certificates with it) and sqlite3 (the chaos run indexes tansu's storage), from Debian's
#   packages;
# - promtool (Debian's prometheus package: the alert rules' check and unit tests), systemd-analyze
#   (Debian's systemd package: the unit's verify and security score) and strace (the system calls
#   the daemon makes, against the unit's filter), for tests/deploy.rs, and for the admin test's check of /metrics;
# - ruby-actioncable and puma (a real Rails ActionCable server with a RoomChannel written as
#   Chatwoot's, tests/actioncable.rs);
# - tansu, a Kafka-protocol broker, built with cargo into ~/.cargo/bin once (about 15 minutes on
#   2 cores; later runs find it there), with SQLite storage: the chaos run (scripts/chaos.sh)
#   kills and restarts it and needs what it acknowledged kept; a tansu without it is rebuilt.
set -euo pipefail
cd "$(dirname "$0")"
# The Debian packages come with the build tools, in one apt run.
extra=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || extra+=(nats-server)
command -v openssl >/dev/null 2>&1 || extra+=(openssl)
command -v sqlite3 >/dev/null 2>&1 || extra+=(sqlite3)
command -v promtool >/dev/null 2>&1 || extra+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || extra+=(systemd)
command -v strace >/dev/null 2>&1 || extra+=(strace)
command -v puma >/dev/null 2>&1 || extra+=(puma)
ruby -e 'require "action_cable"' >/dev/null 2>&1 || extra+=(ruby-actioncable)
./install-build-deps.sh "${extra[@]}"

tansu=$(command -v tansu 2>/dev/null || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu")
# Whether this tansu can store in SQLite: one without it names the feature as it starts.
tansu_has_sqlite() {
  local dir
  dir=$(mktemp -d)
  (cd "$dir" && timeout 2 "$tansu" broker --storage-engine sqlite://probe.db \
    --listener-url tcp://127.0.0.1:0 --advertised-listener-url tcp://127.0.0.1:0) >"$dir/log" 2>&1 || true
  if grep -q FeatureNotEnabled "$dir/log"; then
    rm -rf "$dir"
    return 1
  fi
  rm -rf "$dir"
}
if [ ! -x "$tansu" ] || ! tansu_has_sqlite; then
  echo "building tansu (the Kafka-protocol broker the tests use); this takes several minutes, once" >&2
  cargo install tansu --locked --features dynostore,libsql
fi
