# Shared by the benchmark scripts: build the binaries of $PROFILE (release
# by default, PROFILE=debug for debug, PROFILE=profiling for release code
# with line tables, for perf) and set BIN to their directory.
bench_build() {
    PROFILE="${PROFILE:-release}"
    case "$PROFILE" in
        debug) cargo build --workspace --bins >&2 ;;
        *) cargo build --profile "$PROFILE" --workspace --bins >&2 ;;
    esac
    BIN="${CARGO_TARGET_DIR:-target}/$PROFILE"
}

# A temp dir for the run, removed (with every background job) on exit, and
# NATS_URL for a nats-server on BENCH_NATS_PORT (default: the argument).
bench_workdir() {
    PORT="${BENCH_NATS_PORT:-$1}"
    WORKDIR="$(mktemp -d)"
    trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORKDIR"' EXIT
    export NATS_URL="nats://127.0.0.1:$PORT"
}

# Writes the worker config the echo benchmarks share to $1: quiet logs, a
# metrics port of its own, and room for a window-64 load (512 in flight,
# pulls of 256).
bench_echo_config() {
    cat > "$1" <<TOML
metrics_listen = "127.0.0.1:0"
[log]
level = "warn"
[worker]
max_inflight = 512
batch_size = 256
TOML
}

# MINILM: the all-MiniLM-L6-v2 directory ($MINILM, $FLEET_MINILM_DIR, or
# where `make deps` unpacks it); stops the run when it is not there.
bench_minilm() {
    MINILM="${MINILM:-${FLEET_MINILM_DIR:-$HOME/.cache/retro-fleet/models/all-MiniLM-L6-v2}}"
    [ -f "$MINILM/model.safetensors" ] || { echo "no model in $MINILM: run scripts/install-deps.sh" >&2; exit 1; }
}

# Prints the run's header, starts a nats-server on $PORT (store in
# $WORKDIR) and applies the topology of the config $1.
bench_nats() {
    echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build"
    nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
    sleep 0.5
    "$BIN/retro-fleet" --config "$1" topology apply >/dev/null
}
