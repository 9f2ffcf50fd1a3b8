#!/usr/bin/env bash
# The chaos run: the mock Chatwoot streams numbered events to three tokens, the bridge delivers
# them to NATS JetStream, Kafka (tansu) and a webhook receiver, while a loop kills (kill -9) and
# restarts the mock, nats-server, tansu, the receiver and the bridge at random, and fills the
# spool's disk (a small tmpfs) once. Then the mock stops, the bridge drains and stops, and the
# check compares, per sink, what reached the spool with what was delivered and prints one
# summary line (the last line of stdout); the exit status is 0 only if nothing was lost.
#
#   scripts/chaos.sh [MINUTES]      # default 10; decimals work (0.5)
#
# Loopback only. Needs nats-server, tansu built with SQLite storage and sqlite3
# (scripts/install-test-deps.sh installs them): a killed broker must keep what it acknowledged,
# and tansu's in-memory storage does not. The spool's disk is a tmpfs: as root, mounted directly; otherwise the script runs
# itself in a user and mount namespace (unshare -rm). Settings from the environment:
# CHAOS_RATE (events per second, default 40), CHAOS_DIR (the run's folder, default a new one under
# /tmp, kept when the run fails or CHAOS_KEEP=1), CHAOS_BRIDGE and CHAOS_HELPER (prebuilt
# binaries; otherwise built here with cargo --release), CHAOS_TANSU (tansu's path), CHAOS_SEED
# (repeats a run's choice of kills and pauses), CHAOS_VICTIMS (what may be killed, default
# "mock nats tansu receiver bridge").
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."

MINUTES="${1:-10}"
die() { echo "chaos: $*" >&2; exit 2; }
SECONDS_TOTAL=$(awk -v m="$MINUTES" 'BEGIN { if (m !~ /^[0-9]+([.][0-9]+)?$/) exit 1; s = int(m * 60); if (s < 20) exit 1; print s }') ||
  die "MINUTES must be a number of minutes, at least 20 seconds' worth: '$MINUTES'"
RATE="${CHAOS_RATE:-40}"
# The kills and pauses follow bash's RANDOM: CHAOS_SEED repeats a run's choices.
SEED="${CHAOS_SEED:-$$}"
RANDOM=$SEED

# --- The spool's disk: a tmpfs, mounted as root or inside a user and mount namespace.
can_mount_tmpfs() {
  local probe
  probe=$(mktemp -d)
  if mount -t tmpfs -o size=1m chaos-probe "$probe" 2>/dev/null; then
    umount "$probe"; rmdir "$probe"; return 0
  fi
  rmdir "$probe"; return 1
}
if ! can_mount_tmpfs; then
  [[ -z "${CHAOS_IN_NAMESPACE:-}" ]] ||
    die "cannot mount a tmpfs for the spool even in a user namespace"
  unshare --user --map-root-user --mount true 2>/dev/null ||
    die "cannot mount a tmpfs for the spool: run as root, or allow unprivileged user namespaces (unshare -rm)"
  exec unshare --user --map-root-user --mount env CHAOS_IN_NAMESPACE=1 "$SELF" "$@"
fi

# --- The servers: present, or how to install them.
NATS_SERVER=$(command -v nats-server || true)
[[ -n "$NATS_SERVER" ]] || for p in /usr/sbin/nats-server /usr/bin/nats-server; do [[ -x "$p" ]] && NATS_SERVER=$p; done
[[ -n "$NATS_SERVER" ]] || die "nats-server is not installed: run scripts/install-test-deps.sh (or apt-get install nats-server)"
TANSU="${CHAOS_TANSU:-$(command -v tansu || true)}"
[[ -n "$TANSU" ]] || TANSU="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
[[ -x "$TANSU" ]] || die "tansu is not installed: run scripts/install-test-deps.sh (or cargo install tansu --locked --features dynostore,libsql)"
command -v sqlite3 >/dev/null || die "sqlite3 is not installed: run scripts/install-test-deps.sh (or apt-get install sqlite3)"

