//! Handling one request message, from bytes to an acked result.
//!
//! Ack discipline: the result is published to `FLEET_RESULTS` (deduplicated
//! on the request id) and sent to the reply subject; the message is acked
//! only once the results stream has acknowledged the write. Poison (bytes
//! that are not a valid request) becomes an error result when an id or reply
//! subject is known, goes to `FLEET_DLQ` with its original payload, and is
//! terminated. Retryable backend failures are nak'ed with a delay until
//! MaxDeliver, then dead-lettered.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use retro_fleet_schemas::{
    codec, headers, subjects, CacheTier, ErrorCode, InferRequest, InferResult, Output, Priority, Status, StreamChunk,
    Timings,
};
use tokio::sync::OwnedSemaphorePermit;

use crate::backend::Backend;
use crate::config::WorkerConfig;
use crate::metrics::Metrics;
use crate::unix_ms;

/// What every message handler needs; shared by all in-flight tasks.
pub struct Shared {
    /// Core NATS client (replies).
    pub client: async_nats::Client,
    /// JetStream context (results, dead letters).
    pub js: jetstream::Context,
    /// Backends of the models this worker serves.
    pub backends: HashMap<String, Arc<dyn Backend>>,
    /// Every model configured in the fleet (to tell "unknown" from "not mine").
    pub catalog: BTreeSet<String>,
    /// This worker's id.
    pub worker_id: String,
    /// Worker settings.
    pub cfg: WorkerConfig,
    /// Metrics handles.
    pub metrics: Metrics,
    /// Deliveries after which a retryable failure is dead-lettered.
    pub max_deliver: i64,
    /// The consumers' ack wait: a request still running is re-armed with an
    /// in-progress ack every half of it, so it is never redelivered while alive.
    pub ack_wait: Duration,
}

pub(crate) fn header<'a>(h: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    h.and_then(|h| h.get(name)).map(|v| v.as_str())
}

/// Processes one message and settles it (ack, nak or term). Never panics on
/// input; a NATS failure while settling leaves the message for redelivery.
pub async fn handle(sh: Arc<Shared>, prio: Priority, msg: jetstream::Message, _permit: OwnedSemaphorePermit) {
    sh.metrics.inflight.inc();
    let model_label = subjects::parse_request(&msg.subject)
        .map(|(_, m)| m)
        .filter(|m| sh.catalog.contains(*m))
        .unwrap_or("unknown")
        .to_string();
    // the caller's trace id on every log line about this request
    let span = tracing::info_span!("request", trace_id = tracing::field::Empty);
    if let Some(t) = header(msg.headers.as_ref(), headers::TRACEPARENT).and_then(headers::trace_id) {
        span.record("trace_id", t);
    }
    let outcome = tracing::Instrument::instrument(handle_inner(&sh, prio, &msg, &model_label), span).await;
    let label = match &outcome {
        Ok(o) => o.as_str(),
        Err(e) => {
            tracing::warn!(error = %e, subject = %msg.subject, "settling a message failed; it will be redelivered");
            "nats_error"
        }
    };
    sh.metrics.requests.with_label_values(&[prio.as_str(), &model_label, label]).inc();
    sh.metrics.inflight.dec();
}

/// How a message ended, for the outcome label.
enum Outcome {
    Ok,
    Failed(ErrorCode),
    Retried,
}

impl Outcome {
    fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed(c) => c.as_str(),
            Outcome::Retried => "retried",
        }
    }
}

pub(crate) type Error = Box<dyn std::error::Error + Send + Sync>;

