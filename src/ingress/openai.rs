//! The OpenAI-compatible API: `POST /v1/chat/completions`,
//! `POST /v1/completions` (both with `stream: true` as Server-Sent Events in
//! OpenAI's chunk format, ending with `data: [DONE]`) and `GET /v1/models`.
//! Priority comes from the `X-Priority` header. Errors use the same body as
//! the native API, which has OpenAI's `error.message` / `error.type` shape.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::HeaderMap as HttpHeaders;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use retro_fleet_schemas::{ChatMessage, ErrorCode, InferResult, Input, SamplingParams, Status};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::{parse_json, ApiError};
use super::native::{call, draft_into_prepared, open_stream, with_request_id, Draft};
use super::replies::Reply;
use super::AppState;

/// A `stop` given as one string or a list.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Message content: a string, or a list of parts of which the text parts count.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by both endpoints. Fields OpenAI defines that have no
/// meaning here (`user`, `logprobs`, penalties, ...) are accepted and ignored,
/// as OpenAI clients send them; `n` other than 1 is refused.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<Message>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: PromptField,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Which OpenAI object family a call belongs to.
#[derive(Clone, Copy)]
pub enum Kind {
    /// `chat.completion`.
    Chat,
    /// `text_completion`.
    Completion,
}

impl Kind {
    fn id(self, id: &str) -> String {
        match self {
            Kind::Chat => format!("chatcmpl-{id}"),
            Kind::Completion => format!("cmpl-{id}"),
        }
    }
}

fn draft(common: Common, input: Input) -> Result<(Draft, bool), ApiError> {
    if common.n.is_some_and(|n| n != 1) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "only `n: 1` is supported"));
    }
    let include_usage = common.stream_options.map(|o| o.include_usage).unwrap_or(false);
    let params = SamplingParams {
        max_tokens: common.max_completion_tokens.or(common.max_tokens),
        temperature: common.temperature,
        top_p: common.top_p,
        top_k: common.top_k,
        seed: common.seed,
        stop: common.stop.map(Stop::into_vec).unwrap_or_default(),
    };
    let draft = Draft {
        model: common.model,
        adapter: None,
        input,
        params,
        stream: common.stream,
        cache: Default::default(),
        metadata: Default::default(),
        id: None,
        timeout_ms: None,
        priority: None,
    };
    Ok((draft, include_usage))
}

/// Reads a chat completion body (also a line of a batch).
pub fn chat_draft(body: &[u8]) -> Result<(Draft, bool), ApiError> {
    parse_json::<ChatRequest>(body).and_then(|r| {
        let mut messages = Vec::with_capacity(r.messages.len());
        for m in r.messages {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                        return Err(ApiError::new(
                            ErrorCode::InvalidRequest,
                            format!("content part type `{}` is not supported; send text", p.kind),
                        ));
                    }
                    parts.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join("")
                }
            };
            messages.push(ChatMessage { role: m.role, content });
        }
        draft(r.common, Input::Chat { messages })
    })
}

/// Reads a completion body (also a line of a batch).
pub fn completion_draft(body: &[u8]) -> Result<(Draft, bool), ApiError> {
    parse_json::<CompletionRequest>(body).and_then(|r| {
        let prompt = match r.prompt {
            PromptField::One(p) => p,
            PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptField::Many(_) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "send one prompt per request (`prompt` as a string)",
                ))
            }
        };
        draft(r.common, Input::Completion { prompt })
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    h: HttpHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = body.map_err(ApiError::from_body_rejection).and_then(|b| chat_draft(&b));
    respond(state, h, who, parsed, Kind::Chat).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    h: HttpHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = body.map_err(ApiError::from_body_rejection).and_then(|b| completion_draft(&b));
    respond(state, h, who, parsed, Kind::Completion).await
}

