#!/usr/bin/env bash
# Scaling benchmark: throughput of 1, 2, 4 and 8 worker processes on the
# synthetic backend (fixed latency, fixed concurrency per worker), each
# against the single worker's, and the scaler's recommendation while the
# load runs, in one run against one nats-server.
#
# Each worker serves `concurrency` requests at a time of `latency_ms` each,
# so its ceiling is concurrency / latency (8 / 50 ms = 160/s); the backend
# sleeps, so 2 cores suffice for 8 workers. The load generator keeps
# 4 × concurrency requests per worker in flight, so a backlog always waits.
#
# Then, open loop at RATE requests/s (default 400) with 1 to 4 workers:
# which counts keep up (every request answered, p99 below a second), and
# what the scaler recommended while the load ran (its service rate is the
# one it measured in the first part).
#
# Usage: scripts/bench-scaling.sh [N...]    (default: 1 2 4 8)
#   PROFILE=debug uses debug binaries (no release build); RATE=400.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
COUNTS=("$@")
[ ${#COUNTS[@]} -gt 0 ] || COUNTS=(1 2 4 8)
PORT="${BENCH_NATS_PORT:-4334}"
SCALER_PORT="${BENCH_SCALER_PORT:-9392}"
LATENCY_MS=50
CONCURRENCY=8
WORKDIR="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORKDIR"
}
trap cleanup EXIT
export NATS_URL="nats://127.0.0.1:$PORT"
cat > "$WORKDIR/bench.toml" <<TOML
metrics_listen = "127.0.0.1:0"
[log]
level = "warn"
[worker]
max_inflight = $((CONCURRENCY * 2))
batch_size = $((CONCURRENCY * 2))
heartbeat_ms = 1000
[scaler]
interval_ms = 1000
window_secs = 30
drain_target_secs = 60.0
scale_down_cooldown_secs = 5.0
[models.slow]
backend = "synthetic"
latency_ms = $LATENCY_MS
concurrency = $CONCURRENCY
output_tokens = 4
TOML
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
pids+=($!)
sleep 0.5
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" topology apply >/dev/null
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" scaler --listen "127.0.0.1:$SCALER_PORT" >"$WORKDIR/scaler.log" 2>&1 &
pids+=($!)

echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE binaries"
echo "# synthetic backend: ${LATENCY_MS} ms per request, $CONCURRENCY at a time per worker (ceiling $((CONCURRENCY * 1000 / LATENCY_MS))/s per worker)"
echo
echo "## closed loop ($((CONCURRENCY * 4)) requests in flight per worker)"
echo "| workers | requests/s | × 1 worker | per worker | p50 ms | p99 ms | service rate/worker measured by the scaler |"
echo "|---|---|---|---|---|---|---|"
base=""
for n in "${COUNTS[@]}"; do
    wpids=()
    for i in $(seq 1 "$n"); do
        "$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker --id "bench-$n-$i" >"$WORKDIR/worker-$n-$i.log" 2>&1 &
        wpids+=($!)
        pids+=($!)
    done
    sleep 2
    window=$((n * CONCURRENCY * 4))
    requests=$((n * CONCURRENCY * 1000 / LATENCY_MS * 8))   # about 8 s of work per round
    : >"$WORKDIR/scaling-$n.jsonl"
    ( while true; do curl -s "127.0.0.1:$SCALER_PORT/v1/scaling" >>"$WORKDIR/scaling-$n.jsonl" || true; echo >>"$WORKDIR/scaling-$n.jsonl"; sleep 1; done ) &
    poller=$!
    "$BIN/loadtest" --model slow --window "$window" --requests "$requests" --rounds 2 --prompt-bytes 64 \
        --json "$WORKDIR/load-$n.json" >/dev/null 2>"$WORKDIR/load-$n.log"
    kill "$poller" 2>/dev/null || true
    wait "$poller" 2>/dev/null || true
    python3 - "$n" "$WORKDIR/load-$n.json" "$WORKDIR/scaling-$n.jsonl" "${base:-0}" >"$WORKDIR/row" <<'PY'
import json, sys
n, load, scaling, base = int(sys.argv[1]), json.load(open(sys.argv[2])), sys.argv[3], float(sys.argv[4])
m = load["median"][0]
tput = m["throughput"]
mu = 0.0
for line in open(scaling):
    line = line.strip()
    if not line:
        continue
    try:
        for r in json.loads(line)["models"]:
            if r["model"] == "slow" and r["workers"] == n:
                mu = r["service_rate"]
    except (ValueError, KeyError):
        pass
base = base or tput
print(f"| {n} | {tput:,.0f} | {tput / base:.2f} | {tput / n:,.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {mu:,.0f} |")
PY
    [ -n "$base" ] || base="$(python3 -c "import json;print(json.load(open('$WORKDIR/load-$n.json'))['median'][0]['throughput'])")"
    cat "$WORKDIR/row"
    for p in "${wpids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${wpids[@]}"; do wait "$p" 2>/dev/null || true; done
done

RATE="${RATE:-400}"
echo
echo "## open loop at $RATE requests/s for 12 s"
echo "| workers | capacity (workers × measured rate) | answered/s | p99 ms | kept up | recommended while loaded (median / max) |"
echo "|---|---|---|---|---|---|"
for n in 1 2 3 4; do
    wpids=()
    for i in $(seq 1 "$n"); do
        "$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker --id "open-$n-$i" >"$WORKDIR/open-$n-$i.log" 2>&1 &
        wpids+=($!)
        pids+=($!)
    done
    sleep 8   # the previous run's recommendation cools down (5 s)
    : >"$WORKDIR/open-$n.jsonl"
    ( while true; do curl -s "127.0.0.1:$SCALER_PORT/v1/scaling" >>"$WORKDIR/open-$n.jsonl" || true; echo >>"$WORKDIR/open-$n.jsonl"; sleep 1; done ) &
    poller=$!
    "$BIN/loadtest" --model slow --rate "$RATE" --requests "$((RATE * 12))" --rounds 1 --prompt-bytes 64 --timeout 60 \
        --json "$WORKDIR/open-$n.json" >/dev/null 2>"$WORKDIR/open-$n.log" || true
    kill "$poller" 2>/dev/null || true
    wait "$poller" 2>/dev/null || true
    python3 - "$n" "$RATE" "$WORKDIR/open-$n.json" "$WORKDIR/open-$n.jsonl" <<'PY'
import json, statistics, sys
n, rate, load, scaling = int(sys.argv[1]), float(sys.argv[2]), json.load(open(sys.argv[3])), sys.argv[4]
m = load["median"][0]
recs, mu = [], 0.0
for line in open(scaling):
    line = line.strip()
    if not line:
        continue
    try:
        for r in json.loads(line)["models"]:
            if r["model"] == "slow" and r["workers"] == n and r["arrival_rate"] > rate / 2:
                recs.append(r["replicas"])
                mu = r["service_rate"]
    except (ValueError, KeyError):
        pass
kept = m["lost"] == 0 and m["p99_ms"] < 1000
med = statistics.median(recs) if recs else float("nan")
print(f"| {n} | {n * mu:,.0f}/s | {m['throughput']:,.0f} | {m['p99_ms']:,.0f} | {'yes' if kept else 'no'} | {med:g} / {max(recs, default=0)} |")
PY
    for p in "${wpids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${wpids[@]}"; do wait "$p" 2>/dev/null || true; done
done
