//! The retro-fleet worker: pulls requests from the priority streams, runs
//! them on a backend and publishes exactly one result per request.
//!
//! # Layout
//! - [`worker`]: the pull loop (free slots → priority plan → fetch → dispatch) and drain.
//! - [`scheduler`]: pure priority planning with guaranteed shares for lower classes.
//! - [`process`]: one message: decode, validate, deadline, run, publish, ack.
//! - [`heartbeat`]: registry heartbeats to the KV bucket `fleet_workers`.
//! - [`sweeper`]: answers requests addressed to models nobody in the fleet serves.
//! - [`cache`]: the result cache (foyer memory + disk), coalescing, warming, semantic index.
//! - [`backend`]: the `Backend` trait; the echo, synthetic and mistral.rs backends; pools of
//!   model instances (routing, growth) under the worker's memory budget (`backend/pool/budget.rs`).
//! - [`breaker`]: a circuit breaker per model instance (owned by its pool slot).
//! - [`cancel`]: cancel messages on `fleet.ctl.cancel.<id>` and the tokens of running requests.
//! - [`config`]: worker and model configuration.
//! - [`hub`]: model ids of the Hugging Face hub, from its local cache or online.
//! - [`lora`]: merges LoRA adapters (PEFT) into copies of base weights.
//! - [`tiny_model`]: writes the small random-weights Llama used by the demo and the tests.
//! - [`metrics`]: the worker's Prometheus metrics and the fleet's latency buckets.

pub mod backend;
pub mod breaker;
pub mod cache;
pub mod cancel;
pub mod config;
pub mod control;
pub mod heartbeat;
pub mod hub;
pub mod lora;
pub mod metrics;
pub mod process;
pub mod scheduler;
pub mod sweeper;
pub mod tiny_model;
pub mod worker;

pub use backend::{Backend, BackendError, Generation};
pub use config::{ModelConfig, Models, WorkerConfig};
pub use worker::{Drained, Worker, WorkerError};

/// How long each NATS operation after a shutdown's drain may take (the
/// last heartbeat, the registry delete, handing prefetched messages back, the
/// final flush). With no connection they are skipped: nothing after the
/// drain waits for a reconnect, so a process exits within its drain bound
/// even when NATS is gone.
pub const FINAL_OP_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// Runs one of a shutdown's final NATS operations (`what` names it in the
/// log): skipped when `client` is not connected, given up after
/// [`FINAL_OP_TIMEOUT`]. `None` when it did not run to its end.
pub async fn final_op<F: std::future::Future>(client: &async_nats::Client, what: &str, op: F) -> Option<F::Output> {
    if client.connection_state() != async_nats::connection::State::Connected {
        tracing::info!(op = what, "not connected to NATS at shutdown: skipped");
        return None;
    }
    match tokio::time::timeout(FINAL_OP_TIMEOUT, op).await {
        Ok(r) => Some(r),
        Err(_) => {
            tracing::warn!(op = what, timeout = ?FINAL_OP_TIMEOUT, "NATS did not answer at shutdown: given up");
            None
        }
    }
}

/// Milliseconds since the unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A worker id from the host name and process id.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}
