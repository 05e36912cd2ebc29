//! The native API: requests in the wire format's shape, as JSON. A thin
//! adapter: it reads a [`NativeRequest`] into a [`Draft`] and leaves
//! everything else to [`submit`]; it only shapes the answers (JSON, or SSE
//! events `chunk`, `result`, `error`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap as HttpHeaders, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use retro_fleet_schemas::stored::stored_result;
use retro_fleet_schemas::{
    subjects, CacheMode, ChatMessage, ErrorCode, InferResult, Input, Priority, SamplingParams, Status,
};
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::error::{parse_json, ApiError, ApiPath};
use super::replies::{merge, Next, Reply, Streamed, Waiter};
use super::request_id::with_request_id;
use super::sse::task_stream;
use super::state::AppState;
use super::submit::validate::choice_id;
use super::submit::{self, Draft, Prepared};

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
    /// Where the result is POSTed, as a signed `request.completed` or
    /// `request.failed` event (Standard Webhooks), by the worker's queue and
    /// an ingress's deliverer (`/v1/infer/async` only); its host must be
    /// among `ingress.webhooks.allowed_hosts`.
    #[serde(default)]
    pub callback_url: Option<String>,
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
    /// Choices (1-16, default 1): each is a request of its own, with the id
    /// `<id>-c<i>` after the first and, when seeded, the seed `seed + i`.
    /// With more than one the answer is [`Choices`].
    #[serde(default)]
    pub n: Option<u32>,
}

/// Answer of `POST /v1/infer` with `n` > 1: every choice's result, in order.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Choices {
    /// Request id (the first choice's).
    pub id: String,
    /// One result per choice.
    pub choices: Vec<InferResult>,
}

/// Answer of `POST /v1/infer/async`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Accepted {
    /// Request id.
    pub id: String,
    /// Where the result will be.
    pub result_url: String,
    /// With `n` > 1, where each choice's result will be (the first is `result_url`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choice_urls: Vec<String>,
}

/// Reads a native body into a [`Draft`] and has [`submit`] prepare it.
fn prepare(
    state: &AppState,
    h: &HttpHeaders,
    who: &Principal,
    body: Result<Bytes, BytesRejection>,
) -> Result<Prepared, ApiError> {
    let body = body.map_err(ApiError::from_body_rejection)?;
    let n: NativeRequest = parse_json(&body)?;
    if let Some(url) = &n.callback_url {
        super::webhooks::check_url(&state.cfg.webhooks, url)?;
    }
    let callback_url = n.callback_url;
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
        priority: n.priority.map(|p| (p, "priority")),
        n: n.n,
    };
    let mut p = submit::prepare(state, h, who, draft)?;
    p.callback_url = callback_url;
    Ok(p)
}

/// The result, or [`Choices`] with more than one; the first failed
/// choice's error when one failed.
fn result_response(id: &str, mut results: Vec<InferResult>) -> Response {
    if let Some(e) = submit::failed(&results) {
        return e.into_response();
    }
    match results.len() {
        1 => (StatusCode::OK, Json(results.remove(0))).into_response(),
        _ => (StatusCode::OK, Json(Choices { id: id.to_string(), choices: results })).into_response(),
    }
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
    if p.callback_url.is_some() {
        let why = "`callback_url` is for POST /v1/infer/async: a synchronous call gets its result in the answer";
        return with_request_id(
            ApiError::new(ErrorCode::InvalidRequest, why).param("callback_url").into_response(),
            &p.req.id,
        );
    }
    let resp = if p.req.stream {
        match submit::open_stream(&state, &p).await {
            Ok(waiters) => sse(waiters, p.timeout, p.req.id.clone()).into_response(),
            Err(e) => e.into_response(),
        }
    } else {
        match submit::call(&state, &p).await {
            Ok(results) => result_response(&p.req.id, results),
            Err(e) => e.into_response(),
        }
    };
    with_request_id(resp, &p.req.id)
}

/// Chunks as `event: chunk`, then the result as `event: result` (or
/// `event: error`). With several choices their events interleave, each
/// naming its choice's request id, and the stream ends after every result
/// (or the first error).
fn sse(waiters: Vec<Waiter>, timeout: Duration, id: String) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = task_stream(move |tx| async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut streamed: Vec<Streamed> = waiters.iter().map(|_| Streamed::default()).collect();
        let mut left = waiters.len();
        let mut replies = merge(waiters);
        while left > 0 {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some((i, Reply::Chunk(c)))) => match streamed[i].read(c) {
                    Next::Forward(c) => {
                        let event = Event::default().event("chunk").json_data(&c).expect("chunk is JSON");
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    Next::Skip => {}
                    Next::Diverged => {
                        let body = super::sse::diverged(&choice_id(&id, i as u32)).body().to_string();
                        let _ = tx.send(Event::default().event("error").data(body)).await;
                        return;
                    }
                },
                Ok(Some((_, Reply::Result(r, _)))) => {
                    let ok = r.status == Status::Ok;
                    let kind = if ok { "result" } else { "error" };
                    let _ = tx.send(Event::default().event(kind).json_data(&r).expect("result is JSON")).await;
                    if !ok {
                        return;
                    }
                    left -= 1;
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
    if let Err(e) = submit::publish(&state, &p).await {
        return e.into_response();
    }
    let id = p.req.id.clone();
    let url = |i| format!("/v1/results/{}", choice_id(&id, i));
    let choice_urls = if p.choices > 1 { (0..p.choices).map(url).collect() } else { Vec::new() };
    let body = Accepted { result_url: url(0), id: id.clone(), choice_urls };
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
    match stored_result(&state.js, &tenant, &id).await {
        Ok(Some(r)) => (StatusCode::OK, Json(r)).into_response(),
        Ok(None) => {
            ApiError::new(ErrorCode::NotFound, format!("no result for `{id}` (yet): it may still be queued or running"))
                .with_id(&id)
                .into_response()
        }
        Err(e) => ApiError::new(ErrorCode::Internal, e.to_string()).into_response(),
    }
}
