//! The batch API for batch producers.
//!
//! - `POST /v1/batches` (role `submit`): a JSONL body in OpenAI's batch-file
//!   shape, one `{"custom_id", "method": "POST", "url", "body"}` per line, all
//!   lines for one endpoint (`/v1/chat/completions` or `/v1/completions`).
//!   Every line is checked before anything is published (422 naming the line
//!   and field); then each becomes a request `<batch id>-<line>` at the
//!   priority of `?priority=` or `X-Priority` (default `low`; at most the
//!   credential's `max_batch_priority`, `normal` unless its key says
//!   otherwise), with a deadline of `batch_timeout_secs`. The lines' token
//!   estimates are charged to the caller's token limit together, before
//!   anything is queued: a batch over what the limit has left is refused
//!   whole (429), one larger than the limit itself says to split it.
//! - `GET /v1/batches/{id}` (role `read`): the batch with its request
//!   counts, counted from the results stored in `FLEET_RESULTS`. What a
//!   read finds finished is kept with the record ([`Progress`]), so each
//!   read looks up only the lines not finished before: none once the
//!   batch is complete.
//! - `GET /v1/batches/{id}/results`: one JSONL line per finished request, in
//!   input order, in OpenAI's batch-output shape.
//!
//! The batch record and its custom ids live in the KV bucket
//! `fleet_batches` under `<tenant>.<batch id>`: another tenant's batch is a
//! 404, like an unknown one.
//!
//! An adapter like the others: lines are read by
//! [`openai_shapes`](super::openai_shapes), prepared and published by
//! [`submit`]; this module owns the JSONL framing and the batch record.

use std::collections::HashSet;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap as HttpHeaders, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use retro_fleet_schemas::stored::stored_result;
use retro_fleet_schemas::{subjects, ErrorCode, InferResult, Priority, Status};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::auth::{Principal, Use};
use super::error::{parse_json, status_of, ApiError, ApiPath, ApiQuery};
use super::openai_shapes::{chat_draft, completion_draft, object, Kind};
use super::state::AppState;
use super::submit::{self, Prepared};

/// The bucket's name (part of the NATS topology).
pub const BUCKET: &str = retro_fleet_schemas::subjects::BATCHES_BUCKET;

/// Custom ids per KV entry.
const CHUNK: usize = 1000;
/// Longest custom id.
const MAX_CUSTOM_ID: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    custom_id: String,
    method: String,
    url: String,
    body: Value,
}

/// A batch as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// `batch_<ULID>`.
    pub id: String,
    /// The endpoint of every line.
    pub endpoint: String,
    /// Owner.
    pub tenant: String,
    /// Priority its requests were published at.
    pub priority: Priority,
    /// Unix seconds.
    pub created_at: u64,
    /// Lines.
    pub total: usize,
    /// Lines whose publish the queue refused (they never run).
    #[serde(default)]
    pub rejected: Vec<usize>,
}

/// `?priority=` of `POST /v1/batches`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateQuery {
    /// `high`, `normal` or `low` (default).
    #[serde(default)]
    pub priority: Option<Priority>,
}

fn kind_of(url: &str) -> Option<Kind> {
    match url {
        "/v1/chat/completions" => Some(Kind::Chat),
        "/v1/completions" => Some(Kind::Completion),
        _ => None,
    }
}

/// Prefixes the error's field path with the line.
fn at_line(i: usize, field: &str, e: ApiError) -> ApiError {
    let path = match &e.param {
        Some(p) => format!("lines[{i}].{field}.{p}"),
        None => format!("lines[{i}].{field}"),
    };
    let message = format!("line {}: {}", i + 1, e.message);
    ApiError { message, ..e }.param(path)
}

fn now_secs() -> u64 {
    retro_fleet_worker::unix_ms() / 1000
}

fn record_key(tenant: &str, id: &str) -> String {
    format!("{tenant}.{id}")
}

