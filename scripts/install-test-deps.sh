#!/usr/bin/env bash
# Installs what the sink integration tests (tests/sinks.rs) need, skipping what is present:
# - nats-server (real NATS with JetStream) and the build tools of rdkafka's bundled librdkafka
#   (cmake; OpenSSL and libcurl headers with pkg-config, for the `ssl` and `curl` features);
# - tansu, a Kafka-protocol broker, built with cargo into ~/.cargo/bin (this takes a while).
set -euo pipefail

need_apt=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || need_apt+=(nats-server)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
dpkg -s libssl-dev >/dev/null 2>&1 || need_apt+=(libssl-dev)
dpkg -s libcurl4-openssl-dev >/dev/null 2>&1 || need_apt+=(libcurl4-openssl-dev)
dpkg -s zlib1g-dev >/dev/null 2>&1 || need_apt+=(zlib1g-dev)

if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "installing: ${need_apt[*]}"
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${need_apt[@]}"
else
    echo "apt packages present: nats-server cmake pkg-config libssl-dev libcurl4-openssl-dev zlib1g-dev"
fi

if command -v tansu >/dev/null 2>&1 || [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ]; then
    echo "tansu present"
else
    echo "building tansu (Kafka-protocol broker for the tests); this takes several minutes"
    cargo install tansu --locked --features dynostore
fi
