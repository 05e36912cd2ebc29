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
use futures::future::BoxFuture;
use retro_fleet_schemas::{
    codec, headers, subjects, CacheMode, CacheTier, ErrorCode, InferRequest, InferResult, Output, Priority, Status,
    StreamChunk, Timings,
};
use tokio::sync::OwnedSemaphorePermit;

use crate::backend::Backend;
use crate::cache::{self, Answer, Flight, Key, ResultCache};
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
    /// The result cache, when enabled.
    pub cache: Option<Arc<ResultCache>>,
    /// Cancel tokens of running requests.
    pub cancels: Arc<crate::cancel::Cancels>,
    /// Drained by an operator: take no new requests (see [`crate::control`]).
    pub quiet: tokio::sync::watch::Sender<bool>,
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
    let header_tenant = header(hdrs, headers::TENANT);
    let header_id = header(hdrs, headers::MSG_ID).and_then(|m| subjects::id_of_msg_id(m, header_tenant));

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
    if let Some(adapter) = &req.adapter {
        let known = backend.adapters();
        if !known.contains(adapter) {
            let message = match known.is_empty() {
                true => format!("model `{}` has no LoRA adapters; `{adapter}` cannot be applied", req.model),
                false => format!("model `{}` has no adapter `{adapter}`; adapters: {}", req.model, known.join(", ")),
            };
            return terminal(sh, prio, msg, model_label, ids, ErrorCode::InvalidRequest, &message, delivered).await;
        }
    }

    if delivered > 1 {
        // A previous delivery may have stored its result before the worker
        // died: answer with that one, never with a second computation.
        if let Some(stored) = Box::pin(stored_result(sh, tenant, &req.id)).await {
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

    if delivered > sh.max_deliver {
        // The server redelivers without limit so that no message can be
        // stranded; the limit is applied here, before any compute.
        let message = format!(
            "delivered {delivered} times without a result (max_deliver {}): workers died or stalled while running it",
            sh.max_deliver
        );
        return terminal(sh, prio, msg, model_label, ids, ErrorCode::Internal, &message, delivered).await;
    }

    let model_revision = backend.revision();
    let base = |status| InferResult {
        v: retro_fleet_schemas::SCHEMA_VERSION,
        id: req.id.clone(),
        model: req.model.clone(),
        model_revision: model_revision.clone(),
        adapter: req.adapter.clone(),
        status,
        output: None,
        usage: None,
        cache: CacheTier::None,
        cache_similarity: None,
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

    let cancel = sh.cancels.register(&format!("{tenant}.{}", req.id));
    if cancel.token.is_cancelled() {
        return cancelled(sh, msg, reply, tenant, base(Status::Error), "before it started").await;
    }
    let every = (sh.ack_wait / 2).max(Duration::from_millis(100));
    let revision = model_revision.clone().unwrap_or_default();
    let cu = cache_use(sh, &req, tenant, &revision, hdrs);
    if let Some(cu) = &cu {
        if cu.read {
            if let Some(hit) = Box::pin(lookup(cu, &req, now_ms)).await {
                let mut result = base(Status::Ok);
                result.cache = hit.tier;
                result.cache_similarity = hit.similarity;
                let key = (hit.tier != CacheTier::Semantic).then_some((cu.key, hit.answer.expires_ms));
                return answer_cached(sh, msg, &req, reply, tenant, result, hit.answer, key, picked).await;
            }
        }
    }
    // identical requests in flight share one computation
    let mut leader = None;
    let mut claimed = false;
    if let Some(cu) = &cu {
        loop {
            match cu.cache.join(cu.key) {
                Flight::Leader(l) => {
                    leader = Some(l);
                    break;
                }
                Flight::Follower(rx) => {
                    let waited = tokio::select! {
                        a = Box::pin(with_progress(msg, every, &req.id, cache::follow(rx))) => a,
                        _ = cancel.token.cancelled() => {
                            let why = "while it waited for an identical request";
                            return cancelled(sh, msg, reply, tenant, base(Status::Error), why).await;
                        }
                    };
                    if let Some(a) = waited {
                        cu.cache.count(&req.model, "coalesced");
                        let mut result = base(Status::Ok);
                        result.cache = CacheTier::Coalesced;
                        let key = Some((cu.key, a.expires_ms));
                        return answer_cached(sh, msg, &req, reply, tenant, result, (*a).clone(), key, picked).await;
                    }
                }
            }
        }
        if let (Some(claims), true) = (cu.cache.claims(), cu.read) {
            match Box::pin(claims.claim(cu.key)).await {
                cache::sync::Claim::Mine => claimed = true,
                cache::sync::Claim::Theirs => match tokio::select! {
                    a = Box::pin(with_progress(msg, every, &req.id, claims.wait(cu.key))) => a,
                    _ = cancel.token.cancelled() => {
                        let why = "while another worker computed it";
                        return cancelled(sh, msg, reply, tenant, base(Status::Error), why).await;
                    }
                } {
                    Some(a) => {
                        cu.cache.count_claim("answered");
                        cu.cache.count(&req.model, "coalesced");
                        cu.cache.put(&req.model, cu.key, &a, cu.semantic.as_ref().map(|(b, t)| (*b, t.as_str())));
                        if let Some(l) = leader.take() {
                            l.finish(Some(a.clone()));
                        }
                        let mut result = base(Status::Ok);
                        result.cache = CacheTier::Coalesced;
                        let key = Some((cu.key, a.expires_ms));
                        return answer_cached(sh, msg, &req, reply, tenant, result, a, key, picked).await;
                    }
                    None => cu.cache.count_claim("timeout"),
                },
            }
        }
    }

    let (deltas, forwarder) = match (req.stream, reply) {
        (true, Some(reply)) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let every = Duration::from_millis(sh.cfg.stream_interval_ms.min(crate::config::MAX_INTERVAL_MS));
            let task = tokio::spawn(forward_chunks(sh.client.clone(), reply.to_string(), req.id.clone(), every, rx));
            (Some(tx), Some(task))
        }
        _ => (None, None),
    };
    let started = Instant::now();
    let generated = tokio::select! {
        out = with_progress(msg, every, &req.id, backend.generate(&req, deltas)) => Some(out),
        // dropping the generation stops the backend's work
        _ = cancel.token.cancelled() => None,
    };
    let compute = started.elapsed();
    sh.metrics.compute.with_label_values(&[prio.as_str(), model_label]).observe(compute.as_secs_f64());
    if let Some(task) = forwarder {
        // every chunk is out before the final result (same connection, in order)
        let _ = task.await;
    }
    if claimed && !matches!(generated, Some(Ok(_))) {
        if let Some(cu) = &cu {
            if let Some(claims) = cu.cache.claims() {
                Box::pin(claims.release(cu.key)).await;
            }
        }
    }
    let Some(generated) = generated else {
        let mut result = base(Status::Error);
        result.timings.compute_ms = compute.as_secs_f64() * 1e3;
        return cancelled(sh, msg, reply, tenant, result, "while it ran").await;
    };
    match generated {
        Ok(g) => {
            let mut result = base(Status::Ok);
            let output = Output { text: g.text, finish_reason: g.finish_reason };
            let mut stored_under = None;
            if let Some(cu) = &cu {
                let answer =
                    Answer { output: output.clone(), usage: g.usage.clone(), expires_ms: unix_ms() + cu.ttl_ms };
                cu.cache.put(&req.model, cu.key, &answer, cu.semantic.as_ref().map(|(b, t)| (*b, t.as_str())));
                if claimed {
                    if let Some(claims) = cu.cache.claims() {
                        Box::pin(claims.answer(cu.key, &answer)).await;
                    }
                }
                stored_under = Some((cu.key, answer.expires_ms));
                if let Some(l) = leader.take() {
                    l.finish(Some(answer));
                }
            }
            result.output = Some(output);
            result.usage = Some(g.usage);
            result.timings.compute_ms = compute.as_secs_f64() * 1e3;
            result.timings.total_ms = queued_ms + picked.elapsed().as_secs_f64() * 1e3;
            publish_result_keyed(sh, reply, tenant, &result, stored_under).await?;
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

/// Answers a cancelled request `cancelled` (stored, replied) and acks it.
/// Boxed: a rare path (see [`terminal`]).
fn cancelled<'a>(
    sh: &'a Shared,
    msg: &'a jetstream::Message,
    reply: Option<&'a str>,
    tenant: &'a str,
    mut result: InferResult,
    when: &'a str,
) -> BoxFuture<'a, Result<Outcome, Error>> {
    Box::pin(async move {
        result.error = Some(retro_fleet_schemas::ErrorBody {
            code: ErrorCode::Cancelled,
            message: format!("cancelled by the caller {when}"),
            retryable: false,
        });
        publish_result(sh, reply, tenant, &result).await?;
        msg.ack().await?;
        Ok(Outcome::Failed(ErrorCode::Cancelled))
    })
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
///
/// Boxed, like the other paths a request rarely takes: the future of
/// [`handle`] is allocated and moved for every message, so its size is
/// kept to what the common path needs.
#[allow(clippy::too_many_arguments)]
fn terminal<'a>(
    sh: &'a Shared,
    prio: Priority,
    msg: &'a jetstream::Message,
    model_label: &'a str,
    ids: Ids<'a>,
    code: ErrorCode,
    message: &'a str,
    delivered: i64,
) -> BoxFuture<'a, Result<Outcome, Error>> {
    Box::pin(async move {
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
    })
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

/// Stores the result in `FLEET_RESULTS`, then sends the stored result to
/// the reply subject. The first writer wins: the write expects no earlier
/// result for the id, so when two deliveries of
/// one request both computed (a worker stalled past `ack_wait`, or died after
/// storing), the later one re-sends the result already stored instead of its
/// own. A caller never sees two different answers, nor one that is not stored.
pub async fn publish_result(sh: &Shared, reply: Option<&str>, tenant: &str, result: &InferResult) -> Result<(), Error> {
    publish_result_keyed(sh, reply, tenant, result, None).await
}

/// [`publish_result`], recording the cache key and expiry of a cacheable
/// answer in headers so that replays of `FLEET_RESULTS` can warm caches.
async fn publish_result_keyed(
    sh: &Shared,
    reply: Option<&str>,
    tenant: &str,
    result: &InferResult,
    cached: Option<(Key, u64)>,
) -> Result<(), Error> {
    let payload = Bytes::from(codec::encode(result));
    // No `Nats-Msg-Id` on the write: the expected sequence alone decides, so
    // a result removed on purpose (`dlq replay`) can be written again within
    // the duplicate window.
    let mut first_only = reply_headers();
    first_only.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
    let mut h = reply_headers();
    h.insert(headers::MSG_ID, result.id.as_str());
    if let Some((key, expires_ms)) = cached {
        first_only.insert(headers::CACHE_KEY, key.hex().as_str());
        first_only.insert(headers::CACHE_EXPIRES, expires_ms.to_string().as_str());
    }
    let subject = subjects::result(tenant, &result.id);
    let first = match sh.js.publish_with_headers(subject, first_only, payload.clone()).await?.await {
        Ok(ack) => !ack.duplicate,
        Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => false,
        Err(e) => return Err(e.into()),
    };
    let payload = if first {
        if let Some((key, expires_ms)) = cached {
            // the caller may keep this answer until then (the ingress's
            // cache), under this key (which says the generation it used)
            h.insert(headers::CACHE_KEY, key.hex().as_str());
            h.insert(headers::CACHE_EXPIRES, expires_ms.to_string().as_str());
        }
        payload
    } else {
        let stored = Box::pin(stored_payload(sh, tenant, &result.id))
            .await
            .ok_or("a result is stored for this id but cannot be read")?;
        tracing::info!(id = %result.id, "a result for this request was already stored; sending that one");
        stored
    };
    if let Some(reply) = reply {
        sh.client.publish_with_headers(reply.to_string(), h, payload).await?;
    }
    Ok(())
}

/// The stored result's bytes for `id`, if any.
async fn stored_payload(sh: &Shared, tenant: &str, id: &str) -> Option<Bytes> {
    let stream = sh.js.get_stream_no_info(subjects::RESULTS_STREAM).await.ok()?;
    Some(stream.direct_get_last_for_subject(subjects::result(tenant, id)).await.ok()?.payload)
}

/// The result stored for `id`, if any.
async fn stored_result(sh: &Shared, tenant: &str, id: &str) -> Option<InferResult> {
    let stream = sh.js.get_stream_no_info(subjects::RESULTS_STREAM).await.ok()?;
    let m = stream.direct_get_last_for_subject(subjects::result(tenant, id)).await.ok()?;
    codec::decode(m.headers.get(headers::CONTENT_TYPE).map(|v| v.as_str()), &m.payload).ok()
}

/// Publishes streamed text to `reply` as chunks: the first piece at once,
/// then at most one chunk per `every` holding what was generated meanwhile
/// (a message per token would cost about as much CPU as a small model's
/// token), then the `done` chunk.
async fn forward_chunks(
    client: async_nats::Client,
    reply: String,
    id: String,
    every: Duration,
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
    let mut last: Option<tokio::time::Instant> = None;
    while let Some(mut delta) = rx.recv().await {
        if let Some(at) = last.filter(|_| !every.is_zero()) {
            tokio::time::sleep_until(at + every).await;
            while let Ok(more) = rx.try_recv() {
                delta.push_str(&more);
            }
        }
        if send(delta, false).await.is_err() {
            return;
        }
        last = Some(tokio::time::Instant::now());
    }
    let _ = send(String::new(), true).await;
}

/// Runs `fut`, re-arming the message's ack timer every `every` while it runs,
/// so a request still being worked on is never redelivered to another worker.
async fn with_progress<F: std::future::Future>(
    msg: &jetstream::Message,
    every: Duration,
    id: &str,
    fut: F,
) -> F::Output {
    tokio::pin!(fut);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = ticks.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!(id, error = %e, "in-progress ack failed");
                }
            }
        }
    }
}

