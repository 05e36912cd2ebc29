//! Operator actions shared by the tools (`retro-fleet workers | queues |
//! dlq | cache`) and the admin API: draining and resuming one worker,
//! pausing and resuming a priority class, and the depth of every queue
//! (here); dead letters ([`dlq`]); cache purges ([`cache`]); tenants'
//! settings ([`tenants`]). They act and
//! return what they did; printing it is the tools' part.
//!
//! - A **drain** asks one worker (by its registry id) over core NATS to stop
//!   taking requests; what it runs finishes and it stays up, shown as
//!   `draining` in the registry, until resumed (see the worker's `control`).
//! - A **pause** is JetStream's consumer pause on every worker consumer of
//!   a priority's stream: the server delivers nothing from that class to any
//!   worker, now or started later, until it is resumed or the pause ends.
//!   Requests keep queueing (up to the stream's limits); messages a worker
//!   had already prefetched still run.

pub mod cache;
pub mod dlq;
pub mod tenants;

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use futures::StreamExt;
use retro_fleet_schemas::registry::kv_key;
use retro_fleet_schemas::{subjects, Priority};
use retro_fleet_worker::control::ControlState;
use serde::Serialize;

/// How long a control request waits for the worker's answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(3);
/// A pause without an end: a century.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Why an operator action failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// No worker with that id answered.
    #[error("no worker `{0}` answers (see `retro-fleet workers` for the live ones)")]
    NoSuchWorker(String),
    /// Anything else (NATS, JetStream, a missing stream).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Drains (`drain = true`) or resumes worker `id`; returns its answer.
pub async fn drain_worker(client: &async_nats::Client, id: &str, drain: bool) -> Result<ControlState, OpsError> {
    let key = kv_key(id);
    let subject = if drain { subjects::drain(&key) } else { subjects::resume(&key) };
    let reply = match tokio::time::timeout(CONTROL_TIMEOUT, client.request(subject, bytes::Bytes::new())).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            return Err(OpsError::NoSuchWorker(id.to_string()))
        }
        Ok(Err(e)) => return Err(anyhow::Error::from(e).context(format!("asking worker `{id}`")).into()),
        Err(_) => return Err(OpsError::NoSuchWorker(id.to_string())),
    };
    Ok(serde_json::from_slice(&reply.payload).context("the worker's answer is not a control state")?)
}

/// One consumer's pause state.
#[derive(Debug, Clone, Serialize)]
pub struct Paused {
    /// `STREAM/consumer`.
    pub consumer: String,
    /// Whether the server delivers nothing from it.
    pub paused: bool,
    /// Seconds until the pause ends by itself (absent: not paused).
    pub remaining_secs: Option<u64>,
}

/// Pauses (`Some(duration)`, `None` for until resumed) or resumes
/// (`resume = true`) every worker consumer of priority `p`.
pub async fn pause_priority(
    js: &jetstream::Context,
    p: Priority,
    resume: bool,
    duration: Option<Duration>,
) -> anyhow::Result<Vec<Paused>> {
    let name = subjects::request_stream(p);
    let stream =
        js.get_stream(name).await.with_context(|| format!("no stream {name} (run `retro-fleet topology apply`)"))?;
    let until = async_nats::datetime::add_std_duration(async_nats::datetime::now(), duration.unwrap_or(FOREVER))
        .map_err(|e| anyhow::anyhow!("pause end: {e}"))?;
    let mut names = Vec::new();
    let mut list = stream.consumer_names();
    while let Some(n) = list.next().await {
        names.push(n.with_context(|| format!("listing the consumers of {name}"))?);
    }
    names.sort();
    let mut out = Vec::new();
    for c in names {
        let r = if resume { stream.resume_consumer(&c).await } else { stream.pause_consumer(&c, until).await };
        let r = r.with_context(|| format!("{} consumer {name}/{c}", if resume { "resuming" } else { "pausing" }))?;
        out.push(Paused {
            consumer: format!("{name}/{c}"),
            paused: r.paused,
            remaining_secs: r.pause_remaining.filter(|_| r.paused).map(|d| d.as_secs()),
        });
    }
    Ok(out)
}

/// Depth of each request stream and the state of its worker consumers.
pub async fn queues(js: &jetstream::Context) -> anyhow::Result<serde_json::Value> {
    let mut out = Vec::new();
    for p in Priority::ALL {
        let name = subjects::request_stream(p);
        let mut stream = js.get_stream(name).await.with_context(|| format!("stream {name}"))?;
        let info = stream.info().await.with_context(|| format!("stream {name}"))?.clone();
        let mut consumers = Vec::new();
        let mut list = stream.consumers();
        while let Some(c) = list.next().await {
            let c = c.with_context(|| format!("consumers of {name}"))?;
            consumers.push(serde_json::json!({
                "name": c.name, "pending": c.num_pending, "in_flight": c.num_ack_pending,
                "redelivered": c.num_redelivered, "waiting_pulls": c.num_waiting,
                "paused": c.paused, "pause_remaining_secs": c.pause_remaining.filter(|_| c.paused).map(|d| d.as_secs()),
            }));
        }
        out.push(serde_json::json!({
            "priority": p, "stream": name, "messages": info.state.messages, "bytes": info.state.bytes,
            "consumers": consumers,
        }));
    }
    Ok(serde_json::json!({ "queues": out }))
}
