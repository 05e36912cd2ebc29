#!/usr/bin/env bash
# What the console costs while it is open: two ingresses in front of one
# worker and one nats-server, the console's live feed open on `watched`
# for the whole run (read as a browser reads it), none on `unwatched`.
# `loadtest --http` alternates rounds between them (unwatched first: the
# reference), so the worker and nats-server they share cancel out; then
# `--sweep` writes the HTML/SVG report of the unwatched path.
#
# Usage: scripts/bench-console.sh [REPORT.html]
#   REQUESTS (default 20,000) per round, ROUNDS (default 5), window 64.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
bench_workdir 4348
bench_echo_config "$WORKDIR/bench.toml"
REPORT="${1:-$WORKDIR/report.html}"
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build"
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
sleep 0.5
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" topology apply >/dev/null
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker.log" 2>&1 &
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" ingress --listen 127.0.0.1:18181 >"$WORKDIR/unwatched.log" 2>&1 &
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" ingress --listen 127.0.0.1:18182 >"$WORKDIR/watched.log" 2>&1 &
for port in 18181 18182; do
    for _ in $(seq 100); do
        curl -fs -o /dev/null -X POST "http://127.0.0.1:$port/v1/infer" -d '{"model":"echo","prompt":"up?"}' && break
        sleep 0.1
    done
done
curl -sN http://127.0.0.1:18182/v1/admin/console/events >"$WORKDIR/feed.txt" &
WATCHER=$!
sleep 3
echo "## HTTP window 64, ${REQUESTS:-20000} requests x ${ROUNDS:-5} rounds, the console open on watched"
"$BIN/loadtest" --http unwatched=http://127.0.0.1:18181 --http watched=http://127.0.0.1:18182 \
    --window 64 --requests "${REQUESTS:-20000}" --rounds "${ROUNDS:-5}"
kill "$WATCHER"
echo "console feed: $(grep -c '^event: sample' "$WORKDIR/feed.txt") samples read while watched"
echo "## latency against offered load, unwatched (report: $REPORT)"
"$BIN/loadtest" --http fleet=http://127.0.0.1:18181 --sweep 500,1000,1500,2000,2500,3000 \
    --requests 6000 --rounds 1 --report "$REPORT" || echo "(requests failed past capacity: see above)"
