#!/usr/bin/env bash
# Cost of authentication and rate limiting through the HTTP ingress, in one
# run: one nats-server (temp store), one release `retro-fleet worker` (echo
# model) and three ingresses in front of it:
#   off      auth and rate limits off (the default of a local `up`)
#   on       an API key (SHA-256 lookup) + request and token limits, counters in process
#   on-nats  the same, counters shared through NATS KV (compare-and-swap)
# `loadtest --http` then alternates rounds between them (limits are set high
# enough never to refuse: the check runs, nobody is turned away).
#
# Usage: scripts/bench-ingress.sh [WINDOW...]   (default: 64 1)
#   BENCH_BEFORE=/path/to/older/retro-fleet adds a fourth ingress,
#   `on-nats-before`: the on-nats settings served by that binary, to
#   measure a change side by side.
#   BENCH_PROFILE=debug uses a dev build (dependencies optimised, this
#   project's code not: the auth and limit code then looks costlier).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${BENCH_PROFILE:-${PROFILE:-release}}"
. scripts/bench-lib.sh
bench_build
WINDOWS=("$@")
[ ${#WINDOWS[@]} -gt 0 ] || WINDOWS=(64 1)
bench_workdir 4334
KEY="bench-key-$(date +%s)"
HASH="$(printf %s "$KEY" | sha256sum | cut -d' ' -f1)"
bench_echo_config "$WORKDIR/off.toml"
on_config() {
    cat "$WORKDIR/off.toml"
    cat <<TOML
[ingress.auth]
enabled = true
[[ingress.auth.api_keys]]
id = "bench"
sha256 = "$HASH"
tenant = "bench"
roles = ["submit", "read"]
[ingress.rate_limit]
enabled = true
backend = "$1"
[ingress.rate_limit.submit]
requests = 1000000000
burst = 1000000000
tokens = 1000000000000
TOML
}
on_config local > "$WORKDIR/on.toml"
on_config nats > "$WORKDIR/on-nats.toml"
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build"
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
sleep 0.5
"$BIN/retro-fleet" --config "$WORKDIR/off.toml" topology apply >/dev/null
"$BIN/retro-fleet" --config "$WORKDIR/off.toml" worker >"$WORKDIR/worker.log" 2>&1 &
targets=()
ports=()
i=0
names=(off on on-nats)
[ -z "${BENCH_BEFORE:-}" ] || names+=(on-nats-before)
for name in "${names[@]}"; do
    port=$((18080 + i)); i=$((i + 1))
    bin="$BIN/retro-fleet" config="$WORKDIR/$name.toml"
    [ "$name" != on-nats-before ] || { bin="$BENCH_BEFORE"; config="$WORKDIR/on-nats.toml"; }
    "$bin" --config "$config" ingress --listen "127.0.0.1:$port" >"$WORKDIR/$name.log" 2>&1 &
    targets+=(--http "$name=http://127.0.0.1:$port")
    ports+=("$port")
done
for port in "${ports[@]}"; do
    for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/health/ready" >/dev/null && break; sleep 0.1; done
done
for w in "${WINDOWS[@]}"; do
    n=$(( w > 1 ? 20000 : 3000 ))
    echo "## HTTP window $w, $n requests x 3 rounds, 256-byte prompts"
    "$BIN/loadtest" "${targets[@]}" --bearer "$KEY" --window "$w" --requests "$n" --rounds 3 || echo "(some requests failed: see above)"
done