# --- The bridge and the helper (the chaos test binary, tests/chaos): given, or built here.
BRIDGE="${CHAOS_BRIDGE:-}"
HELPER="${CHAOS_HELPER:-}"
if [[ -z "$BRIDGE" || -z "$HELPER" ]]; then
  cargo build --release --bin chatwoot-bridge >&2
  BRIDGE="${CARGO_TARGET_DIR:-$PWD/target}/release/chatwoot-bridge"
  HELPER=$(cargo test --release --test chaos --no-run --message-format=json 2>/dev/null |
    grep '"name":"chaos"' | grep -o '"executable":"[^"]*"' | tail -n1 | cut -d'"' -f4)
  [[ -x "$HELPER" ]] || die "cannot build the chaos helper (cargo test --release --test chaos --no-run)"
fi

RUN="${CHAOS_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/chaos.XXXXXX")}"
mkdir -p "$RUN"
RUN=$(cd "$RUN" && pwd)
DISK="$RUN/spool-disk"
SPOOL="$DISK/spool"
TIMELINE="$RUN/timeline.log"
: >"$TIMELINE"
note() { echo "$(date +%s%3N) $*" >>"$TIMELINE"; }
now_ms() { date +%s%3N; }
rand() { echo $(( $1 + (RANDOM * 32768 + RANDOM) % ($2 - $1 + 1) )); }
log() { echo "chaos: $*" >&2; }

read -r MOCK_PORT NATS_PORT KAFKA_PORT HOOK_PORT <<<"$("$HELPER" free-ports --count 4 | tr '\n' ' ')"

declare -A PID=()
TAP_PID=""
FG_PID=""
# Runs a helper step in the background and waits for it: a SIGTERM or Ctrl-C then stops the
# script at once (bash runs traps only between commands, and `wait` is one), not after the step.
step() {
  "$@" &
  FG_PID=$!
  local status=0
  wait "$FG_PID" || status=$?
  FG_PID=""
  return "$status"
}
# kill -9 and reap, without bash's "Killed" notice.
kill_now() { { kill -9 "$1"; wait "$1"; } 2>/dev/null || true; }
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  for pid in "${PID[@]}" "$TAP_PID" "$FG_PID"; do
    [[ -n "$pid" ]] && kill_now "$pid"
  done
  if mountpoint -q "$DISK" 2>/dev/null; then
    # What the spool held at the end stays with the run's files.
    cp -r "$SPOOL" "$RUN/spool-at-end" 2>/dev/null || true
    umount "$DISK" || true
  fi
  if [[ $status -eq 0 && -z "${CHAOS_KEEP:-}" ]]; then
    rm -rf "$RUN"
  else
    log "the run's files are in $RUN"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

mkdir -p "$DISK" "$RUN/nats"
mount -t tmpfs -o size=48m chaos-spool "$DISK"

cat >"$RUN/bridge.yaml" <<EOF
chatwoot:
  url: ws://127.0.0.1:$MOCK_PORT/cable
  reconnect: { initial: 200ms, max: 2s }
tokens:
  - { name: tok-a, pubsub_token: chaos-a, account_id: 1, user_id: 1 }
  - { name: tok-b, pubsub_token: chaos-b, account_id: 1, user_id: 2 }
  - { name: tok-c, pubsub_token: chaos-c, account_id: 1, user_id: 3 }
sinks:
  jetstream:
    type: nats
    url: nats://127.0.0.1:$NATS_PORT
    subject: "chaos.{token}.{event}"
    jetstream: { stream: CHAOS, create: true }
    retry: { initial: 100ms, max: 2s }
  kafka:
    type: kafka
    brokers: ["127.0.0.1:$KAFKA_PORT"]
    topic: chaos
    retry: { initial: 100ms, max: 2s }
  webhook:
    type: http
    url: http://127.0.0.1:$HOOK_PORT/hook
    timeout: 5s
    retry: { initial: 100ms, max: 2s }