async fn respond(
    state: AppState,
    h: HttpHeaders,
    who: Principal,
    parsed: Result<(Draft, bool), ApiError>,
    kind: Kind,
) -> Response {
    let (draft, include_usage) = match parsed {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    let prepared = match draft_into_prepared(&state, &h, &who, draft) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let resp = if prepared.req.stream {
        match open_stream(&state, &prepared).await {
            Ok(waiter) => {
                sse(waiter, prepared.timeout, kind, prepared.req.model.clone(), include_usage).into_response()
            }
            Err(e) => e.into_response(),
        }
    } else {
        match call(&state, &prepared).await {
            Ok(result) => match (&result.status, &result.error) {
                (Status::Error, Some(e)) => ApiError::from(e.clone()).with_id(&result.id).into_response(),
                _ => Json(object(kind, &result)).into_response(),
            },
            Err(e) => e.into_response(),
        }
    };
    with_request_id(resp, &prepared.req.id)
}

fn usage(r: &InferResult) -> Value {
    let u = r.usage.clone().unwrap_or_default();
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
}

/// The non-streaming response object.
pub fn object(kind: Kind, r: &InferResult) -> Value {
    let (text, finish) = r.output.as_ref().map(|o| (o.text.as_str(), o.finish_reason.as_str())).unwrap_or(("", "stop"));
    match kind {
        Kind::Chat => json!({
            "id": kind.id(&r.id), "object": "chat.completion", "created": now(), "model": r.model,
            "system_fingerprint": r.model_revision,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}],
            "usage": usage(r),
        }),
        Kind::Completion => json!({
            "id": kind.id(&r.id), "object": "text_completion", "created": now(), "model": r.model,
            "system_fingerprint": r.model_revision,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            "usage": usage(r),
        }),
    }
}

fn chunk(kind: Kind, id: &str, model: &str, delta: Option<&str>, finish: Option<&str>, first: bool) -> Value {
    match kind {
        Kind::Chat => {
            let mut d = serde_json::Map::new();
            if first {
                d.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = delta {
                d.insert("content".into(), json!(t));
            }
            json!({"id": kind.id(id), "object": "chat.completion.chunk", "created": now(), "model": model,
                   "choices": [{"index": 0, "delta": d, "logprobs": null, "finish_reason": finish}]})
        }
        Kind::Completion => json!({"id": kind.id(id), "object": "text_completion", "created": now(), "model": model,
                   "choices": [{"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish}]}),
    }
}

/// Chunks in OpenAI's shape, the final chunk with `finish_reason`, an
/// optional usage chunk, then `data: [DONE]`. An error mid-stream is sent as
/// a `data: {"error": ...}` event before `[DONE]`, as OpenAI does.
fn sse(
    mut waiter: super::replies::Waiter,
    timeout: std::time::Duration,
    kind: Kind,
    model: String,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = super::native::task_stream(move |tx| async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut first = true;
        // what the caller has been sent, to send the rest with the result
        // (all of it when following a repeated request id's stored result)
        let mut streamed = String::new();
        let send = |v: Value| Event::default().data(v.to_string());
        loop {
            match tokio::time::timeout_at(deadline, waiter.next()).await {
                Ok(Some(Reply::Chunk(c))) => {
                    if c.delta.is_empty() && !first {
                        continue;
                    }
                    if tx.send(send(chunk(kind, &c.id, &model, Some(&c.delta), None, first))).await.is_err() {
                        return;
                    }
                    streamed.push_str(&c.delta);
                    first = false;
                }
                Ok(Some(Reply::Result(r, _))) => {
                    match (&r.status, &r.error) {
                        (Status::Error, Some(e)) => {
                            let body = ApiError::from(e.clone()).with_id(&r.id).body();
                            let _ = tx.send(send(body)).await;
                        }
                        _ => {
                            let text = r.output.as_ref().map_or("", |o| o.text.as_str());
                            if let Some(rest) = text.strip_prefix(streamed.as_str()).filter(|rest| !rest.is_empty()) {
                                let _ = tx.send(send(chunk(kind, &r.id, &model, Some(rest), None, first))).await;
                                first = false;
                            }
                            let finish =
                                r.output.as_ref().map(|o| o.finish_reason.clone()).unwrap_or_else(|| "stop".into());
                            let _ = tx.send(send(chunk(kind, &r.id, &model, None, Some(&finish), first))).await;
                            if include_usage {
                                let mut u = chunk(kind, &r.id, &model, None, None, false);
                                u["choices"] = json!([]);
                                u["usage"] = usage(&r);
                                let _ = tx.send(send(u)).await;
                            }
                        }
                    }
                    let _ = tx.send(Event::default().data("[DONE]")).await;
                    return;
                }
                _ => {
                    let body = ApiError::new(ErrorCode::Timeout, "no result in time").body();
                    let _ = tx.send(send(body)).await;
                    let _ = tx.send(Event::default().data("[DONE]")).await;
                    return;
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// `GET /v1/models`.
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "retro-fleet"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}
