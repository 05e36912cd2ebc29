#!/usr/bin/env bash
# The result cache under load, in one run against one nats-server:
#  1. realistic mix: 70 % of requests repeat one of 200 popular prompts,
#     greedy sampling, a synthetic model of 10 ms per request (16 at once per
#     worker). Two workers, one per model: `cached` with the cache on,
#     `uncached` with it off; loadtest alternates rounds between them.
#  2. cache-hit workload: every request repeats one of 100 prompts (warmed by
#     the warm-up round), against the bare JetStream floor in the same run.
#  3. the same cache-hit workload through the HTTP ingress: its maximum
#     throughput (window 64), then open loop at half of it for the p99;
#     once with the ingress's own answer cache (the default) and once
#     through the queue to the worker's cache; the bare JetStream floor
#     right after.
#
# Usage: scripts/bench-cache.sh            (release build)
#        PROFILE=debug scripts/bench-cache.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
bench_workdir 4335
cat > "$WORKDIR/bench.toml" <<TOML
metrics_listen = "127.0.0.1:0"
data_dir = "$WORKDIR/data"
[log]
level = "warn"
[worker]
max_inflight = 512
batch_size = 256
[models.cached]
backend = "synthetic"
latency_ms = 10
concurrency = 16
[models.uncached]
backend = "synthetic"
latency_ms = 10
concurrency = 16
TOML
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build"
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
sleep 0.5
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" topology apply >/dev/null
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker --models cached --id cached >"$WORKDIR/cached.log" 2>&1 &
FLEET_WORKER__CACHE__ENABLED=false \
    "$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker --models uncached --id uncached >"$WORKDIR/uncached.log" 2>&1 &
sleep 2
echo "### 70 % repeats of 200 prompts, greedy, window 64, 5000 requests x 3 rounds: cache on vs off"
"$BIN/loadtest" --model cached,uncached --greedy --repeat 0.7 --distinct 200 --window 64 --requests 5000 --rounds 3
echo "### every request a repeat (cache hits), window 64, 20000 requests x 3 rounds, vs the bare floor"
"$BIN/loadtest" --model cached --greedy --repeat 1.0 --distinct 100 --window 64 --requests 20000 --rounds 3 --floor
echo "### every request a repeat (cache hits), window 1, 3000 requests x 3 rounds, vs the bare floor"
"$BIN/loadtest" --model cached --greedy --repeat 1.0 --distinct 100 --window 1 --requests 3000 --rounds 3 --floor
HTTP_PORT="${BENCH_HTTP_PORT:-8095}"
# two ingresses on the same worker: one answers repeats from its own memory
# (the default), the other sends every call through the queue to the
# worker's cache
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" ingress --listen "127.0.0.1:$HTTP_PORT" >"$WORKDIR/ingress.log" 2>&1 &
FLEET_INGRESS__CACHE__ENABLED=false "$BIN/retro-fleet" --config "$WORKDIR/bench.toml" ingress \
    --listen "127.0.0.1:$((HTTP_PORT + 1))" >"$WORKDIR/ingress-off.log" 2>&1 &
sleep 1
HITS=(--model cached --greedy --repeat 1.0 --distinct 100)
for target in "ingress-cache=http://127.0.0.1:$HTTP_PORT" "worker-cache=http://127.0.0.1:$((HTTP_PORT + 1))"; do
    echo "### HTTP ($target), every request a repeat (cache hits), window 64, 20000 requests x 3 rounds"
    "$BIN/loadtest" --http "$target" "${HITS[@]}" --window 64 --requests 20000 --rounds 3 --json "$WORKDIR/http-max.json"
    MAX=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['median'][0]['throughput']))" "$WORKDIR/http-max.json")
    HALF=$((MAX / 2))
    echo "### HTTP ($target), cache hits, open loop at half the maximum ($HALF/s), $((HALF * 5)) requests x 3 rounds"
    "$BIN/loadtest" --http "$target" "${HITS[@]}" --rate "$HALF" --requests $((HALF * 5)) --rounds 3
done
echo "### bare JetStream floor, window 64, 20000 requests x 3 rounds (same server, right after)"
"$BIN/loadtest" --floor-only --window 64 --requests 20000 --rounds 3