/// Checks every line and turns them into requests.
fn prepare(
    state: &AppState,
    h: &HttpHeaders,
    who: &Principal,
    batch: &str,
    priority: Priority,
    body: &[u8],
) -> Result<(String, Vec<String>, Vec<Prepared>), ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::new(ErrorCode::DecodeError, "a batch is JSONL text in UTF-8"))?;
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if lines.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "the batch has no lines").param("lines"));
    }
    if lines.len() > state.cfg.max_batch_lines {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the batch has {} lines; the limit is {}", lines.len(), state.cfg.max_batch_lines),
        )
        .param("lines"));
    }
    let mut endpoint: Option<String> = None;
    let mut seen = HashSet::new();
    let mut ids = Vec::with_capacity(lines.len());
    let mut prepared = Vec::with_capacity(lines.len());
    let timeout = Duration::from_secs(state.cfg.batch_timeout_secs);
    for (i, raw) in lines.iter().enumerate() {
        let line: Line = parse_json(raw.as_bytes()).map_err(|e| at_line(i, "", e))?;
        let fail = |field: &str, msg: String| at_line(i, field, ApiError::new(ErrorCode::InvalidRequest, msg));
        if line.method != "POST" {
            return Err(fail("method", "`method` must be POST".into()));
        }
        let Some(kind) = kind_of(&line.url) else {
            return Err(fail(
                "url",
                format!("`{}` is not a batch endpoint: /v1/chat/completions or /v1/completions", line.url),
            ));
        };
        match &endpoint {
            None => endpoint = Some(line.url.clone()),
            Some(e) if *e != line.url => return Err(fail("url", format!("every line must use `{e}`"))),
            _ => {}
        }
        if line.custom_id.is_empty() || line.custom_id.len() > MAX_CUSTOM_ID {
            return Err(fail("custom_id", format!("`custom_id` must be 1-{MAX_CUSTOM_ID} bytes")));
        }
        if !seen.insert(line.custom_id.clone()) {
            return Err(fail("custom_id", format!("`custom_id` {} appears twice", line.custom_id)));
        }
        let body = serde_json::to_vec(&line.body).expect("a JSON value serialises");
        let (mut draft, _) = match kind {
            Kind::Chat => chat_draft(&body),
            Kind::Completion => completion_draft(&body),
        }
        .map_err(|e| at_line(i, "body", e))?;
        if draft.stream {
            return Err(fail("body.stream", "batch lines cannot stream".into()));
        }
        draft.id = Some(format!("{batch}-{i}"));
        draft.priority = Some((priority, "priority"));
        let mut p = submit::prepare(state, h, who, draft).map_err(|e| at_line(i, "body", e))?;
        if p.choices > 1 {
            return Err(fail("body.n", "a batch line is one choice: write one line per choice (`n: 1`)".into()));
        }
        p.timeout = timeout;
        ids.push(line.custom_id);
        prepared.push(p);
    }
    Ok((endpoint.expect("at least one line"), ids, prepared))
}

