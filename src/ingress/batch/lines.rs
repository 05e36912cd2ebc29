//! One line of a batch: OpenAI's `{"custom_id", "method", "url", "body"}`
//! read into a request ([`prepare`]), and the line written for it in the
//! batch's output or error file ([`output`], [`refused`]). Both batch
//! routes use these: the JSONL body and the file batches.

use std::time::Duration;

use axum::http::HeaderMap as HttpHeaders;
use retro_fleet_schemas::{ErrorCode, InferResult, Priority, Status};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::ingress::auth::Principal;
use crate::ingress::error::{parse_json, status_of, ApiError};
use crate::ingress::openai_shapes::{
    chat_draft, completion_draft, embeddings_draft, embeddings_object, object, EncodingFormat, Kind,
};
use crate::ingress::state::AppState;
use crate::ingress::submit::{self, Prepared};

/// Longest custom id.
pub const MAX_CUSTOM_ID: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    custom_id: String,
    method: String,
    url: String,
    body: Value,
}

/// The lines of a batch file: line `i` of a batch is the `i`-th non-blank
/// line of its file.
pub fn of(text: &str) -> Vec<&str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).collect()
}

/// An endpoint a batch line may call.
#[derive(Clone, Copy)]
pub enum Endpoint {
    /// `/v1/chat/completions` or `/v1/completions`: answers of that kind.
    Generate(Kind),
    /// `/v1/embeddings`: vectors, as floats.
    Embeddings,
}

/// The endpoints a batch may call, as a refusal names them.
pub const ENDPOINTS: &str = "/v1/chat/completions, /v1/completions or /v1/embeddings";

/// The endpoint of `url`, if a batch may call it.
pub fn kind_of(url: &str) -> Option<Endpoint> {
    match url {
        "/v1/chat/completions" => Some(Endpoint::Generate(Kind::Chat)),
        "/v1/completions" => Some(Endpoint::Generate(Kind::Completion)),
        "/v1/embeddings" => Some(Endpoint::Embeddings),
        _ => None,
    }
}

/// A batch whose record names no endpoint it knows answers as completions.
pub fn endpoint_of(url: &str) -> Endpoint {
    kind_of(url).unwrap_or(Endpoint::Generate(Kind::Completion))
}

/// Prefixes the error's field path and message with line `i` (0-based).
fn at_line(i: usize, field: &str, e: ApiError) -> ApiError {
    let path = match &e.param {
        Some(p) => format!("lines[{i}].{field}.{p}"),
        None => format!("lines[{i}].{field}"),
    };
    let message = format!("line {}: {}", i + 1, e.message);
    ApiError { message, ..e }.param(path)
}

/// The request id of line `i` of batch `batch`.
pub fn request_id(batch: &str, i: usize) -> String {
    format!("{batch}-{i}")
}

/// The custom id of a line, when it has one (the rest unread).
pub fn custom_id(raw: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Id {
        custom_id: String,
    }
    serde_json::from_str::<Id>(raw).ok().map(|l| l.custom_id)
}

/// What a line becomes.
pub struct LineRequest {
    /// The caller's id for the line.
    pub custom_id: String,
    /// Its endpoint.
    pub url: String,
    /// The request.
    pub request: Prepared,
}

/// Reads line `i` of batch `batch` into a request at `priority` with a
/// deadline `timeout` away; the line must call `endpoint` when one is
/// given. Errors name the line and field (`lines[3].body.model`).
#[allow(clippy::too_many_arguments)]
pub fn prepare(
    state: &AppState,
    h: &HttpHeaders,
    who: &Principal,
    batch: &str,
    priority: Priority,
    timeout: Duration,
    (i, raw): (usize, &str),
    endpoint: Option<&str>,
) -> Result<LineRequest, ApiError> {
    let line: Line = parse_json(raw.as_bytes()).map_err(|e| at_line(i, "", e))?;
    let fail = |field: &str, msg: String| at_line(i, field, ApiError::new(ErrorCode::InvalidRequest, msg));
    if line.method != "POST" {
        return Err(fail("method", "`method` must be POST".into()));
    }
    let Some(kind) = kind_of(&line.url) else {
        return Err(fail("url", format!("`{}` is not a batch endpoint: {ENDPOINTS}", line.url)));
    };
    if let Some(e) = endpoint.filter(|e| *e != line.url) {
        return Err(fail("url", format!("every line must use `{e}`")));
    }
    if line.custom_id.is_empty() || line.custom_id.len() > MAX_CUSTOM_ID {
        return Err(fail("custom_id", format!("`custom_id` must be 1-{MAX_CUSTOM_ID} bytes")));
    }
    let body = serde_json::to_vec(&line.body).expect("a JSON value serialises");
    let mut draft = match kind {
        Endpoint::Generate(Kind::Chat) => chat_draft(&body).map(|d| d.0),
        Endpoint::Generate(Kind::Completion) => completion_draft(&body).map(|d| d.0),
        Endpoint::Embeddings => embeddings_draft(&body).map(|d| d.0),
    }
    .map_err(|e| at_line(i, "body", e))?;
    if draft.stream {
        return Err(fail("body.stream", "batch lines cannot stream".into()));
    }
    draft.id = Some(request_id(batch, i));
    draft.priority = Some((priority, "priority"));
    let mut p = submit::prepare(state, h, who, draft).map_err(|e| at_line(i, "body", e))?;
    if p.choices > 1 {
        return Err(fail("body.n", "a batch line is one choice: write one line per choice (`n: 1`)".into()));
    }
    p.timeout = timeout;
    Ok(LineRequest { custom_id: line.custom_id, url: line.url, request: p })
}

/// The output-file line of a finished request (OpenAI's batch-output
/// shape), and whether it succeeded (a failure goes in the error file).
pub fn output(kind: Endpoint, custom_id: &str, r: &InferResult) -> (bool, Value) {
    let (ok, status, body) = match (&r.status, &r.error) {
        (Status::Error, Some(e)) => {
            let err = ApiError::from(e.clone()).with_id(&r.id);
            (false, status_of(e.code).as_u16(), err.body())
        }
        _ => match kind {
            Endpoint::Generate(k) => (true, 200, object(k, std::slice::from_ref(r))),
            Endpoint::Embeddings => (true, 200, embeddings_object(r, EncodingFormat::Float)),
        },
    };
    let line = json!({
        "id": format!("batch_req_{}", r.id), "custom_id": custom_id,
        "response": {"status_code": status, "request_id": r.id, "body": body}, "error": null,
    });
    (ok, line)
}

/// The error-file line of a line that never ran: malformed, refused, or
/// not reached before its batch expired.
pub fn refused(batch: &str, i: usize, custom_id: Option<&str>, code: &str, message: &str) -> Value {
    json!({
        "id": format!("batch_req_{}", request_id(batch, i)), "custom_id": custom_id,
        "response": null, "error": {"code": code, "message": message},
    })
}
