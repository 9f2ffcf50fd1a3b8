#!/usr/bin/env bash
# See events flow with no Chatwoot and no broker: a mock Chatwoot and the bridge, printing
# CloudEvents JSON lines to stdout. Installs the build tools it needs when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -x scripts/install-build-deps.sh ]; then
  scripts/install-build-deps.sh
fi

exec cargo run --release --locked -- demo "$@"
