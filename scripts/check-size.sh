#!/usr/bin/env bash
# The release binary is what `make up`, the Docker image and every worker
# pod carry (a worker scaling from zero pulls it first): build it as they
# do and fail when it grows past the limit (docs/OPERATIONS.md, "Binary
# size").
# Usage: scripts/check-size.sh [--built] [MAX_MB]   (default 128, or FLEET_MAX_BINARY_MB)
#   --built measures the release binary a release test run has just built
#   (`make test`) instead of building it: the same code and profile, with
#   the few dependency features the tests add, so CI builds once.
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
if [ "${1:-}" = "--built" ]; then
    build=0
    shift
fi
max_mb="${1:-${FLEET_MAX_BINARY_MB:-128}}"
case "$max_mb" in
    '' | *[!0-9]*) echo "check-size: MAX_MB must be a whole number of MB, got '$max_mb'" >&2; exit 2 ;;
esac
bin="${CARGO_TARGET_DIR:-target}/release/retro-fleet"
if [ "$build" = 1 ]; then
    cargo build --release --bin retro-fleet >&2
elif [ ! -x "$bin" ]; then
    echo "check-size: no $bin; run the release tests first, or drop --built" >&2
    exit 2
fi
bytes=$(stat -c %s "$bin")
mb=$(( (bytes + 1048575) / 1048576 ))
if [ "$mb" -gt "$max_mb" ]; then
    echo "check-size: $bin is $mb MB ($bytes bytes), over the $max_mb MB limit." >&2
    echo "  Debug info back in [profile.release]? Use --profile profiling for perf work." >&2
    exit 1
fi
echo "check-size: $bin is $mb MB ($bytes bytes), within the $max_mb MB limit"
