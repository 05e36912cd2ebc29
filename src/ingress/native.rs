//! The native API: requests in the wire format's shape, as JSON.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::HeaderMap;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap as HttpHeaders, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use retro_fleet_schemas::{
    codec, headers, subjects, CacheMode, ChatMessage, ErrorCode, InferRequest, InferResult, Input, Priority,
    SamplingParams, Status,
};
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::error::{field_of, parse_json, ApiError, ApiPath, REQUEST_ID};
use super::ratelimit::{self, RouteClass, Unit};
use super::replies::{Cacheable, Reply, Waiter};
use super::AppState;

/// Body of `POST /v1/infer` and `/v1/infer/async`. Give the prompt as
/// `input`, or as the shorthands `prompt` (completion) or `messages` (chat).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NativeRequest {
    /// Model name.
    pub model: String,
    /// The prompt in wire form.
    #[serde(default)]
    pub input: Option<Input>,
    /// Shorthand for a completion input.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Shorthand for a chat input.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Adapter to apply.
    #[serde(default)]
    pub adapter: Option<String>,
    /// Sampling parameters.
    #[serde(default)]
    pub params: SamplingParams,
    /// `high`, `normal` (default) or `low`; the `X-Priority` header also sets it.
    #[serde(default)]
    pub priority: Option<Priority>,
    /// Stream Server-Sent Events (`/v1/infer` only).
    #[serde(default)]
    pub stream: bool,
    /// Cache policy.
    #[serde(default)]
    pub cache: CacheMode,
    /// Caller metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Your own request id (1-128 of `[A-Za-z0-9_-]`); a ULID is made otherwise.
    #[serde(default)]
    pub id: Option<String>,
    /// Wait at most this long (ms), capped by the ingress timeout; also the deadline.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Answer of `POST /v1/infer/async`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Accepted {
    /// Request id.
    pub id: String,
    /// Where the result will be.
    pub result_url: String,
}

/// A request as an API handler understood it, before ids and limits.
#[derive(Debug)]
pub struct Draft {
    /// Model name.
    pub model: String,
    /// Adapter.
    pub adapter: Option<String>,
    /// The prompt.
    pub input: Input,
    /// Sampling parameters.
    pub params: SamplingParams,
    /// Stream chunks.
    pub stream: bool,
    /// Cache policy.
    pub cache: CacheMode,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// Caller's id.
    pub id: Option<String>,
    /// Caller's timeout.
    pub timeout_ms: Option<u64>,
    /// Priority from the body (the `X-Priority` header wins).
    pub priority: Option<Priority>,
}

/// A request ready to publish.
pub struct Prepared {
    /// The wire request.
    pub req: InferRequest,
    /// Its class.
    pub priority: Priority,
    /// Tenant (from the credential).
    pub tenant: String,
    /// How long to wait (also the deadline).
    pub timeout: Duration,
    /// Seconds a cached answer stays valid (`X-Cache-Ttl`), when the caller sets it.
    pub cache_ttl: Option<u64>,
    /// W3C trace context: the caller's `traceparent`, or a new one.
    pub traceparent: String,
    /// The caller (for token limits).
    pub who: Principal,
    /// The caller chose the request id (body or `X-Request-Id`).
    pub caller_id: bool,
}

/// `X-Cache: use|bypass|refresh|semantic` (wins over the body) and `X-Cache-Ttl: SECONDS`.
fn cache_headers(h: &HttpHeaders, body: CacheMode) -> Result<(CacheMode, Option<u64>), ApiError> {
    let mode = match h.get("x-cache").and_then(|v| v.to_str().ok()) {
        Some(v) => serde_json::from_value(serde_json::Value::String(v.trim().to_ascii_lowercase())).map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!("X-Cache `{v}`: use one of use, bypass, refresh, semantic"),
            )
        })?,
        None => body,
    };
    let ttl = match h.get("x-cache-ttl").and_then(|v| v.to_str().ok()) {
        Some(v) => Some(v.trim().parse::<u64>().map_err(|_| {
            ApiError::new(ErrorCode::InvalidRequest, format!("X-Cache-Ttl `{v}` must be whole seconds"))
        })?),
        None => None,
    };
    Ok((mode, ttl))
}

