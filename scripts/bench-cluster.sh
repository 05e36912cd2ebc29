#!/usr/bin/env bash
# Fleet vs. bare JetStream floor on one nats-server with R1 streams and on a
# 3-node loopback cluster with R3 streams, in one run. For each: a release
# `retro-fleet worker` (echo model) with `topology.replicas` set to match,
# then `loadtest --floor --floor-store` at window 64, the floor's streams
# at the same replica count, alternating rounds with the fleet.
#
# Usage: scripts/bench-cluster.sh
#   REQUESTS (default 20000) per round, ROUNDS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
bench_workdir 4340
REQUESTS="${REQUESTS:-20000}"
ROUNDS="${ROUNDS:-3}"
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version)"

# Starts `$1` nats-servers (client ports 4340.., routes 6340..) with
# JetStream and a store each; sets NATS_URL to all of them.
start_nats() {
    local n=$1 routes="" urls=""
    for i in $(seq 0 $((n - 1))); do
        routes="$routes${routes:+,}nats://127.0.0.1:$((6340 + i))"
        urls="$urls${urls:+,}nats://127.0.0.1:$((4340 + i))"
    done
    NATS_PIDS=()
    for i in $(seq 0 $((n - 1))); do
        local args=(-js -a 127.0.0.1 -p $((4340 + i)) -sd "$WORKDIR/store$n-$i" -n "n$i")
        [ "$n" -gt 1 ] && args+=(--cluster_name bench --cluster "nats://127.0.0.1:$((6340 + i))" --routes "$routes")
        nats-server "${args[@]}" >"$WORKDIR/nats$n-$i.log" 2>&1 &
        NATS_PIDS+=($!)
    done
    export NATS_URL="$urls"
    sleep 3 # routes up and a JetStream meta leader elected
}

for replicas in 1 3; do
    start_nats "$replicas"
    bench_echo_config "$WORKDIR/bench.toml"
    printf '[nats]\nurl = "%s"\n[topology]\nreplicas = %s\n' "$NATS_URL" "$replicas" >>"$WORKDIR/bench.toml"
    "$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker$replicas.log" 2>&1 &
    pid=$!
    sleep 2
    echo "## R$replicas on $replicas server(s): window 64, $REQUESTS requests x $ROUNDS rounds, floor storing results at R$replicas"
    "$BIN/loadtest" --nats "${NATS_URL%%,*}" --floor --floor-store --floor-replicas "$replicas" \
        --window 64 --requests "$REQUESTS" --rounds "$ROUNDS"
    kill -TERM "$pid"; wait "$pid" || true
    kill "${NATS_PIDS[@]}"; wait "${NATS_PIDS[@]}" 2>/dev/null || true
done
