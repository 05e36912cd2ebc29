#!/usr/bin/env bash
# The synchronous HTTP echo path against its own floor, in one run:
#   floor   `loadtest --serve-http-floor`: one axum handler publishes to a
#           work-queue stream, waits for the publish ack and for the reply
#           on one muxed inbox; a bare puller replies and acks. No
#           retro-fleet code.
#   floor-store  the same floor whose puller also stores each reply in a
#           results stream before acking, replying while the write is in
#           flight, on a nats-server of its own.
#   floor-contract  the floor doing what the fleet's contract asks of NATS:
#           each request with a `Nats-Msg-Id`, each result stored
#           first-writer-wins with a TTL before the reply, each message in a
#           task of its own; on a nats-server of its own. The fleet against
#           it is the cost of the fleet's own work.
#   fleet   `retro-fleet ingress` (auth and limits off, as a local `up`) in
#           front of `retro-fleet worker` (echo model).
# The floor and the fleet share one nats-server. `loadtest --http` alternates rounds between
# them (floor first: the reference). Then each is loaded alone for REQUESTS
# (default 30,000) at window 64 while each process's user+system time is
# read from /proc: CPU per request by process says where the difference goes.
#
# Usage: scripts/bench-http.sh [WINDOW...]   (default: 64 16 1)
#   PROFILE=debug uses a dev build (dependencies optimised, this project's
#   code not). BEFORE=/path/to/older/retro-fleet adds `before`: an ingress
#   served by that binary in front of the same worker, to measure a change
#   in the same run. INGRESS_THREADS=N sets the ingress's `ingress.threads`.
#   TRACED="off 1.0 0.01" adds `traced-R` for each R: the fleet exporting
#   its traces over OTLP at sampling ratio R to scripts/otlp-sink.py (`off`:
#   not exporting, the reference), each on a nats-server of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
WINDOWS=("$@")
[ ${#WINDOWS[@]} -gt 0 ] || WINDOWS=(64 16 1)
N="${REQUESTS:-30000}"
export LC_ALL=C
bench_workdir 4338
bench_echo_config "$WORKDIR/bench.toml"
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build"
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
NATS_PID=$!
sleep 0.5
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" topology apply >/dev/null
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker.log" 2>&1 &
WORKER_PID=$!
cp "$WORKDIR/bench.toml" "$WORKDIR/ingress.toml"
[ -z "${INGRESS_THREADS:-}" ] || printf '[ingress]\nthreads = %s\n' "$INGRESS_THREADS" >>"$WORKDIR/ingress.toml"
"$BIN/retro-fleet" --config "$WORKDIR/ingress.toml" ingress --listen 127.0.0.1:18081 >"$WORKDIR/ingress.log" 2>&1 &
INGRESS_PID=$!
"$BIN/loadtest" --serve-http-floor 127.0.0.1:18090 >"$WORKDIR/floor.log" 2>&1 &
FLOOR_PID=$!
# floor_alone NAME NATS_PORT LISTEN FLAG: a floor storing as FLAG says, on a
# nats-server of its own; sets NAME_NATS_PID and NAME_FLOOR_PID
floor_alone() {
    nats-server -js -a 127.0.0.1 -p "$2" -sd "$WORKDIR/store-$1" >/dev/null 2>&1 &
    printf -v "${1}_NATS_PID" %s $!
    sleep 0.5
    "$BIN/loadtest" --nats "nats://127.0.0.1:$2" --serve-http-floor "$3" "$4" >"$WORKDIR/floor-$1.log" 2>&1 &
    printf -v "${1}_FLOOR_PID" %s $!
}
floor_alone STORE $((PORT + 1)) 127.0.0.1:18091 --floor-store
floor_alone CONTRACT $((PORT + 2)) 127.0.0.1:18092 --floor-contract
targets=(--http floor=http://127.0.0.1:18090 --http floor-store=http://127.0.0.1:18091
    --http floor-contract=http://127.0.0.1:18092 --http fleet=http://127.0.0.1:18081)
ports=(18081 18090 18091 18092)
if [ -n "${BEFORE:-}" ]; then
    "$BEFORE" --config "$WORKDIR/bench.toml" ingress --listen 127.0.0.1:18082 >"$WORKDIR/before.log" 2>&1 &
    BEFORE_PID=$!
    targets+=(--http before=http://127.0.0.1:18082)
    ports+=(18082)
fi
# fleet_alone I LABEL ENV...: a worker and an ingress with ENV set, on a
# nats-server of their own; adds them to the targets and ALONE_ROWS
ALONE_ROWS=()
fleet_alone() {
    local i=$1 label=$2; shift 2
    local np=$((PORT + 10 + i)) hp=$((18100 + i)) nats_pid worker_pid
    nats-server -js -a 127.0.0.1 -p "$np" -sd "$WORKDIR/store-$label" >/dev/null 2>&1 &
    nats_pid=$!
    sleep 0.5
    local run=(env NATS_URL="nats://127.0.0.1:$np" "$@")
    "${run[@]}" "$BIN/retro-fleet" --config "$WORKDIR/bench.toml" topology apply >/dev/null
    "${run[@]}" "$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker-$label.log" 2>&1 &
    worker_pid=$!
    "${run[@]}" "$BIN/retro-fleet" --config "$WORKDIR/ingress.toml" ingress --listen "127.0.0.1:$hp" \
        >"$WORKDIR/ingress-$label.log" 2>&1 &
    targets+=(--http "$label=http://127.0.0.1:$hp")
    ports+=("$hp")
    ALONE_ROWS+=("$label http://127.0.0.1:$hp $nats_pid $! $worker_pid")
}
if [ -n "${TRACED:-}" ]; then
    python3 scripts/otlp-sink.py 14318 >"$WORKDIR/sink.log" 2>&1 &
    SINK_PID=$!
    i=0
    for r in $TRACED; do
        i=$((i + 1))
        traced_env=()
        [ "$r" = off ] || traced_env=(FLEET_TELEMETRY__OTLP__ENDPOINT=http://127.0.0.1:14318
            FLEET_TELEMETRY__OTLP__SAMPLING_RATIO="$r")
        fleet_alone "$i" "traced-$r" "${traced_env[@]}"
    done
fi
for port in "${ports[@]}"; do
    for _ in $(seq 100); do
        curl -fs -o /dev/null -X POST "http://127.0.0.1:$port/v1/infer" -d '{"model":"echo","prompt":"up?"}' && break
        sleep 0.1
    done
done
for w in "${WINDOWS[@]}"; do
    n=$(( w > 1 ? 20000 : 3000 ))
    echo "## HTTP window $w, $n requests x 3 rounds, 256-byte prompts"
    "$BIN/loadtest" "${targets[@]}" --window "$w" --requests "$n" --rounds 3 || echo "(some requests failed: see above)"
done

TICK_US=$((1000000 / $(getconf CLK_TCK)))
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
per_req() { awk -v t="$1" -v u="$TICK_US" -v n="$N" 'BEGIN {printf "%.1f", t * u / n}'; }
# cpu LABEL URL PIDS...: CPU µs per request of each pid while URL serves N requests
cpu() {
    local label=$1 url=$2; shift 2
    local before=() after=() i out client
    for p in "$@"; do before+=("$(ticks "$p")"); done
    local TIMEFORMAT="CLIENT %U %S"
    out=$( { time "$BIN/loadtest" --http "$label=$url" --window 64 --requests "$N" --rounds 1 2>/dev/null; } 2>&1 )
    for p in "$@"; do after+=("$(ticks "$p")"); done
    client=$(echo "$out" | awk -v n="$N" '/^CLIENT/ {printf "%.1f", ($2 + $3) * 1000000 / n}')
    local row="| $label | $(echo "$out" | grep -oE '[0-9]+ req/s' | tail -1 | cut -d' ' -f1)"
    local total=$client
    for i in "${!before[@]}"; do
        local us
        us=$(per_req $((after[i] - before[i])))
        row="$row | $us"
        total=$(awk -v a="$total" -v b="$us" 'BEGIN {printf "%.1f", a + b}')
    done
    [ $# -eq 3 ] || row="$row | —"
    echo "$row | $client | $total |"
}
echo "## CPU per request, $N requests at window 64 (each path alone; the client's time includes its warm-up)"
echo "| path | req/s | nats-server µs | ingress or floor µs | worker µs | client µs | total µs |"
echo "|---|---|---|---|---|---|---|"
for _ in 1 2; do
    cpu floor http://127.0.0.1:18090 "$NATS_PID" "$FLOOR_PID"
    cpu floor-store http://127.0.0.1:18091 "$STORE_NATS_PID" "$STORE_FLOOR_PID"
    cpu floor-contract http://127.0.0.1:18092 "$CONTRACT_NATS_PID" "$CONTRACT_FLOOR_PID"
    cpu fleet http://127.0.0.1:18081 "$NATS_PID" "$INGRESS_PID" "$WORKER_PID"
    [ -z "${BEFORE:-}" ] || cpu before http://127.0.0.1:18082 "$NATS_PID" "$BEFORE_PID" "$WORKER_PID"
    for row in "${ALONE_ROWS[@]}"; do
        # shellcheck disable=SC2086 # label, URL and three pids
        cpu $row
    done
done
[ -z "${TRACED:-}" ] || { kill -TERM "$SINK_PID" 2>/dev/null || true; sleep 0.5; cat "$WORKDIR/sink.log"; }
