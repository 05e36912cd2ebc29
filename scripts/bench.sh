#!/usr/bin/env bash
# Fleet vs. bare JetStream floor, in one run against one nats-server:
# starts nats-server (temp store) and a release `retro-fleet worker` (echo
# model), then runs loadtest --floor at window 64 and window 1.
# Usage: scripts/bench.sh [extra loadtest args]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins >&2
BIN="${CARGO_TARGET_DIR:-target}/release"
PORT="${BENCH_NATS_PORT:-4333}"
STORE="$(mktemp -d)"
WORKDIR="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$STORE" "$WORKDIR"' EXIT
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$STORE" >/dev/null 2>&1 &
sleep 0.5
export NATS_URL="nats://127.0.0.1:$PORT"
cat > "$WORKDIR/bench.toml" <<TOML
metrics_listen = "127.0.0.1:0"
[log]
level = "warn"
[worker]
max_inflight = 512
batch_size = 256
TOML
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker.log" 2>&1 &
sleep 1
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version)"
echo "## window 64"
"$BIN/loadtest" --floor --window 64 --requests 20000 --rounds 3 "$@"
echo "## window 1"
"$BIN/loadtest" --floor --window 1 --requests 3000 --rounds 3 "$@"
