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
use crate::trace;
use decide::{Admission, Delivery, Served};
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
pub use settle::{Outcome, SettleError};
use settle::{Settlement, Settling};
pub use shared::Shared;

/// When a message was picked up, and how long it waited.
#[derive(Debug, Clone, Copy)]
pub struct Picked {
    /// When this worker took it.
    pub at: Instant,
    /// The same instant, unix ms.
    pub at_ms: u64,
    /// When it was published, unix ms.
    pub published_ms: u64,
}

impl Picked {
    /// `msg` taken now.
    fn now(msg: &jetstream::Message) -> Picked {
        let at_ms = unix_ms();
        let published_ms = msg.info().map_or(at_ms, |i| crate::clock::ms_of(i.published));
        Picked { at: Instant::now(), at_ms, published_ms }
    }

    /// Time in the queue.
    fn queued(&self) -> Duration {
        Duration::from_millis(self.at_ms.saturating_sub(self.published_ms))
    }
}

/// Processes one message and settles it (ack, nak or term). Never panics on
/// input; a NATS failure while settling leaves the message for redelivery.
pub async fn handle(sh: Arc<Shared>, prio: Priority, msg: jetstream::Message) {
    sh.metrics.inflight.inc();
    let picked = Picked::now(&msg);
    let published_ms = picked.published_ms;
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
    // its trace: the wait in the queue, then its handling here, both under
    // the span that published it (a request sent without trace context:
    // the wait under the handling, which starts the trace)
    let parent = trace::remote(envelope.traceparent);
    let class = || KeyValue::new("fleet.priority", prio.as_str());
    let attrs = || {
        vec![
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.destination.name", msg.subject.to_string()),
            KeyValue::new("fleet.worker", sh.worker_id.clone()),
            KeyValue::new("fleet.delivered", delivered),
            class(),
        ]
    };
    let cx = trace::start("handle", SpanKind::Consumer, &parent, None, attrs);
    let wait_under = if trace::traceparent(&parent).is_some() { &parent } else { &cx };
    trace::record("queue wait", wait_under, picked.published_ms, picked.at_ms, || vec![class()]);
    let m =
        Settling { msg: &msg, priority: prio, model_label: &model_label, delivered, checkpointed: Default::default() };
    let handling = tracing::Instrument::instrument(handle_inner(&sh, &m, envelope, picked), span);
    let outcome = trace::within(cx.clone(), handling).await;
    let label = match &outcome {
        Ok(o) => o.as_str(),
        Err(e) => {
            tracing::warn!(error = %e, subject = %msg.subject, "settling a message failed; it will be redelivered");
            "nats_error"
        }
    };
    trace::end(&cx, || vec![KeyValue::new("fleet.outcome", label)], (label != "ok").then_some(label));
    sh.metrics.finished(prio, &model_label, label, Duration::from_millis(unix_ms().saturating_sub(published_ms)));
    sh.metrics.inflight.dec();
}

/// Decides, runs and settles one message.
async fn handle_inner(
    sh: &Shared,
    m: &Settling<'_>,
    envelope: Received<'_>,
    picked: Picked,
) -> Result<Outcome, SettleError> {
    let queued = picked.queued();
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
    trace::set(|| KeyValue::new("fleet.request_id", job.req.id.clone()));
    trace::set(|| KeyValue::new("gen_ai.request.model", job.req.model.clone()));
    // A previous delivery may have stored its result before its worker died.
    let stored = match job.delivered > 1 {
        true => Box::pin(stored_result(&sh.js, &job.tenant, &job.req.id)).await.ok().flatten(),
        false => None,
    };
    let settlement = match decide::admit(&job, stored, picked.at_ms, sh.max_deliver) {
        Admission::Answered(result) => {
            Settlement::Resend { result: Box::new(result), reply: job.reply, tenant: job.tenant, caller: job.caller }
        }
        Admission::GiveUp(rejection) => Settlement::GiveUp(rejection),
        Admission::Expired { late_ms } => {
            let message = format!("deadline passed {late_ms} ms before a worker picked the request up");
            run::final_error(sh, &job, queued_ms, ErrorCode::DeadlineExceeded, message)
        }
        Admission::Run => run::run(sh, m, job, queued_ms, picked.at).await,
    };
    settle::settle(sh, m, settlement).await
}
