#!/usr/bin/env bash
# Batches do not starve interactive traffic: the p95 of synchronous HTTP
# calls at a steady rate (open loop) alone, then while a file batch of
# LINES lines runs on the same model and the same worker (its lines in the
# low class, at most ingress.batch_max_in_flight at a time), in one run.
# The batch's progress before and after the loaded round shows it ran
# throughout.
#
# Usage: scripts/bench-batch.sh
#   RATE (default 20 req/s) for 30 s; LINES (default 20,000);
#   LATENCY_MS of the synthetic model (default 50); SLOTS of the worker (default
#   16): the batch then outlasts the loaded round.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
bench_workdir 4351
RATE="${RATE:-20}"
LINES="${LINES:-20000}"
N=$((RATE * 30))
cat >"$WORKDIR/bench.toml" <<TOML
metrics_listen = "127.0.0.1:0"
data_dir = "$WORKDIR/data"
[log]
level = "warn"
[worker]
max_inflight = ${SLOTS:-16}
[models.slow]
backend = "synthetic"
latency_ms = ${LATENCY_MS:-50}
TOML
FLEET=("$BIN/retro-fleet" --config "$WORKDIR/bench.toml")
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build"
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
sleep 0.5
"${FLEET[@]}" topology apply >/dev/null
"${FLEET[@]}" worker >"$WORKDIR/worker.log" 2>&1 &
"${FLEET[@]}" ingress --listen 127.0.0.1:18185 >"$WORKDIR/ingress.log" 2>&1 &
BASE=http://127.0.0.1:18185
for _ in $(seq 100); do
    curl -fs -o /dev/null -X POST "$BASE/v1/infer" -d '{"model":"slow","prompt":"up?"}' && break
    sleep 0.1
done
load() {
    "$BIN/loadtest" --http fleet="$BASE" --model slow --rate "$RATE" --requests "$N" --rounds 1 --json "$1"
}
p95() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['median'][0]['p95_ms'])" "$1"; }
counts() {
    "${FLEET[@]}" batch status "$1" --url "$BASE" |
        python3 -c "import json,sys; b=json.load(sys.stdin); c=b['request_counts']; print(f\"{b['status']}: {c['completed']}/{c['total']} lines\")"
}

echo "## interactive alone: $RATE req/s for 30 s on a ${LATENCY_MS:-50} ms model, ${SLOTS:-16} slots"
load "$WORKDIR/alone.json"
python3 -c "
import json
for i in range($LINES):
    print(json.dumps({'custom_id': f'c{i}', 'method': 'POST', 'url': '/v1/completions',
                      'body': {'model': 'slow', 'prompt': f'line {i}'}}))" >"$WORKDIR/batch.jsonl"
ID="$("${FLEET[@]}" batch submit "$WORKDIR/batch.jsonl" --url "$BASE" |
    python3 -c "import json,sys; print(json.load(sys.stdin)['id'])")"
sleep 3
echo "## the same, while batch $ID of $LINES lines runs (at start: $(counts "$ID"))"
load "$WORKDIR/during.json"
echo "batch at the end of the round: $(counts "$ID")"
ALONE="$(p95 "$WORKDIR/alone.json")"
DURING="$(p95 "$WORKDIR/during.json")"
python3 -c "print(f'interactive p95: alone {$ALONE:.1f} ms, during the batch {$DURING:.1f} ms: {$DURING / $ALONE:.2f}x (target: at most 2x)')"
