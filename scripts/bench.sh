#!/usr/bin/env bash
# Runs the benchmark set of BENCHMARKS.md and prints its tables. Loopback only; every process it
# starts is stopped by the harness. Needs nats-server and tansu (`cargo install tansu`) on the
# PATH or named by BENCH_NATS_SERVER / BENCH_TANSU, and, for the Python context figure,
# bench/venv (python3 -m venv bench/venv && bench/venv/bin/pip install websockets nats-py).
#
#   scripts/bench.sh                 # everything (about 25 minutes on 2 cores)
#   scripts/bench.sh throughput      # one part: throughput | latency | scale | backlog | python | micro
#   BENCH_BRIDGE=other/chatwoot-bridge scripts/bench.sh throughput   # another build, same harness
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
REPS="${REPS:-2}"
# Throughput runs are short and scatter most: five, and the median ratio is the figure.
THROUGHPUT_REPS="${THROUGHPUT_REPS:-5}"
COUNT="${COUNT:-200000}"
SCALE_OBSERVE="${SCALE_OBSERVE:-300}"
cargo build --release --bin chatwoot-bridge --example bench
B="$CARGO_TARGET_DIR/release/examples/bench"
# 10,000 sockets need 10,000+ descriptors in the bridge and in the mock server.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

part="${1:-all}"
run() { [[ "$part" == all || "$part" == "$1" ]]; }

echo "# machine: $(nproc) cores; $(free -h | awk '/Mem:/ {print $2}') memory; $(date -u +%FT%TZ); $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if run throughput; then
  "$B" throughput --sink nats --count "$COUNT" --reps "$THROUGHPUT_REPS" --with-reader 1
  "$B" throughput --sink jetstream --count "$COUNT" --reps "$THROUGHPUT_REPS"
  "$B" throughput --sink kafka --count "$COUNT" --reps "$THROUGHPUT_REPS"
  "$B" throughput --sink http --count "$((COUNT / 4))" --reps "$THROUGHPUT_REPS"
fi
if run latency; then
  for sink in nats jetstream kafka http; do
    "$B" latency --sink "$sink" --rate 2000 --secs 20 --reps "$REPS"
  done
fi
if run python; then
  "$B" python --sink nats --count "$COUNT" --reps "$REPS"
fi
if run backlog; then
  for _ in $(seq "$REPS"); do "$B" backlog --sink nats --count 1000000; done
fi
if run scale; then
  "$B" scale --tokens 10000 --observe-secs "$SCALE_OBSERVE"
fi
if run micro; then
  cargo bench --bench micro -- --warm-up-time 1 --measurement-time 2
fi
