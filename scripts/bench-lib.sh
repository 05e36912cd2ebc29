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