async fn handle_inner(
    sh: &Shared,
    prio: Priority,
    msg: &jetstream::Message,
    model_label: &str,
) -> Result<Outcome, Error> {
    let picked = Instant::now();
    let now_ms = unix_ms();
    let hdrs = msg.headers.as_ref();
    let (delivered, published_ms) = match msg.info() {
        Ok(i) => (i.delivered, (i.published.unix_timestamp_nanos() / 1_000_000) as u64),
        Err(_) => (1, now_ms),
    };
    let queued_ms = now_ms.saturating_sub(published_ms) as f64;
    sh.metrics.queue_wait.with_label_values(&[prio.as_str(), model_label]).observe(queued_ms / 1e3);
    let reply = header(hdrs, headers::REPLY).filter(|r| !r.is_empty());
    let header_id = header(hdrs, headers::MSG_ID).filter(|id| subjects::is_token(id));
    let header_tenant = header(hdrs, headers::TENANT);

    let decoded = codec::decode::<InferRequest>(header(hdrs, headers::CONTENT_TYPE), &msg.payload)
        .map_err(|e| (ErrorCode::DecodeError, e.0))
        .and_then(|r| r.validate(sh.cfg.max_prompt_bytes).map(|_| r).map_err(|e| (e.code, e.message)))
        .and_then(|r| {
            let subject_model = subjects::parse_request(&msg.subject).map(|(_, m)| m);
            if subject_model != Some(r.model.as_str()) {
                return Err((
                    ErrorCode::InvalidRequest,
                    format!(
                        "request for model `{}` was published to `{}`; publish to `{}`",
                        r.model,
                        msg.subject,
                        subjects::request(prio, &r.model)
                    ),
                ));
            }
            Ok(r)
        });
    let req = match decoded {
        Ok(r) => r,
        Err((code, message)) => {
            let ids = Ids { id: header_id, tenant: header_tenant.filter(|t| subjects::is_token(t)), reply };
            return terminal(sh, prio, msg, model_label, ids, code, &message, delivered).await;
        }
    };
    let tenant = header_tenant.or(req.tenant.as_deref()).unwrap_or(subjects::DEFAULT_TENANT);
    let ids = Ids { id: Some(&req.id), tenant: Some(tenant), reply };
    if !subjects::is_token(tenant) {
        let message = format!("tenant `{tenant}` must be characters from [A-Za-z0-9_-]");
        return terminal(sh, prio, msg, model_label, ids, ErrorCode::InvalidRequest, &message, delivered).await;
    }
    let Some(backend) = sh.backends.get(&req.model) else {
        let message = if sh.catalog.contains(&req.model) {
            format!("model `{}` is configured but this worker does not serve it", req.model)
        } else {
            format!("model `{}` is not configured in this fleet", req.model)
        };
        return terminal(sh, prio, msg, model_label, ids, ErrorCode::UnknownModel, &message, delivered).await;
    };

    if delivered > 1 {
        // A previous delivery may have stored its result before the worker
        // died: answer with that one, never with a second computation.
        if let Some(stored) = stored_result(sh, tenant, &req.id).await {
            tracing::info!(id = %req.id, delivered, "redelivered request already answered; re-sending the stored result");
            if let Some(reply) = reply {
                sh.client
                    .publish_with_headers(reply.to_string(), reply_headers(), Bytes::from(codec::encode(&stored)))
                    .await?;
            }
            msg.ack().await?;
            return Ok(Outcome::Ok);
        }
    }

    let base = |status| InferResult {
        v: retro_fleet_schemas::SCHEMA_VERSION,
        id: req.id.clone(),
        model: req.model.clone(),
        model_revision: backend.revision(),
        adapter: req.adapter.clone(),
        status,
        output: None,
        usage: None,
        cache: CacheTier::None,
        timings: Timings { queued_ms, compute_ms: 0.0, total_ms: queued_ms },
        worker: sh.worker_id.clone(),
        error: None,
    };

    if let Some(deadline) = header(hdrs, headers::DEADLINE).and_then(|d| d.trim().parse::<u64>().ok()) {
        if now_ms > deadline {
            let mut result = base(Status::Error);
            result.error = Some(retro_fleet_schemas::ErrorBody {
                code: ErrorCode::DeadlineExceeded,
                message: format!("deadline passed {} ms before a worker picked the request up", now_ms - deadline),
                retryable: false,
            });
            publish_result(sh, reply, tenant, &result).await?;
            msg.ack().await?;
            return Ok(Outcome::Failed(ErrorCode::DeadlineExceeded));
        }
    }

    let (deltas, forwarder) = match (req.stream, reply) {
        (true, Some(reply)) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn(forward_chunks(sh.client.clone(), reply.to_string(), req.id.clone(), rx));
            (Some(tx), Some(task))
        }
        _ => (None, None),
    };
    let started = Instant::now();
    let generated = {
        let run = backend.generate(&req, deltas);
        tokio::pin!(run);
        let every = (sh.ack_wait / 2).max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                out = &mut run => break out,
                _ = ticks.tick() => {
                    // still working: reset the ack timer so no other worker gets it
                    if let Err(e) = msg.ack_with(AckKind::Progress).await {
                        tracing::warn!(id = %req.id, error = %e, "in-progress ack failed");
                    }
                }
            }
        }
    };
    let compute = started.elapsed();
    sh.metrics.compute.with_label_values(&[prio.as_str(), model_label]).observe(compute.as_secs_f64());
    if let Some(task) = forwarder {
        // every chunk is out before the final result (same connection, in order)
        let _ = task.await;
    }
    match generated {
        Ok(g) => {
            let mut result = base(Status::Ok);
            result.output = Some(Output { text: g.text, finish_reason: g.finish_reason });
            result.usage = Some(g.usage);
            result.timings.compute_ms = compute.as_secs_f64() * 1e3;
            result.timings.total_ms = queued_ms + picked.elapsed().as_secs_f64() * 1e3;
            publish_result(sh, reply, tenant, &result).await?;
            msg.ack().await?;
            Ok(Outcome::Ok)
        }
        Err(e) if e.retryable && delivered < sh.max_deliver => {
            let delay = Duration::from_millis(250 * (1 << delivered.clamp(0, 6)) as u64);
            tracing::warn!(id = %req.id, model = %req.model, error = %e, delivered, ?delay, "retryable backend failure; nak");
            sh.metrics.naks.with_label_values(&[prio.as_str(), model_label]).inc();
            msg.ack_with(AckKind::Nak(Some(delay))).await?;
            Ok(Outcome::Retried)
        }
        Err(e) => terminal(sh, prio, msg, model_label, ids, e.code, &e.message, delivered).await,
    }
}

