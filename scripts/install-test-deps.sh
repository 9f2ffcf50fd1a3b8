#!/usr/bin/env bash
# What the integration tests need besides the build tools, skipping what is present:
# - nats-server (a real NATS server with JetStream) and openssl (the TLS test makes its
#   certificates with it), from Debian's packages;
# - tansu, a Kafka-protocol broker, built with cargo into ~/.cargo/bin once (about 15 minutes on
#   2 cores; later runs find it there).
set -euo pipefail
cd "$(dirname "$0")"
# The Debian packages come with the build tools, in one apt run.
extra=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || extra+=(nats-server)
command -v openssl >/dev/null 2>&1 || extra+=(openssl)
./install-build-deps.sh "${extra[@]}"

if ! command -v tansu >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]; then
  echo "building tansu (the Kafka-protocol broker the tests use); this takes several minutes, once" >&2
  cargo install tansu --locked --features dynostore
fi
