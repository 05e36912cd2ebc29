//! Traces across the NATS hops: the spans of a request, made through the
//! OpenTelemetry API, their context carried in the W3C `traceparent` header
//! of every message (requests, stream chunks, replies, results; dead
//! letters keep the request's).
//!
//! The API is used directly rather than through `tracing` spans: a span's
//! parent comes from a message, not from the task that runs, and the queue
//! wait starts when the request was published, before this process saw it.
//! A role that exports installs a tracer provider at start (the root crate's
//! `telemetry::init_traces`); without one every span here is a no-op that
//! only carries its parent's context, so a caller's `traceparent` still
//! goes through.
//!
//! Within a span, [`in_span`] runs a future with it as the current context:
//! spans started by code the future calls are its children.

use std::borrow::Cow;
use std::future::Future;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::context::FutureExt;
use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
};
use opentelemetry::{Context, KeyValue};
use retro_fleet_schemas::headers;

/// Instrumentation scope of every span the fleet makes.
const SCOPE: &str = "retro-fleet";

/// The context whose parent span a `traceparent` names (empty when there is
/// none or it is not valid).
pub fn remote(traceparent: Option<&str>) -> Context {
    let Some((trace, span, flags)) = traceparent.and_then(headers::parse_traceparent) else {
        return Context::new();
    };
    let sc =
        SpanContext::new(TraceId::from(trace), SpanId::from(span), TraceFlags::new(flags), true, TraceState::default());
    Context::new().with_remote_span_context(sc)
}

/// The `traceparent` of `cx`'s span, when it has a valid one.
pub fn traceparent(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        let trace = u128::from_be_bytes(sc.trace_id().to_bytes());
        let span = u64::from_be_bytes(sc.span_id().to_bytes());
        headers::format_traceparent(trace, span, sc.trace_flags().to_u8())
    })
}

/// The `traceparent` of the current span, when there is a valid one.
pub fn current_traceparent() -> Option<String> {
    traceparent(&Context::current())
}

/// Attributes of a span, made only when the span is recorded (most are
/// not, at a low sampling ratio).
pub trait Attrs: FnOnce() -> Vec<KeyValue> {}
impl<F: FnOnce() -> Vec<KeyValue>> Attrs for F {}

/// No attributes.
pub fn none() -> Vec<KeyValue> {
    Vec::new()
}

/// Starts span `name` under `parent` (now, or at `start`), as the span of
/// the context returned. It ends when [`end`] is called or the last clone
/// of the context is dropped.
pub fn start(
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
    parent: &Context,
    start: Option<SystemTime>,
    attrs: impl Attrs,
) -> Context {
    let tracer = tracer();
    let mut builder = tracer.span_builder(name).with_kind(kind);
    if let Some(t) = start {
        builder = builder.with_start_time(t);
    }
    let mut span = builder.start_with_context(tracer, parent);
    if span.is_recording() {
        span.set_attributes(attrs());
    }
    parent.with_span(span)
}

/// The fleet's tracer, from the provider installed at start (a role
/// installs it before it serves anything).
fn tracer() -> &'static BoxedTracer {
    static TRACER: OnceLock<BoxedTracer> = OnceLock::new();
    TRACER.get_or_init(|| global::tracer(SCOPE))
}

/// Records span `name` under `parent` that began at `from` and ended at
/// `to` (unix ms): time spent before this process could make a span, such
/// as the wait in a queue.
pub fn record(name: &'static str, parent: &Context, from_ms: u64, to_ms: u64, attrs: impl Attrs) {
    let cx = start(name, SpanKind::Internal, parent, Some(at_ms(from_ms)), attrs);
    cx.span().end_with_timestamp(at_ms(to_ms.max(from_ms)));
}

/// Ends `cx`'s span now with `attrs`, as failed with `error` when given.
pub fn end(cx: &Context, attrs: impl Attrs, error: Option<&str>) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attributes(attrs());
    }
    if let Some(e) = error {
        span.set_status(Status::error(e.to_string()));
    }
    span.end();
}

/// Sets an attribute on the current span, when it is recorded.
pub fn set(attr: impl FnOnce() -> KeyValue) {
    Context::map_current(|cx| {
        let span = cx.span();
        if span.is_recording() {
            span.set_attribute(attr());
        }
    });
}

/// Adds event `name` at `at` to the current span.
pub fn event_at(name: &'static str, at: SystemTime) {
    Context::map_current(|cx| cx.span().add_event_with_timestamp(name, at, Vec::new()));
}

/// Runs `fut` inside span `name`, a child of the current span.
pub async fn in_span<F: Future>(name: &'static str, attrs: impl Attrs, fut: F) -> F::Output {
    let cx = start(name, SpanKind::Internal, &Context::current(), None, attrs);
    let out = fut.with_context(cx.clone()).await;
    cx.span().end();
    out
}

/// Runs `fut` with `cx` as the current context (spans it starts are children
/// of `cx`'s span), as a task spawned elsewhere would not be.
pub fn within<F: Future>(cx: Context, fut: F) -> impl Future<Output = F::Output> {
    fut.with_context(cx)
}

/// The current context, to hand to [`within`] in another task.
pub fn current() -> Context {
    Context::current()
}

/// The wall-clock instant of unix ms `ms`.
fn at_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_provider_a_span_carries_its_parents_context() {
        let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parent = remote(Some(caller));
        assert_eq!(traceparent(&parent).as_deref(), Some(caller));
        let child = start("handle", SpanKind::Consumer, &parent, None, none);
        assert_eq!(traceparent(&child).as_deref(), Some(caller), "no-op spans forward the caller's context");
        assert_eq!(traceparent(&remote(Some("junk"))), None);
        assert_eq!(traceparent(&remote(None)), None);
    }
}