/// `POST /v1/batches`.
pub async fn create(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<CreateQuery>,
    h: HttpHeaders,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return ApiError::from_body_rejection(e).into_response(),
    };
    let id = format!("batch_{}", ulid::Ulid::new());
    let asked = q.priority.map(|p| (p, "priority"));
    let priority = match submit::validate::asked_priority(&h, asked).and_then(|a| who.class(a, Use::Batch)) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (endpoint, custom_ids, prepared) = match prepare(&state, &h, &who, &id, priority, &body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    // every line is charged like a request, all at once: a batch the token
    // limit cannot take is refused whole, before anything is queued
    if let Err(e) = submit::charge_batch(&state, &who, &id, &prepared).await {
        return e.into_response();
    }
    let key = record_key(&who.tenant, &id);
    for (k, chunk) in custom_ids.chunks(CHUNK).enumerate() {
        let value = Bytes::from(serde_json::to_vec(chunk).expect("ids serialise"));
        if let Err(e) = state.batches.put(format!("{key}.ids.{k}"), value).await {
            return ApiError::new(ErrorCode::Internal, format!("storing the batch failed: {e}")).into_response();
        }
    }
    let mut record = Record {
        id: id.clone(),
        endpoint,
        tenant: who.tenant.clone(),
        priority,
        created_at: now_secs(),
        total: prepared.len(),
        rejected: Vec::new(),
    };
    let prepared = std::sync::Arc::new(prepared);
    let outcomes: Vec<(usize, bool)> = futures::stream::iter(0..prepared.len())
        .map(|i| {
            let (state, prepared) = (state.clone(), prepared.clone());
            async move {
                let sent = submit::send(&state, &prepared[i], None).await;
                (i, sent.inspect_err(|_| submit::unsent(&state, &prepared[i])).is_ok())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    record.rejected = outcomes.iter().filter(|(_, ok)| !ok).map(|(i, _)| *i).collect();
    record.rejected.sort_unstable();
    let value = Bytes::from(serde_json::to_vec(&record).expect("record serialises"));
    if let Err(e) = state.batches.put(&key, value).await {
        return ApiError::new(ErrorCode::Internal, format!("storing the batch failed: {e}")).into_response();
    }
    tracing::info!(batch = %id, tenant = %who.tenant, lines = record.total, rejected = record.rejected.len(), "batch submitted");
    if !record.rejected.is_empty() {
        let n = record.rejected.len();
        return ApiError::new(
            ErrorCode::Overloaded,
            format!("{n} of {} lines were refused by a full queue; batch {id} holds the others", record.total),
        )
        .with_id(&id)
        .retry_after(state.cfg.retry_after_secs)
        .into_response();
    }
    let view = view(&record, 0, 0);
    (StatusCode::OK, Json(view)).into_response()
}

fn view(r: &Record, completed: usize, failed: usize) -> Value {
    let failed = failed + r.rejected.len();
    let done = completed + failed >= r.total;
    json!({
        "id": r.id, "object": "batch", "endpoint": r.endpoint, "priority": r.priority,
        "status": if done { "completed" } else { "in_progress" },
        "created_at": r.created_at,
        "request_counts": {"total": r.total, "completed": completed, "failed": failed},
        "results_url": format!("/v1/batches/{}/results", r.id),
    })
}

async fn load(state: &AppState, tenant: &str, id: &str) -> Result<Record, ApiError> {
    let missing = || ApiError::new(ErrorCode::NotFound, format!("no batch `{id}`")).param("id");
    if !id.starts_with("batch_") || !subjects::is_token(id) {
        return Err(missing());
    }
    match state.batches.get(record_key(tenant, id)).await {
        Ok(Some(v)) => serde_json::from_slice(&v)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("stored batch unreadable: {e}"))),
        Ok(None) => Err(missing()),
        Err(e) => Err(ApiError::new(ErrorCode::Internal, format!("reading the batch failed: {e}"))),
    }
}

/// The stored results of `lines` of a batch that have finished, in line
/// order; rejected lines are skipped (they never ran).
async fn results(state: &AppState, r: &Record, lines: impl Iterator<Item = usize>) -> Vec<(usize, InferResult)> {
    let rejected: HashSet<usize> = r.rejected.iter().copied().collect();
    let mut out: Vec<(usize, InferResult)> = futures::stream::iter(lines.filter(|i| !rejected.contains(i)))
        .map(|i| {
            let (js, id) = (state.js.clone(), format!("{}-{i}", r.id));
            async move { stored_result(&js, &r.tenant, &id).await.ok().flatten().map(|res| (i, res)) }
        })
        .buffer_unordered(64)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    out.sort_by_key(|(i, _)| *i);
    out
}

/// The lines of a batch known to be finished, and how: kept in KV next to
/// the record (`<tenant>.<batch id>.progress`) by the reads that found them.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Progress {
    completed: usize,
    failed: usize,
    /// One bit per line: finished (or rejected at submission).
    done: Vec<u8>,
}

