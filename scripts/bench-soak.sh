#!/usr/bin/env bash
# Soak: steady synchronous HTTP load for a while, watching memory. One
# nats-server (file store), `retro-fleet worker` (echo model) and `retro-fleet
# ingress` (auth off), loaded by `loadtest --http` at a fixed rate of fresh
# 256-byte prompts. Every SAMPLE seconds it prints the resident memory of
# nats-server, the worker and the ingress, the JetStream store's size on disk
# and the results held in FLEET_RESULTS; at the end, a plateau check over the
# second half of the run (nats-server < 10 % growth, retro-fleet < 5 %).
#
# Usage: scripts/bench-soak.sh               (release build; 10 min at 1,500/s)
#        MINUTES=N RATE=N SAMPLE=secs (30); PROFILE=debug for a dev build
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
MINUTES="${MINUTES:-10}"
RATE="${RATE:-1500}"
SAMPLE="${SAMPLE:-30}"
export LC_ALL=C
bench_workdir 4348
bench_echo_config "$WORKDIR/bench.toml"
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build"
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" -m 18222 >/dev/null 2>&1 &
NATS_PID=$!
sleep 0.5
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" topology apply >/dev/null
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker.log" 2>&1 &
WORKER_PID=$!
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" ingress --listen 127.0.0.1:18083 >"$WORKDIR/ingress.log" 2>&1 &
INGRESS_PID=$!
for _ in $(seq 100); do
    curl -fs -o /dev/null -X POST http://127.0.0.1:18083/v1/infer -d '{"model":"echo","prompt":"up?"}' && break
    sleep 0.1
done
rss() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
results() {
    curl -fs 'http://127.0.0.1:18222/jsz?accounts=true&streams=true' | tr ',{' '\n\n' |
        grep -A12 '"name":"FLEET_RESULTS"' | awk -F: '/"messages"/ {print $NF; exit}'
}
N=$(( MINUTES * 60 * RATE ))
echo "## $MINUTES min of synchronous HTTP echo calls at $RATE/s ($N requests), sampled every ${SAMPLE} s"
"$BIN/loadtest" --http fleet=http://127.0.0.1:18083 --rate "$RATE" --requests "$N" --rounds 1 >"$WORKDIR/load.out" 2>&1 &
LOAD_PID=$!
printf "%6s %12s %10s %11s %14s %16s\n" "t (s)" "nats-server" "worker" "ingress" "store on disk" "FLEET_RESULTS"
SAMPLES="$WORKDIR/samples"
t=0
while kill -0 "$LOAD_PID" 2>/dev/null; do
    line=$(printf "%6d %9s MB %7s MB %8s MB %11s MB %16s" "$t" "$(rss $NATS_PID)" "$(rss $WORKER_PID)" \
        "$(rss $INGRESS_PID)" "$(du -sm "$WORKDIR/store" | cut -f1)" "$(results)")
    echo "$line"
    echo "$t $(rss $NATS_PID) $(rss $WORKER_PID) $(rss $INGRESS_PID)" >>"$SAMPLES"
    sleep "$SAMPLE"
    t=$((t + SAMPLE))
done
wait "$LOAD_PID" || true
cat "$WORKDIR/load.out"
# growth over the second half of the run: the first sample at or after the
# half against the last
awk -v half=$(( MINUTES * 30 )) '
    $1 >= half && !mid { mid = 1; n0 = $2; w0 = $3; i0 = $4 }
    { n1 = $2; w1 = $3; i1 = $4 }
    END {
        gn = (n1 - n0) * 100 / n0; gw = (w1 - w0) * 100 / w0; gi = (i1 - i0) * 100 / i0
        printf "second half growth: nats-server %+.1f %% (%s), worker %+.1f %% (%s), ingress %+.1f %% (%s)\n",
            gn, gn < 10 ? "plateau" : "GROWING", gw, gw < 5 ? "plateau" : "GROWING", gi, gi < 5 ? "plateau" : "GROWING"
    }' "$SAMPLES"
