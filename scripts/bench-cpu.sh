#!/usr/bin/env bash
# Where the CPU goes on the NATS path: CPU time per request of nats-server,
# the worker and the load generator, for the fleet (echo model), the bare
# JetStream floor and the floor that also stores each result. Throughput on
# shared cores swings with the neighbours; CPU per request barely does, and
# on two cores it is what bounds throughput once both are busy.
#
# Each target runs alone against its own fresh nats-server: a warm-up of
# 10,000 requests, then N (default 60,000) at window 64, with each
# process's user+system time read from /proc before and after.
#
# Usage: scripts/bench-cpu.sh [WORKER_BINARY...]
#   With several worker binaries, the fleet is measured with each in turn
#   (alternating, ROUNDS times, default 3), so a change is compared side
#   by side. REQUESTS=N per measurement.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
WORKERS=("$@")
[ ${#WORKERS[@]} -gt 0 ] || WORKERS=("$BIN/retro-fleet")
N="${REQUESTS:-60000}"
# loadtest warms up with a tenth of the requests (100 to 2,000) inside the
# measured window: count them
WARM=$((N / 10)); WARM=$((WARM < 100 ? 100 : WARM > 2000 ? 2000 : WARM))
export LC_ALL=C
bench_workdir 4337
bench_echo_config "$WORKDIR/bench.toml"
TICK_US=$((1000000 / $(getconf CLK_TCK)))
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
per_req() { awk -v t="$1" -v u="$TICK_US" -v n="$((N + WARM))" 'BEGIN {printf "%.1f", t * u / n}'; }

# measure LABEL WORKER_BINARY|"" LOADTEST_ARGS...
measure() {
    local label=$1 worker=$2; shift 2
    rm -rf "$WORKDIR/store"
    nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
    local nats=$! wpid=""
    sleep 0.5
    if [ -n "$worker" ]; then
        "$worker" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker.log" 2>&1 &
        wpid=$!
        sleep 1
    fi
    "$BIN/loadtest" "$@" --window 64 --requests 10000 --rounds 1 >/dev/null 2>&1
    local s0 w0=0 w1=0
    s0=$(ticks $nats)
    [ -z "$wpid" ] || w0=$(ticks $wpid)
    local out TIMEFORMAT="CLIENT %U %S"
    out=$( { time "$BIN/loadtest" "$@" --window 64 --requests "$N" --rounds 1 2>/dev/null; } 2>&1 )
    local s1
    s1=$(ticks $nats)
    [ -z "$wpid" ] || w1=$(ticks $wpid)
    local rps client
    rps=$(echo "$out" | grep -oE '[0-9]+ req/s' | tail -1 | cut -d' ' -f1)
    client=$(echo "$out" | awk '/^CLIENT/ {printf "%d", ($2 + $3) * 1000000}')
    local server_us worker_us client_us
    server_us=$(per_req $((s1 - s0)))
    worker_us=$(per_req $((w1 - w0)))
    client_us=$(awk -v c="$client" -v n="$((N + WARM))" 'BEGIN {printf "%.1f", c / n}')
    printf '| %s | %s | %s | %s | %s | %s |\n' "$label" "$rps" "$server_us" \
        "$([ -n "$wpid" ] && echo "$worker_us" || echo "(in client)")" "$client_us" \
        "$(awk -v a="$server_us" -v b="$worker_us" -v c="$client_us" 'BEGIN {printf "%.1f", a + b + c}')"
    [ -z "$wpid" ] || { kill -TERM "$wpid"; wait "$wpid" || true; }
    kill "$nats"; wait "$nats" 2>/dev/null || true
}

echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $N requests at window 64 per row"
echo "| path | req/s | nats-server µs/req | worker µs/req | client µs/req | total µs/req |"
echo "|---|---|---|---|---|---|"
for _ in $(seq "${ROUNDS:-3}"); do
    for worker in "${WORKERS[@]}"; do
        measure "fleet ($(basename "$worker"))" "$worker"
    done
    measure "floor + store" "" --floor-only --floor-store
    measure "bare floor" "" --floor-only
done
