#!/usr/bin/env bash
# What checkpoints cost the model path: the tiny demo model served twice,
# by two workers that differ only in worker.checkpoint_interval_ms (1000, the
# default, and 0 = off), measured in alternating rounds by one loadtest run:
# 256-token greedy completions of fresh prompts, 64 in flight, so every
# generation spans checkpoint intervals. Prints on/off in tokens per second.
#
# Usage: scripts/bench-checkpoints.sh           (release build)
#        REQUESTS=N per round (256); MAX_TOKENS=N (256); INTERVAL=ms (1000)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
bench_workdir 4346
"$BIN/retro-fleet" model tiny --out "$WORKDIR/tiny" >/dev/null
cat > "$WORKDIR/bench.toml" <<TOML
metrics_listen = "127.0.0.1:0"
data_dir = "$WORKDIR/data"
[log]
level = "warn"
[worker.cache]
enabled = false
[models.checkpoints_off]
backend = "mistralrs"
path = "$WORKDIR/tiny"
[models.checkpoints_on]
backend = "mistralrs"
path = "$WORKDIR/tiny"
TOML
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build"
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
sleep 0.5
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" topology apply >/dev/null
FLEET_WORKER__MODELS='["checkpoints_off"]' FLEET_WORKER__CHECKPOINT_INTERVAL_MS=0 \
    "$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/off.log" 2>&1 &
FLEET_WORKER__MODELS='["checkpoints_on"]' FLEET_WORKER__CHECKPOINT_INTERVAL_MS="${INTERVAL:-1000}" \
    "$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/on.log" 2>&1 &
sleep 3
echo "### tiny model, ${MAX_TOKENS:-256} tokens, greedy, window 64, ${REQUESTS:-256} requests x 3 rounds: checkpoints every ${INTERVAL:-1000} ms vs off"
"$BIN/loadtest" --model checkpoints_off,checkpoints_on --greedy --max-tokens "${MAX_TOKENS:-256}" --prompt-bytes 64 \
    --window 64 --requests "${REQUESTS:-256}" --rounds 3
