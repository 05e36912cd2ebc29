//! Publishing a prepared request to its priority stream, and what a refusal
//! by JetStream means for the caller.

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::ErrorCode as JsCode;
use std::time::Instant;

use async_nats::HeaderMap;
use axum::body::Bytes;
use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;
use retro_fleet_schemas::{codec, subjects, Envelope, ErrorCode, Priority};
use retro_fleet_worker::{failover, trace};

use super::validate::Prepared;
use crate::ingress::error::ApiError;
use crate::ingress::state::AppState;

/// What JetStream did with a published request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Stored: a new request.
    New,
    /// Dropped: its id was sent before, within the duplicate window; the
    /// first request is (or was) at `seq` in the same stream.
    Duplicate { seq: u64 },
}

/// Publishes to the priority stream and waits for JetStream to store it.
/// A full queue is 503 with `Retry-After`.
///
/// A publish that gets no answer (the stream's leader is being elected
/// after a node was lost, or the connection is moving to another server)
/// is sent again with the same `Nats-Msg-Id`, so JetStream keeps it once,
/// while the request's deadline and `failover::RIDE_FOR` allow.
pub async fn send(state: &AppState, p: &Prepared, reply: Option<&str>) -> Result<Sent, ApiError> {
    let subject = subjects::tenant_request(p.priority, &p.req.model, &p.tenant);
    let payload = Bytes::from(codec::encode(&p.req));
    // the request carries the publish span's context: the worker's spans
    // are its children
    let attrs = || {
        vec![
            KeyValue::new("messaging.system", "nats"),
            KeyValue::new("messaging.destination.name", subject.clone()),
            KeyValue::new("fleet.request_id", p.req.id.clone()),
        ]
    };
    let span = trace::start("publish", SpanKind::Producer, &trace::remote(Some(&p.traceparent)), None, attrs);
    let traceparent = trace::traceparent(&span).unwrap_or_else(|| p.traceparent.clone());
    let headers = request_headers(p, reply, state.cfg.sync_result_ttl_secs, &traceparent);
    let publish = || async {
        match state.js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()).await {
            Ok(f) => f.await,
            Err(e) => Err(e),
        }
    };
    let ack = failover::ride(Instant::now() + p.timeout, failover::unanswered, publish, || async {}).await;
    trace::end(&span, trace::none, ack.as_ref().err().map(|_| "publish refused"));
    match ack {
        Ok(ack) => {
            state.metrics.published.with_label_values(&[p.priority.as_str()]).inc();
            Ok(if ack.duplicate { Sent::Duplicate { seq: ack.sequence } } else { Sent::New })
        }
        Err(e) => {
            let (code, message) = refusal(&e, p.priority);
            tracing::warn!(id = %p.req.id, error = %e, "publish refused");
            Err(ApiError::new(code, message).with_id(&p.req.id).retry_after(state.cfg.retry_after_secs))
        }
    }
}

/// The headers of a published request: a synchronous call (one with a
/// `reply` subject) has its result kept `sync_ttl` seconds unless the
/// caller asked otherwise; an asynchronous one as long as results are kept.
fn request_headers(p: &Prepared, reply: Option<&str>, sync_ttl: u64, traceparent: &str) -> HeaderMap {
    let deadline = retro_fleet_worker::unix_ms() + p.timeout.as_millis() as u64;
    let keep = match reply {
        Some(_) => p.result_ttl.or((sync_ttl > 0).then_some(sync_ttl)),
        None => p.result_ttl,
    };
    let mut envelope = Envelope::new(p.req.id.as_str())
        .tenant(p.tenant.as_str())
        .caller(p.who.id.as_str())
        .traceparent(traceparent)
        .deadline_ms(deadline)
        .cache_ttl_secs(p.cache_ttl)
        .result_ttl_secs(keep)
        .callback_url(p.callback_url.clone());
    envelope.reply = reply.map(str::to_string);
    envelope.headers()
}

/// JetStream API error codes under which the server refuses to store a
/// request because a limit is reached: the queue is full, for now.
const FULL: [JsCode; 6] = [
    // a discard-new limit of the stream: "maximum messages exceeded",
    // "maximum bytes exceeded", "maximum messages per subject exceeded"
    JsCode::STREAM_STORE_FAILED,
    // the server or account is out of storage or memory
    JsCode::INSUFFICIENT_RESOURCES,
    JsCode::STORAGE_RESOURCES_EXCEEDED,
    JsCode::MEMORY_RESOURCES_EXCEEDED,
    // over the stream's `max_msg_size` (or headers over 64 KiB): answered
    // as a full queue since publish refusals were first told apart; the
    // ingress's own `max_prompt_bytes` keeps requests well below it
    JsCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM,
    JsCode::STREAM_HEADER_EXCEEDS_MAXIMUM,
];

/// The API error code of a JetStream error behind a refused publish.
fn api_code(e: &PublishError) -> Option<JsCode> {
    let source = std::error::Error::source(e)?;
    source.downcast_ref::<async_nats::jetstream::Error>().map(async_nats::jetstream::Error::error_code)
}

/// What a refused publish means for the caller: a missing topology, an
/// unconfirmed publish or a full queue are `overloaded` (retry later);
/// anything else is `internal`.
fn refusal(e: &PublishError, priority: Priority) -> (ErrorCode, String) {
    match e.kind() {
        PublishErrorKind::StreamNotFound => {
            (ErrorCode::Overloaded, "request streams are missing; run `retro-fleet topology apply`".to_string())
        }
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            (ErrorCode::Overloaded, format!("NATS did not confirm the request ({e}); retry"))
        }
        _ if api_code(e).is_some_and(|c| FULL.contains(&c)) => {
            (ErrorCode::Overloaded, format!("the {priority} queue is full; retry later"))
        }
        _ => (ErrorCode::Internal, format!("publishing the request failed: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A publish refused by the server with `err_code`, as async-nats reports it.
    fn refused(err_code: u64, description: &str) -> PublishError {
        let api: async_nats::jetstream::Error =
            serde_json::from_value(serde_json::json!({"code": 503, "err_code": err_code, "description": description}))
                .unwrap();
        PublishError::with_source(PublishErrorKind::Other, api)
    }

    #[test]
    fn a_full_queue_is_told_by_its_api_error_code() {
        let (code, message) = refusal(&refused(10077, "maximum messages exceeded"), Priority::Low);
        assert_eq!((code, message.as_str()), (ErrorCode::Overloaded, "the low queue is full; retry later"));
        for c in [10023, 10047, 10028, 10054, 10097] {
            assert_eq!(refusal(&refused(c, "x"), Priority::High).0, ErrorCode::Overloaded, "err_code {c}");
        }
        // the words of a description decide nothing
        let (code, message) = refusal(&refused(10999, "maximum resources"), Priority::High);
        assert_eq!(code, ErrorCode::Internal);
        assert!(message.starts_with("publishing the request failed: "), "{message}");
        assert_eq!(refusal(&PublishError::new(PublishErrorKind::Other), Priority::High).0, ErrorCode::Internal);
    }

    #[test]
    fn missing_streams_and_unconfirmed_publishes_are_overloaded() {
        let (code, message) = refusal(&PublishError::new(PublishErrorKind::StreamNotFound), Priority::Normal);
        assert_eq!(code, ErrorCode::Overloaded);
        assert!(message.contains("topology apply"));
        let (code, message) = refusal(&PublishError::new(PublishErrorKind::TimedOut), Priority::Normal);
        assert_eq!(code, ErrorCode::Overloaded);
        assert!(message.starts_with("NATS did not confirm the request (timed out"), "{message}");
    }
}