impl Progress {
    fn is_done(&self, i: usize) -> bool {
        self.done.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Marks line `i` of `total` finished, counted by its outcome.
    fn finish(&mut self, i: usize, total: usize, ok: bool) {
        self.done.resize(total.div_ceil(8), 0);
        self.done[i / 8] |= 1 << (i % 8);
        if ok {
            self.completed += 1;
        } else {
            self.failed += 1;
        }
    }
}

/// `GET /v1/batches/{id}`.
pub async fn get(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let record = load(&state, &who.tenant, &id).await?;
    Ok(Json(status(&state, &record).await))
}

/// A batch's view, looking up only the lines not known finished.
async fn status(state: &AppState, record: &Record) -> Value {
    let key = format!("{}.progress", record_key(&record.tenant, &record.id));
    let mut progress: Progress = match state.batches.get(&key).await {
        Ok(Some(v)) => serde_json::from_slice(&v).unwrap_or_default(),
        _ => Progress::default(),
    };
    let found = results(state, record, (0..record.total).filter(|i| !progress.is_done(*i))).await;
    if !found.is_empty() {
        for (i, r) in found {
            progress.finish(i, record.total, r.status == Status::Ok);
        }
        // a lost write only means those lines are looked up again
        if let Err(e) = state.batches.put(&key, Bytes::from(serde_json::to_vec(&progress).expect("serialises"))).await {
            tracing::debug!(batch = %record.id, error = %e, "keeping the batch's progress failed");
        }
    }
    let mut v = view(record, progress.completed, progress.failed);
    v["tenant"] = json!(record.tenant);
    v
}

/// The `limit` newest batches of every tenant, with their progress
/// (`GET /v1/admin/batches`). Batch ids are ULIDs: newest sort last.
pub async fn recent(state: &AppState, limit: usize) -> anyhow::Result<Vec<Value>> {
    let mut keys: Vec<String> = state
        .batches
        .keys()
        .await?
        .filter_map(|k| async move { k.ok() })
        .filter(|k| {
            let record = matches!(k.split_once('.'), Some((_, id)) if id.starts_with("batch_") && !id.contains('.'));
            async move { record }
        })
        .collect()
        .await;
    keys.sort_by(|a, b| b.split_once('.').map(|x| x.1).cmp(&a.split_once('.').map(|x| x.1)));
    let mut out = Vec::new();
    for key in keys.into_iter().take(limit) {
        let Some((tenant, id)) = key.split_once('.') else { continue };
        match load(state, tenant, id).await {
            Ok(record) => out.push(status(state, &record).await),
            Err(e) => tracing::debug!(%key, error = %e.message, "unreadable batch record"),
        }
    }
    Ok(out)
}

/// `GET /v1/batches/{id}/results`: JSONL, one line per finished request.
pub async fn get_results(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let record = load(&state, &who.tenant, &id).await?;
    let rs = results(&state, &record, 0..record.total).await;
    let kind = kind_of(&record.endpoint).unwrap_or(Kind::Completion);
    let key = record_key(&record.tenant, &record.id);
    let mut custom_ids: Vec<String> = Vec::with_capacity(record.total);
    for k in 0..record.total.div_ceil(CHUNK) {
        match state.batches.get(format!("{key}.ids.{k}")).await {
            Ok(Some(v)) => custom_ids.extend(serde_json::from_slice::<Vec<String>>(&v).unwrap_or_default()),
            _ => return Err(ApiError::new(ErrorCode::Internal, "the batch's custom ids are missing")),
        }
    }
    let mut out = String::new();
    for (i, r) in &rs {
        let custom_id = custom_ids.get(*i).map(String::as_str).unwrap_or("");
        let (status, body) = match (&r.status, &r.error) {
            (Status::Error, Some(e)) => {
                let err = ApiError::from(e.clone()).with_id(&r.id);
                (status_of(e.code).as_u16(), err.body())
            }
            _ => (200, object(kind, std::slice::from_ref(r))),
        };
        let line = json!({
            "id": format!("batch_req_{}", r.id), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": r.id, "body": body}, "error": null,
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    Ok(([(axum::http::header::CONTENT_TYPE, "application/jsonl")], out).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_counts_each_finished_line_once_by_outcome() {
        let mut p = Progress::default();
        assert!(!p.is_done(0) && !p.is_done(9999));
        p.finish(0, 10, true);
        p.finish(9, 10, false);
        assert!(p.is_done(0) && p.is_done(9) && !p.is_done(5));
        assert_eq!((p.completed, p.failed, p.done.len()), (1, 1, 2));
        let back: Progress = serde_json::from_slice(&serde_json::to_vec(&p).unwrap()).unwrap();
        assert!(back.is_done(9) && !back.is_done(8));
    }
}
