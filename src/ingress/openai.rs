//! The OpenAI-compatible API: `POST /v1/chat/completions`,
//! `POST /v1/completions` (both with `stream: true` as Server-Sent Events in
//! OpenAI's chunk format, ending with `data: [DONE]`), `POST /v1/embeddings`
//! and `GET /v1/models`.
//! Priority comes from the `X-Priority` header. Errors use the same body as
//! the native API, which has OpenAI's `error.message` / `error.type` shape.
//!
//! A thin adapter: bodies and answers are translated by
//! [`openai_shapes`](super::openai_shapes), everything between by
//! [`submit`].

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::HeaderMap as HttpHeaders;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::{Stream, StreamExt};
use retro_fleet_schemas::tools::call_of;
use retro_fleet_schemas::{ErrorCode, InferRequest, InferResult, Status, ToolCall, ToolPlan};
use serde_json::{json, Value};

use super::auth::Principal;
use super::error::ApiError;
use super::openai_shapes::{
    chat_draft, chunk, completion_draft, embeddings_draft, embeddings_object, logprobs, object, tool_chunk, usage, Kind,
};
use super::replies::{merge, Next, Reply, Streamed, Waiter};
use super::request_id::with_request_id;
use super::sse::task_stream;
use super::state::AppState;
use super::submit::validate::choice_id;
use super::submit::{self, Draft};

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

/// `POST /v1/embeddings`: one request to an embedding model, all its texts
/// one batch.
pub async fn embeddings(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    h: HttpHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let parsed = body.map_err(ApiError::from_body_rejection).and_then(|b| embeddings_draft(&b));
    let (draft, format) = match parsed {
        Ok(d) => d,
        Err(e) => return e.into_response(),
    };
    let prepared = match submit::prepare(&state, &h, &who, draft) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let resp = match submit::call(&state, &prepared).await {
        Ok(results) => match submit::failed(&results) {
            Some(e) => e.into_response(),
            None => Json(embeddings_object(&results[0], format)).into_response(),
        },
        Err(e) => e.into_response(),
    };
    with_request_id(resp, &prepared.req.id)
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
    let prepared = match submit::prepare(&state, &h, &who, draft) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let resp = if prepared.req.stream {
        match submit::open_stream(&state, &prepared).await {
            Ok(waiters) => {
                let streams = (0..prepared.choices).map(|i| Streams::of(&prepared.req, i)).collect();
                let model = prepared.req.model.clone();
                sse(waiters, prepared.timeout, kind, model, include_usage, prepared.req.id.clone(), streams)
                    .into_response()
            }
            Err(e) => e.into_response(),
        }
    } else {
        match submit::call(&state, &prepared).await {
            Ok(results) => match submit::failed(&results) {
                Some(e) => e.into_response(),
                None => Json(object(kind, &results)).into_response(),
            },
            Err(e) => e.into_response(),
        }
    };
    with_request_id(resp, &prepared.req.id)
}

/// What a worker's streamed text is to an OpenAI chat stream, as the
/// request's tool choice decides.
enum Streams {
    /// The answer's content.
    Content,
    /// The arguments of the one call the tool choice named: streamed as
    /// they are decoded, under that call's id and name.
    Arguments(ToolCall),
    /// A list of calls being decoded: held, and sent as calls with the result.
    Held,
}

impl Streams {
    /// How choice `i` of `req` streams.
    fn of(req: &InferRequest, i: u32) -> Streams {
        match req.params.tool_plan() {
            ToolPlan::Forced(f) => Streams::Arguments(call_of(&choice_id(&req.id, i), 0, &f.name, String::new())),
            ToolPlan::Required => Streams::Held,
            ToolPlan::Text | ToolPlan::Auto => Streams::Content,
        }
    }

    /// The chunk forwarding `delta`, if it is forwarded.
    fn forward(&self, kind: Kind, id: &str, model: &str, delta: &str, first: bool) -> Option<Value> {
        match self {
            Streams::Content => Some(chunk(kind, id, model, Some(delta), None, first)),
            Streams::Arguments(call) => {
                let head = first.then_some((call.id.as_str(), call.function.name.as_str()));
                Some(tool_chunk(id, model, &[(0, head, delta)], first))
            }
            Streams::Held => None,
        }
    }

