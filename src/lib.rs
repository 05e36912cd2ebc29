//! retro-fleet: an LLM inference worker fleet on NATS JetStream.
//!
//! # Layout
//! - [`cli`]: the command line (one binary, a subcommand per role or tool).
//! - [`config`]: figment configuration: defaults < file < `FLEET_*` env < flags.
//! - [`roles`]: the process roles (`up`, `worker`, `ingress`) and signal handling.
//! - [`ingress`]: the HTTP API (native, health, metrics) and the reply inbox.
//! - [`topology`]: streams and consumers, applied idempotently.
//! - [`nats`]: connecting, and the local nats-server that `up` starts.
//! - [`dlq`]: the `dlq` tool: list, show and replay dead letters.
//! - [`ops`]: operator actions (drain a worker, pause a priority, queue depths).
//! - [`telemetry`]: logs and the per-process metrics registry.
//! - [`scaler`]: lag-driven replica recommendations (`retro-fleet scaler`).
//! - [`registry`]: reading the worker registry (`retro-fleet workers`).
//! - [`keys_cli`]: `retro-fleet keys`: API keys in NATS KV, followed live by ingresses.
//! - [`batch_cli`]: `retro-fleet batch`: submit, follow and fetch batches over HTTP.
//!
//! Wire types live in the `retro-fleet-schemas` crate, the pull loop and
//! backends in `retro-fleet-worker`.

pub mod batch_cli;
pub mod cache_cli;
pub mod cli;
pub mod config;
pub mod dlq;
pub mod ingress;
pub mod keys_cli;
pub mod nats;
pub mod ops;
pub mod registry;
pub mod roles;
pub mod scaler;
pub mod telemetry;
pub mod topology;
