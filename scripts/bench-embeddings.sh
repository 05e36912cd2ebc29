#!/usr/bin/env bash
# `POST /v1/embeddings` throughput: `retro-fleet ingress` (auth off) in
# front of one `retro-fleet worker` serving all-MiniLM-L6-v2
# (`backend = "embedding"`, cache off, so every text is embedded), over one
# nats-server. `loadtest --http --api embeddings` sends fresh 64-byte texts,
# 1 and 32 per request, at 1 and 16 connections.
#
# Usage: scripts/bench-embeddings.sh   (MINILM=DIR, default where
#   `make deps` unpacks it; REQUESTS=N per load at batch 1, default 400)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_minilm
bench_build
N="${REQUESTS:-400}"
bench_workdir 4350
cat > "$WORKDIR/fleet.toml" <<TOML
metrics_listen = "127.0.0.1:0"
data_dir = "$WORKDIR/data"
[nats]
url = "nats://127.0.0.1:$PORT"
[log]
level = "warn"
[worker.cache]
enabled = false
[models.minilm]
backend = "embedding"
path = "$MINILM"
TOML
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
sleep 0.5
unset NATS_URL
"$BIN/retro-fleet" --config "$WORKDIR/fleet.toml" topology apply >/dev/null
"$BIN/retro-fleet" --config "$WORKDIR/fleet.toml" worker >"$WORKDIR/worker.log" 2>&1 &
"$BIN/retro-fleet" --config "$WORKDIR/fleet.toml" ingress --listen 127.0.0.1:18086 >"$WORKDIR/ingress.log" 2>&1 &
for _ in $(seq 300); do
    curl -fs -o /dev/null http://127.0.0.1:18086/v1/embeddings -H 'content-type: application/json' \
        -d '{"model":"minilm","input":"up?"}' && break
    sleep 0.2
done
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build, $(basename "$MINILM")"
for batch in 1 32; do
    for c in 1 16; do
        n=$(( batch == 1 ? N : N / 16 ))
        n=$(( c == 1 ? n / 4 : n ))
        echo "## $c connections, $n requests of $batch texts (64 bytes each)"
        "$BIN/loadtest" --http fleet=http://127.0.0.1:18086 --api embeddings --embed-batch "$batch" --model minilm \
            --prompt-bytes 64 --window "$c" --requests "$n" --rounds 2 || echo "(some requests failed: see above)"
    done
done
