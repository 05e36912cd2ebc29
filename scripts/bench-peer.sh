#!/usr/bin/env bash
# The fleet against `mistralrs serve`, the server a user might run instead,
# on the same generated model, in one run:
#   mistralrs  `mistralrs serve` (crates.io mistralrs-cli 0.8.1, CPU, its
#              default 32 sequences at once), installed by this script with
#              `cargo install` on first use and cached in PEER_ROOT.
#   fleet      `retro-fleet ingress` (auth off) in front of one
#              `retro-fleet worker` serving the model (cache off, so every
#              request is computed), over one nats-server.
# `loadtest --http --api openai` sends the same chat completion to both
# (`/v1/chat/completions`, 64-byte fresh prompts, greedy, 32 tokens),
# alternating rounds, at 1, 16 and 64 connections; then the same streamed,
# reporting the time to the first event with visible text.
#
# Usage: scripts/bench-peer.sh [CONNECTIONS...]   (default: 1 16 64)
#   BEFORE=/path/to/older/retro-fleet adds `before`: the same fleet served
#   by that binary on a nats-server of its own, to measure a change in the
#   same run.
#   NO_PEER=1 leaves mistralrs out (with BEFORE: a change alone, before
#   and after). ROUNDS=N rounds per target (3).
#   REQUESTS=N per round at 16 and 64 connections (default 640; a quarter
#   of it at 1 connection); PEER_ROOT (default ~/.cache/retro-fleet/peer).
#   SCHEMA=FILE adds, after each load, the same load asking for JSON that
#   fits that JSON Schema (`response_format`): the cost of constrained
#   decoding, on both servers. STREAMED=0 skips the streamed loads.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
PEER_ROOT="${PEER_ROOT:-$HOME/.cache/retro-fleet/peer}"
MISTRALRS="$PEER_ROOT/bin/mistralrs"
if [ -z "${NO_PEER:-}" ] && [ ! -x "$MISTRALRS" ]; then
    echo "installing mistralrs-cli 0.8.1 into $PEER_ROOT (once; about 25 minutes on 2 cores)" >&2
    CARGO_TARGET_DIR="$PEER_ROOT/target" cargo install mistralrs-cli --version 0.8.1 --locked --root "$PEER_ROOT" >&2
fi
bench_build
CONNS=("$@")
[ ${#CONNS[@]} -gt 0 ] || CONNS=(1 16 64)
N="${REQUESTS:-640}"
bench_workdir 4340
"$BIN/retro-fleet" model tiny --out "$WORKDIR/tiny" >/dev/null

# fleet NAME BINARY NATS_PORT HTTP_PORT: a nats-server, a worker and an ingress
fleet() {
    local name=$1 bin=$2 nats=$3 http=$4 config="$WORKDIR/$1.toml"
    cat > "$config" <<TOML
metrics_listen = "127.0.0.1:0"
data_dir = "$WORKDIR/$name-data"
[nats]
url = "nats://127.0.0.1:$nats"
[log]
level = "warn"
[worker.cache]
enabled = false
[models.tiny]
backend = "mistralrs"
path = "$WORKDIR/tiny"
TOML
    nats-server -js -a 127.0.0.1 -p "$nats" -sd "$WORKDIR/$name-store" >/dev/null 2>&1 &
    sleep 0.5
    "$bin" --config "$config" topology apply >/dev/null
    "$bin" --config "$config" worker >"$WORKDIR/$name-worker.log" 2>&1 &
    "$bin" --config "$config" ingress --listen "127.0.0.1:$http" >"$WORKDIR/$name-ingress.log" 2>&1 &
}
unset NATS_URL
fleet fleet "$BIN/retro-fleet" "$PORT" 18084
targets=(--http fleet=http://127.0.0.1:18084)
[ -n "${NO_PEER:-}" ] || targets=(--http mistralrs@default=http://127.0.0.1:18094 "${targets[@]}")
if [ -n "${BEFORE:-}" ]; then
    fleet before "$BEFORE" $((PORT + 1)) 18085
    targets+=(--http before=http://127.0.0.1:18085)
fi
[ -n "${NO_PEER:-}" ] || "$MISTRALRS" serve -p 18094 --host 127.0.0.1 -m "$WORKDIR/tiny" >"$WORKDIR/mistralrs.log" 2>&1 &
# up PORT MODEL: waits until a chat completion is answered
up() {
    for _ in $(seq 300); do
        curl -fs -o /dev/null "http://127.0.0.1:$1/v1/chat/completions" -H 'content-type: application/json' \
            -d "{\"model\":\"$2\",\"messages\":[{\"role\":\"user\",\"content\":\"up?\"}],\"max_tokens\":1}" && return
        sleep 0.2
    done
    echo "the server on port $1 did not answer; the logs:" >&2
    tail -n 20 "$WORKDIR"/*.log >&2
    exit 1
}
[ -n "${NO_PEER:-}" ] || up 18094 default
up 18084 tiny
[ -z "${BEFORE:-}" ] || up 18085 tiny
PEER_VERSION="$([ -n "${NO_PEER:-}" ] || "$MISTRALRS" --version)"
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), ${PEER_VERSION:-no peer}, $PROFILE build"
STREAMS=("" --stream)
[ "${STREAMED:-1}" != 0 ] || STREAMS=("")
# with SCHEMA, free and constrained loads alternate round by round
SHAPES=("")
LOADS=("${ROUNDS:-3}")
if [ -n "${SCHEMA:-}" ]; then
    SHAPES+=("--json-schema=$SCHEMA")
    LOADS=($(seq "${ROUNDS:-3}" | sed 's/.*/1/'))
fi
for stream in "${STREAMS[@]}"; do
    for c in "${CONNS[@]}"; do
        n=$(( c > 1 ? N : N / 4 ))
        for rounds in "${LOADS[@]}"; do
            for shape in "${SHAPES[@]}"; do
                echo "## ${stream:+streamed, }$c connections, $n requests x $rounds rounds: 32 tokens, greedy, 64-byte prompts${shape:+, JSON fitting $SCHEMA}"
                "$BIN/loadtest" "${targets[@]}" --api openai --model tiny $stream $shape --greedy --max-tokens 32 \
                    --prompt-bytes 64 --window "$c" --requests "$n" --rounds "$rounds" || echo "(some requests failed: see above)"
            done
        done
    done
done