/// What is known about who asked, for error results.
#[derive(Clone, Copy)]
pub(crate) struct Ids<'a> {
    pub id: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub reply: Option<&'a str>,
}

/// Gives a message up: dead letter with the original payload, error result
/// where someone can see it, then `Term`. If the dead letter cannot be
/// written the message is nak'ed instead, so nothing is lost.
#[allow(clippy::too_many_arguments)]
async fn terminal(
    sh: &Shared,
    prio: Priority,
    msg: &jetstream::Message,
    model_label: &str,
    ids: Ids<'_>,
    code: ErrorCode,
    message: &str,
    delivered: i64,
) -> Result<Outcome, Error> {
    let letter = Letter { subject: &msg.subject, headers: msg.headers.as_ref(), payload: &msg.payload, delivered };
    if let Err(e) = dead_letter(sh, prio, &letter, ids.id, code, message).await {
        tracing::error!(error = %e, "cannot write the dead letter; nak so the message is kept");
        msg.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await?;
        return Ok(Outcome::Retried);
    }
    sh.metrics.dead_letters.with_label_values(&[prio.as_str(), model_label, code.as_str()]).inc();
    answer_error(sh, ids, letter.model(), code, message).await?;
    msg.ack_with(AckKind::Term).await?;
    Ok(Outcome::Failed(code))
}

/// A request message being given up.
pub(crate) struct Letter<'a> {
    pub subject: &'a str,
    pub headers: Option<&'a HeaderMap>,
    pub payload: &'a Bytes,
    pub delivered: i64,
}

impl Letter<'_> {
    fn model(&self) -> &str {
        subjects::parse_request(self.subject).map(|(_, m)| m).filter(|m| subjects::is_token(m)).unwrap_or("unknown")
    }
}