/// How the cache takes part in one request.
struct CacheUse {
    cache: Arc<ResultCache>,
    key: Key,
    /// Semantic bucket and compared text, when the model takes part in the semantic cache.
    semantic: Option<(u128, String)>,
    /// Whether a stored answer may be served (`use`, `semantic`), or only replaced (`refresh`).
    read: bool,
    ttl_ms: u64,
}

/// The cache's part in `req`; `None` when the cache is off, bypassed, or
/// the request is not reproducible (each counted).
fn cache_use(
    sh: &Shared,
    req: &InferRequest,
    tenant: &str,
    revision: &str,
    hdrs: Option<&HeaderMap>,
) -> Option<CacheUse> {
    let cache = sh.cache.as_ref()?;
    if req.cache == CacheMode::Bypass {
        cache.count(&req.model, "bypass");
        return None;
    }
    if cache.config().deterministic_only && !cache::key::deterministic(&req.params) {
        cache.count(&req.model, "uncacheable");
        return None;
    }
    let generation = cache.generation(&req.model);
    let scope =
        cache::Scope { tenant, model: &req.model, revision, generation: &generation, adapter: req.adapter.as_deref() };
    let ttl_secs =
        header(hdrs, headers::CACHE_TTL).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(cache.config().ttl_secs);
    Some(CacheUse {
        cache: cache.clone(),
        key: cache::key::exact(&scope, &req.params, &req.input),
        semantic: cache
            .semantic_enabled(&req.model)
            .then(|| cache::key::semantic(&scope, &req.params, &req.input))
            .flatten(),
        read: req.cache != CacheMode::Refresh,
        ttl_ms: ttl_secs.saturating_mul(1000),
    })
}

