//! retro-fleet: an LLM inference worker fleet on NATS JetStream.
//!
//! # Layout
//! The roles:
//! - [`roles`]: the process roles (`up`, `worker`, `ingress`), their shutdown and signal handling.
//! - [`ingress`]: the HTTP API (native, OpenAI, batches, admin, health, metrics) and the reply inbox.
//! - [`scaler`]: lag-driven replica recommendations (`retro-fleet scaler`).
//!
//! The tools for people:
//! - [`tools`]: the command line (clap) and one module per tool (submit, batch, dlq, cache, keys, ...).
//! - [`ops`]: operator actions the tools share with the admin API (drain, pause, queue depths,
//!   dead letters, cache purges).
//!
//! What they all share:
//! - [`config`]: figment configuration: defaults < file < `FLEET_*` env < flags.
//! - [`topology`]: streams, consumers and KV buckets, applied idempotently.
//! - [`nats`]: connecting, and the local nats-server that `up` starts.
//! - [`registry`]: reading the worker registry (the scaler, the admin API, `retro-fleet workers`).
//! - [`telemetry`]: logs and the per-process metrics registry.
//! - [`usage`]: reading metered usage (`GET /v1/usage`, `retro-fleet usage`).
//!
//! Wire types live in the `retro-fleet-schemas` crate, the pull loop and
//! backends in `retro-fleet-worker`.

pub mod config;
pub mod ingress;
pub mod nats;
pub mod ops;
pub mod registry;
pub mod roles;
pub mod scaler;
pub mod telemetry;
pub mod tools;
pub mod topology;
pub mod usage;
