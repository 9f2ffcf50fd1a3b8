#!/usr/bin/env bash
# What a fresh Debian/Ubuntu machine needs to build chatwoot-bridge, skipping what is present:
# rdkafka builds the bundled librdkafka with cmake, against OpenSSL, libcurl and zlib headers.
# Extra Debian packages to install may be given as arguments.
set -euo pipefail

need=("$@")
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
for pkg in libssl-dev libcurl4-openssl-dev zlib1g-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing build tools: ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