/// Sets `X-Request-Id` to the id the fleet used for this request.
pub fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = axum::http::HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

fn prepare(
    state: &AppState,
    h: &HttpHeaders,
    who: &Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<Prepared, ApiError> {
    let body = body.map_err(ApiError::from_body_rejection)?;
    let n: NativeRequest = parse_json(&body)?;
    let input = match (n.input, n.prompt, n.messages) {
        (Some(i), None, None) => i,
        (None, Some(prompt), None) => Input::Completion { prompt },
        (None, None, Some(messages)) => Input::Chat { messages },
        _ => {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "give exactly one of `input`, `prompt` or `messages`"))
        }
    };
    let draft = Draft {
        model: n.model,
        adapter: n.adapter,
        input,
        params: n.params,
        stream: n.stream,
        cache: n.cache,
        metadata: n.metadata,
        id: n.id,
        timeout_ms: n.timeout_ms,
        priority: n.priority,
    };
    draft_into_prepared(state, h, who, draft)
}

/// Assigns id, priority and tenant (the caller's), and checks limits and the model.
pub fn draft_into_prepared(state: &AppState, h: &HttpHeaders, who: &Principal, d: Draft) -> Result<Prepared, ApiError> {
    let priority = match h.get("x-priority").and_then(|v| v.to_str().ok()) {
        Some(p) => {
            p.parse().map_err(|e: String| ApiError::new(ErrorCode::InvalidRequest, e).param("headers.x-priority"))?
        }
        None => d.priority.unwrap_or_default(),
    };
    let tenant = who.tenant.clone();
    let caller_id = d.id.is_some() || !h.contains_key(super::guard::ID_MADE_HERE);
    let id =
        d.id.or_else(|| h.get(REQUEST_ID).and_then(|v| v.to_str().ok()).map(str::to_string))
            .unwrap_or_else(|| ulid::Ulid::new().to_string());
    let (cache, cache_ttl) = cache_headers(h, d.cache)?;
    let req = InferRequest {
        v: retro_fleet_schemas::SCHEMA_VERSION,
        id,
        model: d.model,
        adapter: d.adapter,
        input: d.input,
        params: d.params,
        stream: d.stream,
        cache,
        tenant: Some(tenant.clone()),
        metadata: d.metadata,
    };
    req.validate(state.cfg.max_prompt_bytes).map_err(|e| {
        let param = match e.code {
            ErrorCode::PromptTooLarge => Some("input"),
            _ => field_of(&e.message),
        };
        let err = ApiError::new(e.code, e.message.clone()).with_id(&req.id);
        match param {
            Some(p) => err.param(p),
            None => err,
        }
    })?;
    if !state.models.contains(&req.model) {
        let known: Vec<&str> = state.models.iter().map(String::as_str).collect();
        return Err(ApiError::new(
            ErrorCode::UnknownModel,
            format!("model `{}` is not served here; models: {}", req.model, known.join(", ")),
        )
        .param("model"));
    }
    let cap = Duration::from_millis(state.cfg.request_timeout_ms);
    let timeout = d.timeout_ms.map(Duration::from_millis).map_or(cap, |t| t.min(cap));
    let traceparent = h
        .get(headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .filter(|t| headers::is_traceparent(t))
        .map(str::to_string)
        .unwrap_or_else(|| headers::new_traceparent(ulid::Ulid::new().0, ulid::Ulid::new().0 as u64));
    Ok(Prepared { req, priority, tenant, timeout, cache_ttl, traceparent, who: who.clone(), caller_id })
}

/// Tokens a request may use, as token limits count them: prompt bytes / 4
/// (a common rule of thumb for English text) plus `max_tokens`.
pub fn estimated_tokens(req: &InferRequest, default_max_tokens: u64) -> u64 {
    (req.input.text_len() as u64).div_ceil(4) + req.params.max_tokens.map_or(default_max_tokens, u64::from)
}

/// Takes the request's estimated tokens from the caller's token limit.
async fn charge_tokens(state: &AppState, p: &Prepared) -> Result<(), ApiError> {
    if !state.limits.enabled() {
        return Ok(());
    }
    let cost = estimated_tokens(&p.req, state.limits.default_max_tokens());
    match state.limits.check(&p.who, RouteClass::Submit, Unit::Tokens, cost).await {
        Some(d) if !d.allowed => {
            state.metrics.denied.with_label_values(&[RouteClass::Submit.as_str(), "token_limited"]).inc();
            Err(ratelimit::refusal(&d, Unit::Tokens).with_id(&p.req.id))
        }
        _ => Ok(()),
    }
}

/// Charges the caller's token limit, then [`send`]s.
async fn publish(state: &AppState, p: &Prepared, reply: Option<&str>) -> Result<bool, ApiError> {
    charge_tokens(state, p).await?;
    send(state, p, reply).await
}

/// Publishes to the priority stream and waits for JetStream to store it.
/// A full queue is 503 with `Retry-After`. Returns whether JetStream
/// dropped it as a duplicate: its request id was sent before, within the
/// duplicate window.
pub async fn send(state: &AppState, p: &Prepared, reply: Option<&str>) -> Result<bool, ApiError> {
    let id = &p.req.id;
    let mut h = HeaderMap::new();
    // Request ids are per tenant (results live at fleet.res.<tenant>.<id>),
    // so is the duplicate window: another tenant choosing the same id must
    // not have its request dropped as a duplicate of this one.
    if p.tenant == subjects::DEFAULT_TENANT {
        h.insert(headers::MSG_ID, id.as_str());
    } else {
        h.insert(headers::MSG_ID, format!("{}.{id}", p.tenant).as_str());
    }
    h.insert(headers::CONTENT_TYPE, codec::ContentType::MSGPACK_MIME);
    h.insert(headers::TENANT, p.tenant.as_str());
    h.insert(headers::TRACEPARENT, p.traceparent.as_str());
    let deadline = retro_fleet_worker::unix_ms() + p.timeout.as_millis() as u64;
    h.insert(headers::DEADLINE, deadline.to_string().as_str());
    if let Some(reply) = reply {
        h.insert(headers::REPLY, reply);
    }
    if let Some(ttl) = p.cache_ttl {
        h.insert(headers::CACHE_TTL, ttl.to_string().as_str());
    }
    let subject = subjects::request(p.priority, &p.req.model);
    let payload = Bytes::from(codec::encode(&p.req));
    let retry = state.cfg.retry_after_secs;
    let ack = state.js.publish_with_headers(subject, h, payload).await;
    let ack = match ack {
        Ok(f) => f.await,
        Err(e) => Err(e),
    };
    match ack {
        Ok(ack) => {
            state.metrics.published.with_label_values(&[p.priority.as_str()]).inc();
            Ok(ack.duplicate)
        }
        Err(e) => {
            let text = e.to_string();
            let (code, message) = match e.kind() {
                PublishErrorKind::StreamNotFound => {
                    (ErrorCode::Overloaded, "request streams are missing; run `retro-fleet topology apply`".to_string())
                }
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    (ErrorCode::Overloaded, format!("NATS did not confirm the request ({text}); retry"))
                }
                _ if text.contains("maximum") || text.contains("resources") => {
                    (ErrorCode::Overloaded, format!("the {} queue is full; retry later", p.priority))
                }
                _ => (ErrorCode::Internal, format!("publishing the request failed: {text}")),
            };
            tracing::warn!(id = %id, error = %text, "publish refused");
            Err(ApiError::new(code, message).with_id(id).retry_after(retry))
        }
    }
}

