#!/usr/bin/env bash
# Model throughput through the fleet vs. mistral.rs called directly
# in-process, in one run: the tiny demo model, 32-token greedy completions of
# fresh 64-byte prompts (so no cache can help), 64 in flight. One worker (cache off)
# serves the model over NATS; loadtest alternates rounds between the fleet
# and the same model loaded in its own process (--direct), then repeats with
# streaming for the time to first token. Both batch 32 sequences at once
# (the model default). The direct engine runs twice: with cohort admission,
# as the worker does by default, and with mistral.rs's own continuous
# scheduling.
#
# Usage: scripts/bench-model.sh            (release build)
#        PROFILE=debug scripts/bench-model.sh
#        WORKER_MAX_INFLIGHT=N (256) and WORKER_BATCH=N (128) set the worker's
#        max_inflight and batch_size; WORKER_ADMISSION=continuous the
#        worker's admission (default cohort); WORKER_STREAM_INTERVAL=ms the
#        worker's stream_interval_ms (default 20); REQUESTS=N per round (640);
#        WORKER=/path/to/retro-fleet serves the model with another build (to
#        measure a change side by side: run once with each).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_build
bench_workdir 4336
"$BIN/retro-fleet" model tiny --out "$WORKDIR/tiny" >/dev/null
cat > "$WORKDIR/bench.toml" <<TOML
metrics_listen = "127.0.0.1:0"
data_dir = "$WORKDIR/data"
[log]
level = "warn"
[worker]
max_inflight = ${WORKER_MAX_INFLIGHT:-256}
batch_size = ${WORKER_BATCH:-128}
stream_interval_ms = ${WORKER_STREAM_INTERVAL:-20}
[worker.cache]
enabled = false
[models.tiny]
backend = "mistralrs"
path = "$WORKDIR/tiny"
admission = "${WORKER_ADMISSION:-cohort}"
TOML
echo "# $(date -u +%F) $(nproc) cores, $(nats-server --version), $PROFILE build"
nats-server -js -a 127.0.0.1 -p "$PORT" -sd "$WORKDIR/store" >/dev/null 2>&1 &
sleep 0.5
"$BIN/retro-fleet" --config "$WORKDIR/bench.toml" topology apply >/dev/null
"${WORKER:-$BIN/retro-fleet}" --config "$WORKDIR/bench.toml" worker >"$WORKDIR/worker.log" 2>&1 &
sleep 2
echo "worker: max_inflight ${WORKER_MAX_INFLIGHT:-256}, batch_size ${WORKER_BATCH:-128}, admission ${WORKER_ADMISSION:-cohort}, stream_interval_ms ${WORKER_STREAM_INTERVAL:-20}"
echo "### tiny model, 32 tokens, greedy, window 64, ${REQUESTS:-640} requests x 3 rounds: fleet vs direct"
"$BIN/loadtest" --model tiny --greedy --max-tokens 32 --prompt-bytes 64 --window 64 --requests "${REQUESTS:-640}" --rounds 3 --direct "$WORKDIR/tiny" --direct-admission cohort,continuous
echo "### the same, streaming (time to first token)"
"$BIN/loadtest" --model tiny --greedy --max-tokens 32 --prompt-bytes 64 --window 64 --requests "${REQUESTS:-640}" --rounds 3 --direct "$WORKDIR/tiny" --direct-admission cohort,continuous --stream