routes:
  - { name: all, match: {}, to: [jetstream, kafka, webhook] }
spool: { dir: "$SPOOL", max_bytes: 33554432 }
shutdown_timeout: 10s
EOF
"$BRIDGE" check --config "$RUN/bridge.yaml" >/dev/null

# --- Starting each component; every start is on the timeline.
MOCK_RUNS=0
start() {
  case "$1" in
    nats) "$NATS_SERVER" -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$RUN/nats" >>"$RUN/nats.log" 2>&1 &
      PID[nats]=$!; note start nats ;;
    tansu) (cd "$RUN" && exec "$TANSU" broker --storage-engine sqlite://tansu.db \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT") \
        >>"$RUN/tansu.log" 2>&1 &
      PID[tansu]=$!; note start tansu ;;
    receiver) "$HELPER" receiver --listen "127.0.0.1:$HOOK_PORT" --record "$RUN/webhook.jsonl" >>"$RUN/receiver.log" 2>&1 &
      PID[receiver]=$!; note start receiver ;;
    mock)
      # Each run numbers its events from its own block, so every number is unique.
      local first=$((MOCK_RUNS * 100000000))
      MOCK_RUNS=$((MOCK_RUNS + 1))
      "$BRIDGE" mock-server --listen "127.0.0.1:$MOCK_PORT" --token chaos-a --token chaos-b --token chaos-c \
        --rate "$RATE" --first-seq "$first" >>"$RUN/mock.log" 2>&1 &
      PID[mock]=$!; note start mock "$first" ;;
    bridge) "$BRIDGE" --log-format json run --config "$RUN/bridge.yaml" >>"$RUN/bridge.log" 2>&1 &
      PID[bridge]=$!; note start bridge ;;
  esac
}
alive() { [[ -n "${PID[$1]:-}" ]] && kill -0 "${PID[$1]}" 2>/dev/null; }
wait_port() {
  local what=$1 port=$2
  for _ in $(seq 300); do
    (: >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    alive "$what" || break
    sleep 0.1
  done
  tail -n 20 "$RUN/$what.log" >&2 || true
  if [[ "$what" == tansu ]] && grep -q libsql "$RUN/tansu.log" 2>/dev/null; then
    die "$TANSU has no SQLite storage: run scripts/install-test-deps.sh (cargo install tansu --locked --features dynostore,libsql)"
  fi
  die "$what did not listen on 127.0.0.1:$port"
}

start nats; wait_port nats "$NATS_PORT"
start tansu; wait_port tansu "$KAFKA_PORT"
step "$HELPER" create-topic --kafka "127.0.0.1:$KAFKA_PORT" --partitions 3
# tansu 0.6 looks up each fetched record's headers in an unindexed table: without this index,
# reading back a 10-minute run (half a million headers) takes hours instead of seconds.
sqlite3 -cmd ".timeout 10000" "$RUN/tansu.db" "create index if not exists header_record on header (topition, offset_id);"
start receiver; wait_port receiver "$HOOK_PORT"
"$HELPER" tap --spool "$SPOOL" --ledger "$RUN/ledger.jsonl" --stop-file "$RUN/tap.stop" >>"$RUN/tap.log" 2>&1 &
TAP_PID=$!
start mock; wait_port mock "$MOCK_PORT"
start bridge
log "running ${SECONDS_TOTAL}s of chaos at $RATE events/s in $RUN (CHAOS_SEED=$SEED)"

# --- The chaos: every 0.2 s, start what is down and due; now and then kill something.
COMPONENTS=(mock nats tansu receiver bridge)
read -r -a VICTIMS <<<"${CHAOS_VICTIMS:-${COMPONENTS[*]}}"
declare -A DOWN_UNTIL=()
begin=$(now_ms)
deadline=$((begin + SECONDS_TOTAL * 1000))
next_kill=$((begin + $(rand 2000 5000)))
fill_at=$((begin + SECONDS_TOTAL * 400))
fill_for=$((SECONDS_TOTAL * 1000 / 30 > 5000 ? SECONDS_TOTAL * 1000 / 30 : 5000))
disk=empty
keep_up() {
  local c now
  now=$(now_ms)
  for c in "${COMPONENTS[@]}"; do
    alive "$c" && continue
    if [[ -n "${PID[$c]:-}" ]]; then
      # Ended by itself (not killed here): say how, then start it again like a supervisor.
      local status=0
      wait "${PID[$c]}" 2>/dev/null || status=$?
      note exit "$c" "$status"
      PID[$c]=""
    fi
    if (( now >= ${DOWN_UNTIL[$c]:-0} )); then start "$c"; fi
  done
}
while (( $(now_ms) < deadline )); do
  keep_up
  now=$(now_ms)
  if (( now >= next_kill )); then
    up=()
    for c in "${VICTIMS[@]}"; do if alive "$c"; then up+=("$c"); fi; done
    if (( ${#up[@]} > 0 )); then
      victim=${up[$((RANDOM % ${#up[@]}))]}
      kill_now "${PID[$victim]}"
      PID[$victim]=""
      note kill "$victim"
      DOWN_UNTIL[$victim]=$((now + $(rand 200 4000)))
    fi
    next_kill=$((now + $(rand 1000 5000)))
  fi
  if [[ $disk == empty ]] && (( now >= fill_at )); then
    # Every byte the tmpfs has left: the spool's next write fails with ENOSPC.
    dd if=/dev/zero of="$DISK/ballast" bs=1M 2>/dev/null || true
    dd if=/dev/zero of="$DISK/ballast-tail" bs=4k 2>/dev/null || true
    note fill disk "$(df --output=avail -B1 "$DISK" | tail -n1)"
    disk=full
  elif [[ $disk == full ]] && (( now >= fill_at + fill_for )); then
    rm -f "$DISK/ballast" "$DISK/ballast-tail"
    note free disk
    disk=freed
  fi
  sleep 0.2
done
note end chaos
if [[ $disk == full ]]; then rm -f "$DISK/ballast" "$DISK/ballast-tail"; note free disk; fi

# --- The end: everything up, the mock stops, the bridge drains and stops, the tap catches up.
for _ in $(seq 50); do
  keep_up
  all=1; for c in "${COMPONENTS[@]}"; do alive "$c" || all=0; done
  (( all )) && break
  sleep 0.2
done
sleep 3 # the bridge's sockets subscribe again and read what the mock sends meanwhile
kill_now "${PID[mock]}"
PID[mock]=""
note stop mock
drained=1
step "$HELPER" drained --spool "$SPOOL" --within 120 || drained=0
kill -TERM "${PID[bridge]}" 2>/dev/null || true
for _ in $(seq 300); do alive bridge || break; sleep 0.1; done
status=0
if alive bridge; then
  log "the bridge did not stop within 30 s of SIGTERM; killing it"
  { kill -9 "${PID[bridge]}"; wait "${PID[bridge]}"; } 2>/dev/null || status=$?
else
  wait "${PID[bridge]}" 2>/dev/null || status=$?
fi
note stop bridge "$status"
PID[bridge]=""
touch "$RUN/tap.stop"
tap_status=0
wait "$TAP_PID" || tap_status=$?
TAP_PID=""
(( tap_status == 0 )) || die "the tap failed: $(tail -n 5 "$RUN/tap.log")"
(( drained )) || log "the bridge did not drain; the check says what is missing"
step "$HELPER" check --run "$RUN" --spool "$SPOOL" --nats "nats://127.0.0.1:$NATS_PORT" --kafka "127.0.0.1:$KAFKA_PORT"
