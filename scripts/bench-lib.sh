# Shared by the benchmark scripts: build the binaries of $PROFILE (release
# by default, PROFILE=debug for debug) and set BIN to their directory.
bench_build() {
    PROFILE="${PROFILE:-release}"
    if [ "$PROFILE" = release ]; then
        cargo build --release --workspace --bins >&2
    else
        cargo build --workspace --bins >&2
    fi
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