fn result_response(result: InferResult) -> Response {
    match (&result.status, &result.error) {
        (Status::Ok, _) | (_, None) => (StatusCode::OK, Json(result)).into_response(),
        (Status::Error, Some(e)) => ApiError::from(e.clone()).with_id(&result.id).into_response(),
    }
}

/// Answers `p` from the ingress's cache, or publishes it and waits for its
/// result (kept for the next identical call when the worker allows); a
/// timeout is 504 with the id.
pub async fn call(state: &AppState, p: &Prepared) -> Result<InferResult, ApiError> {
    let started = Instant::now();
    // an answer from memory costs the caller's token limit like any other
    charge_tokens(state, p).await?;
    if state.answers.serves(p) {
        if let Some(result) = state.answers.get(p, retro_fleet_worker::unix_ms()) {
            observe(state, p, "ok", started);
            return Ok(result);
        }
    }
    let waiter = register_and_send(state, p).await?;
    let (result, cacheable) = wait_result(state, p, waiter, started).await?;
    if let Some(c) = cacheable {
        state.answers.put(p, &result, c, retro_fleet_worker::unix_ms());
    }
    Ok(result)
}

fn observe(state: &AppState, p: &Prepared, outcome: &str, started: Instant) {
    state
        .metrics
        .e2e
        .with_label_values(&[p.priority.as_str(), &p.req.model, outcome])
        .observe(started.elapsed().as_secs_f64());
}

