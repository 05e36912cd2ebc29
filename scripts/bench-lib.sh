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
