#!/usr/bin/env bash
# The semantic cache's cost on a miss-only workload: one worker, three copies
# of a model under three names, measured in alternating rounds by loadtest
# and compared with the first: `exact` (cache on, exact keys only),
# `lexical` (semantic mode, lexical embedder) and `minilm` (semantic mode,
# all-MiniLM-L6-v2). Every request is greedy, in cache mode `semantic`, and
# asks a prompt never asked before, in different words (nothing hits), so
# every semantic request pays for embedding its prompt and searching the
# index. Twice: a synthetic model of 20 ms per request (16 at once), and
# the tiny demo model (mistral.rs, 32 tokens).
#
# Usage: scripts/bench-semantic.sh   (MINILM=DIR, default where `make deps`
#   unpacks it; REQUESTS=N per round, default 1000 synthetic / 320 tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_minilm
bench_build
bench_workdir 4351
"$BIN/retro-fleet" model tiny --out "$WORKDIR/tiny" >/dev/null
models() { # backend lines of one model, under three names
    for name in exact lexical minilm; do
        printf '[models.%s%s]\n%s\n' "$name" "$1" "$2"
    done
}
cat > "$WORKDIR/bench.toml" <<TOML
metrics_listen = "127.0.0.1:0"
data_dir = "$WORKDIR/data"
[log]
level = "warn"
[worker]
max_inflight = 256
batch_size = 128
[worker.cache]
semantic_models = ["lexical", "minilm", "lexical-tiny", "minilm-tiny"]
semantic_embedder = "lexical"
semantic_embedders = { minilm = { path = "$MINILM" }, minilm-tiny = { path = "$MINILM" } }
$(models "" $'backend = "synthetic"\nlatency_ms = 20\nconcurrency = 16')
$(models "-tiny" $'backend = "mistralrs"\npath = "'"$WORKDIR/tiny"'"')
TOML
bench_nats "$WORKDIR/bench.toml"
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker.log" 2>&1 &
sleep 5
echo "### synthetic 20 ms model, miss-only, semantic mode, window 64, ${REQUESTS:-1000} requests x 3 rounds"
"$BIN/loadtest" --model exact,lexical,minilm --greedy --cache-mode semantic --prompt-bytes 64 --window 64 \
    --requests "${REQUESTS:-1000}" --rounds 3
echo "### tiny model, 32 tokens, miss-only, semantic mode, window 64, ${REQUESTS:-320} requests x 3 rounds"
"$BIN/loadtest" --model exact-tiny,lexical-tiny,minilm-tiny --greedy --cache-mode semantic --prompt-bytes 64 --max-tokens 32 \
    --window 64 --requests "${REQUESTS:-320}" --rounds 3
