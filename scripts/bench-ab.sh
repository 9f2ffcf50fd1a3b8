#!/usr/bin/env bash
# Compares two builds of the daemon under the same harness, run alternately so that both see the
# same machine: this tree's build (A) and another one (B), for example a release build of an
# earlier commit in a worktree of its own:
#
#   git worktree add ../cwb-base b081980 && (cd ../cwb-base && cargo build --release --bin chatwoot-bridge)
#   scripts/bench-ab.sh ../cwb-base/target/release/chatwoot-bridge            # 4 rounds
#   ROUNDS=8 PARTS="throughput backlog" scripts/bench-ab.sh ../cwb-base/...    # fewer parts, more rounds
#   ROUNDS=6 PARTS=blast scripts/bench-ab.sh ../cwb-base/...                   # NATS core and Kafka only
#
# Each round runs every part once with A, then once with B (B first in odd rounds). The harness
# prints one RATIO/CPU/LATENCY/BACKLOG line per run, tagged here with `build=A|B` so the medians
# can be read per build (grep '^build=A' | ...). Loopback only, bounded like scripts/bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
other="${1:?usage: scripts/bench-ab.sh PATH-TO-OTHER-chatwoot-bridge}"
[ -x "$other" ] || { echo "not an executable: $other" >&2; exit 2; }
other="$(cd "$(dirname "$other")" && pwd)/$(basename "$other")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
ROUNDS="${ROUNDS:-4}"
PARTS="${PARTS:-throughput latency backlog}"
COUNT="${COUNT:-200000}"
cargo build --release --bin chatwoot-bridge --example bench
B="$CARGO_TARGET_DIR/release/examples/bench"
A_BIN="$CARGO_TARGET_DIR/release/chatwoot-bridge"

part() {
  case "$1" in
    throughput)
      "$B" throughput --sink nats --count "$COUNT" --reps 2
      "$B" throughput --sink jetstream --count "$COUNT" --reps 2
      "$B" throughput --sink kafka --count "$COUNT" --reps 2
      "$B" throughput --sink http --count "$((COUNT / 4))" --reps 2
      ;;
    blast) # the NATS core and Kafka blasts alone: where per-event costs show first
      "$B" throughput --sink nats --count "$COUNT" --reps 2
      "$B" throughput --sink kafka --count "$COUNT" --reps 2
      ;;
    latency)
      for sink in nats jetstream kafka http; do
        "$B" latency --sink "$sink" --rate 2000 --secs 10 --reps 1
      done
      ;;
    backlog) "$B" backlog --sink nats --count 1000000 ;;
    *) echo "unknown part $1" >&2; exit 2 ;;
  esac
}

one() { # build-label binary part
  BENCH_BRIDGE="$2" part "$3" 2>&1 | sed "s/^/build=$1 /"
}

echo "# A: $(git rev-parse --short HEAD) ($A_BIN); B: $other"
echo "# machine: $(nproc) cores; $(free -h | awk '/Mem:/ {print $2}') memory; $(date -u +%FT%TZ); rounds=$ROUNDS"
for round in $(seq "$ROUNDS"); do
  for p in $PARTS; do
    if (( round % 2 )); then
      one B "$other" "$p"; one A "$A_BIN" "$p"
    else
      one A "$A_BIN" "$p"; one B "$other" "$p"
    fi
  done
done
