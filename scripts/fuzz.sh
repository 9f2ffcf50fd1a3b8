#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each (default 60), one after the other,
# and prints one line per target: executions, corpus size, crashes. Not part of the test suite.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Crashes are kept under fuzz/artifacts/TARGET/; the growing corpus under fuzz/corpus/TARGET/.
# Needs cargo-fuzz (installed here when missing) and a nightly toolchain, or stable with
# RUSTC_BOOTSTRAP=1 (used when no nightly is installed).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
all=(frame redaction keys_and_paths template config admin_query rest_answers spool_record spool_recovery)
targets=("$@")
if [ "$#" -eq 0 ]; then targets=("${all[@]}"); fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi

cargo run --quiet --features fuzzing --example fuzz_seeds -- fuzz/seeds
mkdir -p fuzz/logs
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  log="fuzz/logs/$target.log"
  status=0
  # 256 KiB inputs reach nesting far past every bound; 4 GiB RSS is far past what one input
  # should cost. A crash stops the run and leaves its input in fuzz/artifacts.
  "${fuzz[@]}" run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -max_len=262144 -rss_limit_mb=4096 -timeout=10 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
  corpus=$(find "fuzz/corpus/$target" -type f | wc -l)
  crashes=$(find "fuzz/artifacts/$target" -type f | wc -l)
  echo "$target: ${seconds}s, ${runs} executions, corpus ${corpus}, crashes ${crashes}, exit ${status}"
done