/// Looks `req` up: exact first, then (mode `semantic`) the nearest similar prompt.
async fn lookup(cu: &CacheUse, req: &InferRequest, now_ms: u64) -> Option<cache::Hit> {
    let mut hit = cu.cache.get(cu.key, now_ms).await;
    if hit.is_none() && req.cache == CacheMode::Semantic {
        if let Some((bucket, text)) = &cu.semantic {
            hit = cu.cache.get_similar(*bucket, text, now_ms).await;
        }
    }
    let label = match hit.as_ref().map(|h| h.tier) {
        Some(CacheTier::Memory) => "memory",
        Some(CacheTier::Disk) => "disk",
        Some(CacheTier::Semantic) => "semantic",
        _ => "miss",
    };
    cu.cache.count(&req.model, label);
    hit
}

/// Answers from the cache (or a shared computation): chunks first for a
/// streaming request, then the stored result, then the ack. Boxed (see
/// [`terminal`]).
#[allow(clippy::too_many_arguments)]
fn answer_cached<'a>(
    sh: &'a Shared,
    msg: &'a jetstream::Message,
    req: &'a InferRequest,
    reply: Option<&'a str>,
    tenant: &'a str,
    mut result: InferResult,
    answer: Answer,
    key: Option<(Key, u64)>,
    picked: Instant,
) -> BoxFuture<'a, Result<Outcome, Error>> {
    Box::pin(async move {
        if let (true, Some(reply)) = (req.stream, reply) {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let _ = tx.send(answer.output.text.clone());
            drop(tx);
            // one piece: sent at once whatever the interval
            forward_chunks(sh.client.clone(), reply.to_string(), req.id.clone(), Duration::ZERO, rx).await;
        }
        result.output = Some(answer.output);
        result.usage = Some(answer.usage);
        result.timings.total_ms = result.timings.queued_ms + picked.elapsed().as_secs_f64() * 1e3;
        publish_result_keyed(sh, reply, tenant, &result, key).await?;
        msg.ack().await?;
        Ok(Outcome::Ok)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn pieces_generated_within_the_interval_travel_in_one_chunk() {
        let nats = retro_fleet_testkit::NatsServer::start();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let mut sub = client.subscribe("reply.chunks").await.unwrap();
        client.flush().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for piece in ["a", "b", "c"] {
            tx.send(piece.to_string()).unwrap();
        }
        drop(tx);
        forward_chunks(client.clone(), "reply.chunks".into(), "r1".into(), Duration::from_millis(50), rx).await;
        client.flush().await.unwrap();
        let mut chunks = Vec::new();
        while chunks.last().is_none_or(|c: &StreamChunk| !c.done) {
            let m = tokio::time::timeout(Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
            chunks.push(codec::decode(Some(codec::ContentType::MSGPACK_MIME), &m.payload).unwrap());
        }
        let got: Vec<(u64, &str, bool)> = chunks.iter().map(|c| (c.seq, c.delta.as_str(), c.done)).collect();
        // the first piece at once, the rest together, then `done`
        assert_eq!(got, vec![(0, "a", false), (1, "bc", false), (2, "", true)]);
    }
}