/// Writes `letter` to `FLEET_DLQ` with its original payload and headers plus
/// the error, and waits for the stream to have it.
pub(crate) async fn dead_letter(
    sh: &Shared,
    prio: Priority,
    letter: &Letter<'_>,
    id: Option<&str>,
    code: ErrorCode,
    message: &str,
) -> Result<(), Error> {
    tracing::warn!(subject = %letter.subject, id = id.unwrap_or("-"), code = code.as_str(), %message, "request failed; dead-lettering");
    let mut h = letter.headers.cloned().unwrap_or_default();
    h.insert(headers::ERROR_CODE, code.as_str());
    h.insert(headers::ERROR_MESSAGE, sanitize_header(message).as_str());
    h.insert(headers::DELIVERY_COUNT, letter.delivered.to_string().as_str());
    h.insert(headers::ORIGINAL_SUBJECT, letter.subject);
    sh.js.publish_with_headers(subjects::dlq(prio, letter.model()), h, letter.payload.clone()).await?.await?;
    Ok(())
}

/// Sends the error result to whoever can see it: stored and replied when
/// the request id is known, replied only when just the reply subject is.
pub(crate) async fn answer_error(
    sh: &Shared,
    ids: Ids<'_>,
    model: &str,
    code: ErrorCode,
    message: &str,
) -> Result<(), Error> {
    let mut result = InferResult::error(ids.id.unwrap_or(""), model, code, message);
    result.worker = sh.worker_id.clone();
    match (ids.id, ids.reply) {
        (Some(_), reply) => publish_result(sh, reply, ids.tenant.unwrap_or(subjects::DEFAULT_TENANT), &result).await?,
        (None, Some(reply)) => {
            sh.client
                .publish_with_headers(reply.to_string(), reply_headers(), Bytes::from(codec::encode(&result)))
                .await?
        }
        (None, None) => {}
    }
    Ok(())
}

fn reply_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, codec::ContentType::MSGPACK_MIME);
    h.insert(headers::KIND, headers::KIND_RESULT);
    h
}

/// Header values cannot hold line breaks.
fn sanitize_header(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(1024).collect()
}

/// Stores the result in `FLEET_RESULTS` (deduplicated on the request id) and
/// sends it to the reply subject, returning once the stream has it.
pub async fn publish_result(sh: &Shared, reply: Option<&str>, tenant: &str, result: &InferResult) -> Result<(), Error> {
    let payload = Bytes::from(codec::encode(result));
    let mut h = reply_headers();
    h.insert(headers::MSG_ID, result.id.as_str());
    let stored = sh.js.publish_with_headers(subjects::result(tenant, &result.id), h.clone(), payload.clone()).await?;
    if let Some(reply) = reply {
        sh.client.publish_with_headers(reply.to_string(), h, payload).await?;
    }
    stored.await?;
    Ok(())
}

/// The result stored for `id`, if any.
async fn stored_result(sh: &Shared, tenant: &str, id: &str) -> Option<InferResult> {
    let stream = sh.js.get_stream_no_info(subjects::RESULTS_STREAM).await.ok()?;
    let m = stream.direct_get_last_for_subject(subjects::result(tenant, id)).await.ok()?;
    codec::decode(m.headers.get(headers::CONTENT_TYPE).map(|v| v.as_str()), &m.payload).ok()
}

async fn forward_chunks(
    client: async_nats::Client,
    reply: String,
    id: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let mut seq = 0;
    let mut h = HeaderMap::new();
    h.insert(headers::CONTENT_TYPE, codec::ContentType::MSGPACK_MIME);
    h.insert(headers::KIND, headers::KIND_CHUNK);
    let mut send = |delta: String, done: bool| {
        let chunk = StreamChunk { v: retro_fleet_schemas::SCHEMA_VERSION, id: id.clone(), seq, delta, done };
        seq += 1;
        let client = client.clone();
        let (reply, h) = (reply.clone(), h.clone());
        async move { client.publish_with_headers(reply, h, Bytes::from(codec::encode(&chunk))).await }
    };
    while let Some(delta) = rx.recv().await {
        if send(delta, false).await.is_err() {
            return;
        }
    }
    let _ = send(String::new(), true).await;
}
