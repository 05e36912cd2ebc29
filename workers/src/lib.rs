//! The retro-fleet worker: pulls requests from the priority streams, runs
//! them on a backend and publishes exactly one result per request.
//!
//! # Layout
//! - [`worker`]: the pull loop (free slots → priority plan → fetch → dispatch) and drain.
//! - [`scheduler`]: pure priority planning with guaranteed shares for lower classes.
//! - [`lanes`]: the consumers pulled: each model's shared lane and tenants' own lanes, found by a survey.
//! - [`tenants`]: tenants' settings (weights) from KV `fleet_tenants`, followed live.
//! - [`fair`]: fair sharing of slots between tenants in a class (start-time fair queueing, burst slots).
//! - [`process`]: one message: decide (pure), run (cache and model), settle (store, reply, ack).
//! - [`heartbeat`]: registry heartbeats to the KV bucket `fleet_workers`.
//! - [`control`]: operator drain and resume of this worker over core NATS.
//! - [`sweeper`]: answers requests addressed to models nobody in the fleet serves.
//! - [`cache`]: the result cache (foyer memory + disk), a request's session in it, warming, semantic index.
//! - [`embed`]: sentence embedders (lexical, or a BERT run with candle) the semantic index compares prompts with.
//! - [`backend`]: the `Backend` trait; the echo, synthetic and mistral.rs backends; pools of
//!   model instances (routing, growth) under the worker's memory budget (`backend/pool/budget.rs`).
//! - [`breaker`]: a circuit breaker per model instance (owned by its pool slot).
//! - [`cancel`]: cancel messages on `fleet.ctl.cancel.<id>` and the tokens of running requests.
//! - [`checkpoint`]: the tokens of running generations in KV `fleet_checkpoints`, so another attempt resumes.
//! - [`config`]: worker and model configuration.
//! - [`follow`]: following a KV bucket (entries, then changes) for what a process keeps in memory.
//! - [`failover`]: JetStream writes that ride through a leader election.
//! - [`hub`]: model ids of the Hugging Face hub, from its local cache or online.
//! - [`lora`]: merges LoRA adapters (PEFT) into copies of base weights.
//! - [`tiny_model`]: writes the small random-weights Llama used by the demo and the tests.
//! - [`trace`]: a request's spans across the NATS hops (OpenTelemetry), their context in `traceparent`.
//! - [`metrics`]: the worker's Prometheus metrics and the fleet's latency buckets.
//! - [`usage`]: metering: usage records in `FLEET_USAGE` and `fleet_tokens_total`.
//! - [`shutdown`]: the bounded NATS operations after a drain ([`final_op`]).
//! - [`clock`]: [`unix_ms`], the wall clock every message and KV entry carries.

pub mod backend;
pub mod breaker;
pub mod cache;
pub mod cancel;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod control;
pub mod embed;
pub mod failover;
pub mod fair;
pub mod follow;
pub mod heartbeat;
pub mod hub;
pub mod lanes;
pub mod lora;
pub mod metrics;
pub mod process;
pub mod scheduler;
pub mod shutdown;
pub mod sweeper;
pub mod tenants;
pub mod tiny_model;
pub mod trace;
pub mod usage;
pub mod worker;

pub use backend::{Backend, BackendError, Generation};
pub use clock::unix_ms;
pub use config::{ModelConfig, Models, WorkerConfig};
pub use shutdown::{final_op, FINAL_OP_TIMEOUT};
pub use worker::{Drained, Worker, WorkerError};

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