    /// The chunks (of response `id`) that send what `r` holds beyond what
    /// was `streamed`.
    fn rest(&self, kind: Kind, id: &str, r: &InferResult, model: &str, streamed: &str, first: bool) -> Vec<Value> {
        let text = r.output.as_ref().map_or("", |o| o.text.as_str());
        let calls = r.output.as_ref().map_or(&[][..], |o| o.tool_calls.as_slice());
        let mut out = Vec::new();
        if let (Streams::Arguments(_), [call]) = (self, calls) {
            let rest = call.function.arguments.strip_prefix(streamed).unwrap_or_default();
            if first || !rest.is_empty() {
                let head = first.then_some((call.id.as_str(), call.function.name.as_str()));
                out.push(tool_chunk(id, model, &[(0, head, rest)], first));
            }
            return out;
        }
        // held text was never sent: all of it is the rest
        let sent = if matches!(self, Streams::Held) { "" } else { streamed };
        if let Some(rest) = text.strip_prefix(sent).filter(|rest| !rest.is_empty()) {
            out.push(chunk(kind, id, model, Some(rest), None, first));
        }
        if !calls.is_empty() {
            let parts: Vec<_> = calls
                .iter()
                .enumerate()
                .map(|(i, c)| (i, Some((c.id.as_str(), c.function.name.as_str())), c.function.arguments.as_str()))
                .collect();
            out.push(tool_chunk(id, model, &parts, first && out.is_empty()));
        }
        out
    }
}

/// One choice of a stream: how its text is sent, and what was sent.
struct Choice {
    streams: Streams,
    /// What the caller has been sent, to send the rest with the result
    /// (all of it when following a repeated request id's stored result).
    streamed: Streamed,
    first: bool,
}

/// Chunks in OpenAI's shape, each choice's (as `choices[0].index`) as they
/// come, each ending with its chunk with `finish_reason`; then an optional
/// usage chunk, then `data: [DONE]`. An error mid-stream is sent as a
/// `data: {"error": ...}` event before `[DONE]`, as OpenAI does.
fn sse(
    waiters: Vec<Waiter>,
    timeout: std::time::Duration,
    kind: Kind,
    model: String,
    include_usage: bool,
    id: String,
    streams: Vec<Streams>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let stream = task_stream(move |tx| async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut choices: Vec<Choice> =
            streams.into_iter().map(|streams| Choice { streams, streamed: Streamed::default(), first: true }).collect();
        let mut replies = merge(waiters);
        let mut results = Vec::with_capacity(choices.len());
        let send = |v: Value| Event::default().data(v.to_string());
        let at = |mut v: Value, i: usize| {
            v["choices"][0]["index"] = json!(i);
            send(v)
        };
        while results.len() < choices.len() {
            match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some((i, Reply::Chunk(c)))) => {
                    let ch = &mut choices[i];
                    match ch.streamed.read(c) {
                        // `done` is said by the chunk with `finish_reason`, after the result
                        Next::Forward(c) if c.done => {}
                        Next::Forward(c) => {
                            if let Some(v) = ch.streams.forward(kind, &id, &model, &c.delta, ch.first) {
                                if tx.send(at(v, i)).await.is_err() {
                                    return;
                                }
                                ch.first = false;
                            }
                        }
                        Next::Skip => {}
                        Next::Diverged => {
                            let _ = tx.send(send(super::sse::diverged(&choice_id(&id, i as u32)).body())).await;
                            break;
                        }
                    }
                }
                Ok(Some((i, Reply::Result(r, _)))) => {
                    if let (Status::Error, Some(e)) = (&r.status, &r.error) {
                        let _ = tx.send(send(ApiError::from(e.clone()).with_id(&r.id).body())).await;
                        break;
                    }
                    let ch = &mut choices[i];
                    for v in ch.streams.rest(kind, &id, &r, &model, &ch.streamed.text, ch.first) {
                        let _ = tx.send(at(v, i)).await;
                        ch.first = false;
                    }
                    let finish = r.output.as_ref().map(|o| o.finish_reason.clone()).unwrap_or_else(|| "stop".into());
                    // the tokens' log probabilities come whole, with the finish
                    let mut last = chunk(kind, &id, &model, None, Some(&finish), ch.first);
                    last["choices"][0]["logprobs"] = logprobs(kind, &r);
                    let _ = tx.send(at(last, i)).await;
                    results.push(*r);
                    if results.len() == choices.len() && include_usage {
                        let mut u = chunk(kind, &id, &model, None, None, false);
                        u["choices"] = json!([]);
                        u["usage"] = usage(&results);
                        let _ = tx.send(send(u)).await;
                    }
                }
                _ => {
                    let body = ApiError::new(ErrorCode::Timeout, "no result in time").body();
                    let _ = tx.send(send(body)).await;
                    break;
                }
            }
        }
        let _ = tx.send(Event::default().data("[DONE]")).await;
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