async fn wait_result(
    state: &AppState,
    p: &Prepared,
    mut waiter: Waiter,
    started: Instant,
) -> Result<(InferResult, Option<Cacheable>), ApiError> {
    let id = &p.req.id;
    let outcome = tokio::time::timeout(p.timeout, waiter.result_and_cacheable()).await;
    let (label, result) = match outcome {
        Ok(Some(r)) => (r.0.error.as_ref().map_or("ok", |e| e.code.as_str()), Ok(r)),
        _ => (
            "timeout",
            Err(ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "no result within {} ms, so the request was cancelled; its final result (`cancelled`, or the \
                     answer if it finished first) is at /v1/results/{id}",
                    p.timeout.as_millis()
                ),
            )
            .with_id(id)),
        ),
    };
    observe(state, p, label, started);
    result
}

/// Charges the caller's token limit, publishes `p` and returns the waiter
/// of its chunks and result.
pub async fn open_stream(state: &AppState, p: &Prepared) -> Result<Waiter, ApiError> {
    charge_tokens(state, p).await?;
    register_and_send(state, p).await
}

/// [`open_stream`] of a request already charged.
async fn register_and_send(state: &AppState, p: &Prepared) -> Result<Waiter, ApiError> {
    let (reply, mut waiter) = state.replies.register(&p.tenant, &p.req.id);
    match send(state, p, Some(&reply)).await {
        Ok(false) => {}
        Ok(true) => follow_duplicate(state, p, &mut waiter),
        Err(e) => {
            waiter.disarm();
            return Err(e);
        }
    }
    Ok(waiter)
}

/// A request id sent again within the duplicate window: JetStream kept the
/// first request and dropped this one, so this caller gets the first one's
/// result. It is read back from `FLEET_RESULTS` as soon as it is stored (at
/// once if it already is), wherever the first call came from; a first call
/// waiting in this process also shares its reply. This caller leaving does
/// not cancel the first one's request.
fn follow_duplicate(state: &AppState, p: &Prepared, waiter: &mut Waiter) {
    waiter.disarm();
    let feed = waiter.feeder();
    let (js, subject) = (state.js.clone(), subjects::result(&p.tenant, &p.req.id));
    let until = tokio::time::Instant::now() + p.timeout;
    tracing::debug!(id = %p.req.id, "duplicate request id: following the first request's result");
    tokio::spawn(async move {
        let Ok(stream) = js.get_stream_no_info(subjects::RESULTS_STREAM).await else { return };
        let mut every = Duration::from_millis(10);
        while !feed.is_closed() && tokio::time::Instant::now() < until {
            if let Ok(msg) = stream.direct_get_last_for_subject(subject.as_str()).await {
                let ct = msg.headers.get(headers::CONTENT_TYPE).map(|v| v.as_str());
                if let Ok(r) = codec::decode::<InferResult>(ct, &msg.payload) {
                    let _ = feed.send(Reply::Result(Box::new(r), None));
                    return;
                }
            }
            tokio::time::sleep(every).await;
            every = (every * 2).min(Duration::from_millis(500));
        }
    });
}

