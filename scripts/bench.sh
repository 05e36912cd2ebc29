#!/usr/bin/env bash
# Fleet vs. bare JetStream floor, in one run against one nats-server.
# Starts nats-server (temp store) and a release `retro-fleet worker` (echo
# model), then runs `loadtest --floor` at window 64 and window 1; the floor
# is measured in the same run, alternating rounds with the fleet. Each is
# run three times: against the bare floor; against a floor that also stores
# each result in a stream before acking, replying while it is stored
# (`--floor-store`); and against a floor that does what the fleet's
# contract asks of NATS (`--floor-contract`: each result stored
# first-writer-wins with a TTL before the reply, each message in a task of
# its own). The fleet against the last is the cost of its own work.
#
# Usage: scripts/bench.sh [WORKER_BINARY...]
#   With several worker binaries (e.g. a build from before a change and one
#   from after it), each is measured in turn against the same server, so
#   before/after figures come from one run.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
cargo build --release --workspace --bins >&2
BIN="${CARGO_TARGET_DIR:-target}/release"
WORKERS=("$@")
[ ${#WORKERS[@]} -gt 0 ] || WORKERS=("$BIN/retro-fleet")
bench_workdir 4333
bench_echo_config "$WORKDIR/bench.toml"
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version)"
for worker in "${WORKERS[@]}"; do
    # a fresh server per worker: stored results pile up and slow the server
    rm -rf "$WORKDIR/store"
    nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
    nats_pid=$!
    sleep 0.5
    "$worker" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker.log" 2>&1 &
    pid=$!
    sleep 1
    echo "## worker: $worker"
    for store in "" --floor-store --floor-contract; do
        echo "### window 64, 20000 requests x 3 rounds, floor ${store:-without storing results}"
        "$BIN/loadtest" --floor $store --window 64 --requests 20000 --rounds 3
        echo "### window 1, 3000 requests x 3 rounds, floor ${store:-without storing results}"
        "$BIN/loadtest" --floor $store --window 1 --requests 3000 --rounds 3
    done
    kill -TERM "$pid"; wait "$pid" || true
    kill "$nats_pid"; wait "$nats_pid" || true
done
