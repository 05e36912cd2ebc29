//! Handling one request message, from bytes to a settled message, in three
//! steps: [`decide`] (pure: a job, or why not), [`run`] (the cache and the
//! model: a settlement), [`settle`] (every store, reply, dead letter and
//! ack, from one table).
//!
//! # Layout
//! - [`decide`]: a delivered message → a job or a rejection; a job → run, re-send, expire or give up.
//! - [`run`]: the cache session, the backend, chunks, in-progress acks, cancellation.
//! - [`chunks`]: streamed text to the reply subject, paced by the worker's load.
//! - [`settle`]: the settlement table and the NATS writes: results, replies, dead letters, acks.
//! - `shared`: [`Shared`], what every message's task needs.

pub mod chunks;
pub mod decide;
pub mod run;
pub mod settle;
mod shared;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use retro_fleet_schemas::stored::stored_result;
use retro_fleet_schemas::{headers, subjects, ErrorCode, Priority, Received};

use crate::clock::unix_ms;
use decide::{Admission, Delivery, Served};
pub use settle::{Outcome, SettleError};
use settle::{Settlement, Settling};
pub use shared::Shared;

/// Processes one message and settles it (ack, nak or term). Never panics on
/// input; a NATS failure while settling leaves the message for redelivery.
pub async fn handle(sh: Arc<Shared>, prio: Priority, msg: jetstream::Message) {
    sh.metrics.inflight.inc();
    let model_label = subjects::parse_request(&msg.subject)
        .map(|(_, m, _)| m)
        .filter(|m| sh.catalog.contains(*m))
        .unwrap_or("unknown")
        .to_string();
    // the caller's trace id on every log line about this request
    let span = tracing::info_span!("request", id = tracing::field::Empty, trace_id = tracing::field::Empty);
    let envelope = Received::read(msg.headers.as_ref());
    if let Some(t) = envelope.traceparent.and_then(headers::trace_id) {
        span.record("trace_id", t);
    }
    let delivered = msg.info().map_or(1, |i| i.delivered);
    let m =
        Settling { msg: &msg, priority: prio, model_label: &model_label, delivered, checkpointed: Default::default() };
    let outcome = tracing::Instrument::instrument(handle_inner(&sh, &m, envelope), span).await;
    let label = match &outcome {
        Ok(o) => o.as_str(),
        Err(e) => {
            tracing::warn!(error = %e, subject = %msg.subject, "settling a message failed; it will be redelivered");
            "nats_error"
        }
    };
    sh.metrics.finished(prio, &model_label, label);
    sh.metrics.inflight.dec();
}

/// Decides, runs and settles one message.
async fn handle_inner(sh: &Shared, m: &Settling<'_>, envelope: Received<'_>) -> Result<Outcome, SettleError> {
    let picked = Instant::now();
    let now_ms = unix_ms();
    let published_ms = m.msg.info().map_or(now_ms, |i| (i.published.unix_timestamp_nanos() / 1_000_000) as u64);
    let queued = Duration::from_millis(now_ms.saturating_sub(published_ms));
    sh.metrics.picked_up(m.priority, m.model_label, queued);
    let queued_ms = queued.as_secs_f64() * 1e3;
    let delivery = Delivery {
        subject: &m.msg.subject,
        priority: m.priority,
        envelope,
        payload: &m.msg.payload,
        delivered: m.delivered,
    };
    let served = Served { backends: &sh.backends, catalog: &sh.catalog, max_prompt_bytes: sh.cfg.max_prompt_bytes };
    let job = match decide::decide(&delivery, &served) {
        Ok(job) => job,
        Err(rejection) => return settle::settle(sh, m, Settlement::GiveUp(rejection)).await,
    };
    tracing::Span::current().record("id", job.req.id.as_str());
    // A previous delivery may have stored its result before its worker died.
    let stored = match job.delivered > 1 {
        true => Box::pin(stored_result(&sh.js, &job.tenant, &job.req.id)).await.ok().flatten(),
        false => None,
    };
    let settlement = match decide::admit(&job, stored, now_ms, sh.max_deliver) {
        Admission::Answered(result) => {
            Settlement::Resend { result: Box::new(result), reply: job.reply, tenant: job.tenant, caller: job.caller }
        }
        Admission::GiveUp(rejection) => Settlement::GiveUp(rejection),
        Admission::Expired { late_ms } => {
            let message = format!("deadline passed {late_ms} ms before a worker picked the request up");
            run::final_error(sh, &job, queued_ms, ErrorCode::DeadlineExceeded, message)
        }
        Admission::Run => run::run(sh, m, job, queued_ms, picked).await,
    };
    settle::settle(sh, m, settlement).await
}