/// `POST /v1/infer`: waits for the result (or streams it as SSE with `stream: true`).
pub async fn infer(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    h: HttpHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let p = match prepare(&state, &h, &who, body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let resp = if p.req.stream {
        match open_stream(&state, &p).await {
            Ok(waiter) => sse(waiter, p.timeout).into_response(),
            Err(e) => e.into_response(),
        }
    } else {
        match call(&state, &p).await {
            Ok(result) => result_response(result),
            Err(e) => e.into_response(),
        }
    };
    with_request_id(resp, &p.req.id)
}

/// Chunks as `event: chunk`, then the result as `event: result` (or `event: error`).
fn sse(mut waiter: Waiter, timeout: Duration) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = task_stream(move |tx| async move {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, waiter.next()).await {
                Ok(Some(Reply::Chunk(c))) => {
                    if tx.send(Event::default().event("chunk").json_data(&c).expect("chunk is JSON")).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Reply::Result(r, _))) => {
                    let kind = if r.status == Status::Ok { "result" } else { "error" };
                    let _ = tx.send(Event::default().event(kind).json_data(&r).expect("result is JSON")).await;
                    return;
                }
                _ => {
                    let body = serde_json::json!({"error": {"code": "timeout", "message": "no result in time", "retryable": true}});
                    let _ = tx.send(Event::default().event("error").data(body.to_string())).await;
                    return;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default())
}

/// A stream fed by a task (keeps the SSE code free of hand-written state machines).
pub fn task_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // When the client goes away the response stream is dropped, and with it
    // the task: its reply waiter then cancels the request.
    let task = AbortOnDrop(tokio::spawn(f(tx)).abort_handle());
    futures::stream::unfold((rx, task), |(mut rx, task)| async move { rx.recv().await.map(|e| (Ok(e), (rx, task))) })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `POST /v1/infer/async`: 202 with the id; the result goes to `FLEET_RESULTS`.
pub async fn infer_async(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    h: HttpHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let p = match prepare(&state, &h, &who, body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if p.req.stream {
        return ApiError::new(ErrorCode::InvalidRequest, "`stream` needs a synchronous call: use POST /v1/infer")
            .into_response();
    }
    if let Err(e) = publish(&state, &p, None).await {
        return e.into_response();
    }
    let id = p.req.id.clone();
    let body = Accepted { result_url: format!("/v1/results/{id}"), id: id.clone() };
    with_request_id((StatusCode::ACCEPTED, Json(body)).into_response(), &id)
}

/// `GET /v1/results/{id}`: the stored result, looked up under the caller's
/// tenant only, so another tenant's id is as unknown as a made-up one (404).
pub async fn get_result(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Response {
    let tenant = who.tenant;
    if !subjects::is_token(&id) {
        return ApiError::new(ErrorCode::NotFound, "no such result").into_response();
    }
    let stream = match state.js.get_stream_no_info(subjects::RESULTS_STREAM).await {
        Ok(s) => s,
        Err(e) => return ApiError::new(ErrorCode::Internal, format!("results stream: {e}")).into_response(),
    };
    match stream.direct_get_last_for_subject(subjects::result(&tenant, &id)).await {
        Ok(msg) => {
            let ct = msg.headers.get(headers::CONTENT_TYPE).map(|v| v.as_str());
            match codec::decode::<InferResult>(ct, &msg.payload) {
                Ok(r) => (StatusCode::OK, Json(r)).into_response(),
                Err(e) => ApiError::new(ErrorCode::Internal, format!("stored result unreadable: {e}")).into_response(),
            }
        }
        Err(e) if matches!(e.kind(), async_nats::jetstream::stream::DirectGetErrorKind::NotFound) => {
            ApiError::new(ErrorCode::NotFound, format!("no result for `{id}` (yet): it may still be queued or running"))
                .with_id(&id)
                .into_response()
        }
        Err(e) => ApiError::new(ErrorCode::Internal, format!("reading the result failed: {e}")).into_response(),
    }
}
