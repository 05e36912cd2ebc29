//! The batch API for batch producers, in two forms:
//!
//! - **OpenAI's Batches API**: `POST /v1/batches` with a JSON body
//!   `{"input_file_id", "endpoint", "completion_window", "metadata"}` naming
//!   a file uploaded with `purpose=batch` ([`files`](super::files)). The
//!   batch is queued for a runner ([`run`]): an ingress that feeds its
//!   lines to the fleet at most `ingress.batch_max_in_flight` at a time,
//!   in the low class by default, and writes the output and error files
//!   when it ends. `POST /v1/batches/{id}/cancel` stops it (lines not yet
//!   sent are never computed, running ones are cancelled); at the end of
//!   `completion_window` it expires with the lines done so far. An
//!   `Idempotency-Key` on create makes a retry return the same batch.
//!   `GET /v1/batches` lists the tenant's batches, newest first
//!   (`after`, `limit`).
//! - **A JSONL body** (role `submit`): OpenAI's batch-file shape, one
//!   `{"custom_id", "method": "POST", "url", "body"}` per line, all lines
//!   for one endpoint (`/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`).
//!   Every line is checked before anything is published (422 naming the
//!   line and field); then each becomes a request `<batch id>-<line>` at
//!   the priority of `?priority=` or `X-Priority` (default `low`; at most
//!   the credential's `max_batch_priority`, `normal` unless its key says
//!   otherwise), with a deadline of `batch_timeout_secs`. The lines' token
//!   estimates are charged to the caller's token limit together, before
//!   anything is queued: a batch over what the limit has left is refused
//!   whole (429), one larger than the limit itself says to split it.
//!   `GET /v1/batches/{id}/results` returns one JSONL line per finished
//!   request, in input order, in OpenAI's batch-output shape.
//!
//! `GET /v1/batches/{id}` (role `read`) shows either. A JSONL batch's
//! counts come from the results stored in `FLEET_RESULTS`; what a read
//! finds finished is kept with the record ([`Progress`]), so each read
//! looks up only the lines not finished before. A file batch's progress is
//! kept by its runner.
//!
//! Records live in the KV bucket `fleet_batches` under
//! `<tenant>.<batch id>`: another tenant's batch is a 404, like an unknown
//! one. Lines are read by [`lines`] (with
//! [`openai_shapes`](super::openai_shapes)) and published by [`submit`];
//! this module owns the batch record and its views.

pub mod lines;
pub mod run;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap as HttpHeaders, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use retro_fleet_schemas::stored::stored_result;
use retro_fleet_schemas::{subjects, Budget, ErrorCode, InferResult, Priority, Status};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::auth::{Principal, Use};
use super::error::{parse_json, ApiError, ApiPath, ApiQuery};
use super::files;
use super::state::AppState;
use super::submit::{self, Prepared};
use lines::kind_of;

/// The bucket's name (part of the NATS topology).
pub const BUCKET: &str = retro_fleet_schemas::subjects::BATCHES_BUCKET;

/// Custom ids per KV entry.
const CHUNK: usize = 1000;

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
    /// A batch of the Batches API, run from its input file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileBatch>,
}

/// What a batch run from a file adds to its record. Its runner alone
/// writes it once the batch is created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileBatch {
    /// The uploaded JSONL.
    pub input_file_id: String,
    /// As asked (`24h`).
    pub completion_window: String,
    /// Unix seconds: the end of the window.
    pub expires_at: u64,
    /// The caller's own key-value pairs.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// The credential that created it: its lines are charged to it.
    pub caller: String,
    /// That credential's own budget.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// Where it is in its life.
    pub status: BatchStatus,
    /// When it entered each status after `validating` (unix seconds).
    #[serde(default)]
    pub at: BTreeMap<BatchStatus, u64>,
    /// The finished lines' answers.
    #[serde(default)]
    pub output_file_id: Option<String>,
    /// The failed lines.
    #[serde(default)]
    pub error_file_id: Option<String>,
    /// Why the batch as a whole failed.
    #[serde(default)]
    pub errors: Vec<Value>,
    /// Where its end is POSTed.
    #[serde(default)]
    pub callback_url: Option<String>,
}

/// The life of a batch, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// Its input is being checked.
    Validating,
    /// Its lines are running.
    InProgress,
    /// Its output files are being written.
    Finalizing,
    /// Every line ran.
    Completed,
    /// It could not run (see its `errors`).
    Failed,
    /// Its window ended first: the lines done are in its output.
    Expired,
    /// A cancel was asked for; running lines are being stopped.
    Cancelling,
    /// Cancelled: the lines done are in its output.
    Cancelled,
}

impl BatchStatus {
    /// As OpenAI writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    /// Whether nothing more will happen to it.
    pub fn ended(self) -> bool {
        matches!(self, BatchStatus::Completed | BatchStatus::Failed | BatchStatus::Expired | BatchStatus::Cancelled)
    }
}

/// `?priority=` of `POST /v1/batches`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateQuery {
    /// `high`, `normal` or `low` (default).
    #[serde(default)]
    pub priority: Option<Priority>,
}

/// The JSON body of `POST /v1/batches` (OpenAI's Batches API).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// A file uploaded with `purpose=batch`.
    pub input_file_id: String,
    /// `/v1/chat/completions`, `/v1/completions` or `/v1/embeddings`: every line's `url`.
    pub endpoint: String,
    /// How long the batch may take: `24h`, or any `<n>h`, `<n>m`, `<n>s`
    /// up to how long results are kept.
    pub completion_window: String,
    /// Up to 16 pairs of your own, shown with the batch.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Where the batch's end is POSTed, as a signed `batch.<status>`
    /// event (Standard Webhooks); its host must be among
    /// `ingress.webhooks.allowed_hosts`.
    #[serde(default)]
    pub callback_url: Option<String>,
}

fn now_secs() -> u64 {
    retro_fleet_worker::unix_ms() / 1000
}

fn record_key(tenant: &str, id: &str) -> String {
    format!("{tenant}.{id}")
}

/// Seconds of a completion window (`24h`, `90m`, `30s`).
fn window_secs(w: &str) -> Option<u64> {
    let unit = match w.as_bytes().last()? {
        b'h' => 3600,
        b'm' => 60,
        b's' => 1,
        _ => return None,
    };
    let n: u64 = w[..w.len() - 1].parse().ok()?;
    (n > 0).then(|| n.saturating_mul(unit))
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
    let lines: Vec<&str> = lines::of(text);
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
        let line = lines::prepare(state, h, who, batch, priority, timeout, (i, raw), endpoint.as_deref())?;
        if !seen.insert(line.custom_id.clone()) {
            let e = ApiError::new(
                ErrorCode::InvalidRequest,
                format!("line {}: `custom_id` {} appears twice", i + 1, line.custom_id),
            );
            return Err(e.param(format!("lines[{i}].custom_id")));
        }
        endpoint.get_or_insert(line.url);
        ids.push(line.custom_id);
        prepared.push(line.request);
    }
    Ok((endpoint.expect("at least one line"), ids, prepared))
}

/// `POST /v1/batches`: a JSON body naming an input file (OpenAI's
/// Batches API), else a JSONL body of lines.
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
    let asked = q.priority.map(|p| (p, "priority"));
    let priority = match submit::validate::asked_priority(&h, asked).and_then(|a| who.class(a, Use::Batch)) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let names_a_file =
        serde_json::from_slice::<serde_json::Map<String, Value>>(&body).is_ok_and(|o| o.contains_key("input_file_id"));
    if names_a_file {
        return match parse_json::<CreateBody>(&body) {
            Ok(b) => create_from_file(&state, &who, &h, b, priority).await.map(Json).into_response(),
            Err(e) => e.into_response(),
        };
    }
    create_from_lines(&state, &who, &h, priority, &body).await
}

/// A batch of the lines in the body, all published at once.
async fn create_from_lines(
    state: &AppState,
    who: &Principal,
    h: &HttpHeaders,
    priority: Priority,
    body: &[u8],
) -> Response {
    let id = format!("batch_{}", ulid::Ulid::new());
    let (endpoint, custom_ids, prepared) = match prepare(state, h, who, &id, priority, body) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    // every line is charged like a request, all at once: a batch the token
    // limit cannot take is refused whole, before anything is queued
    if let Err(e) = submit::charge_batch(state, who, &id, &prepared).await {
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
        file: None,
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
    if let Err(e) = save(state, &record).await {
        return e.into_response();
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
    (StatusCode::OK, Json(view(state, &record, &Progress::default(), None))).into_response()
}

/// The `Idempotency-Key` of a create, as a KV key of its tenant.
fn idempotency_key(h: &HttpHeaders, tenant: &str) -> Result<Option<String>, ApiError> {
    use sha2::Digest;
    let Some(v) = h.get("idempotency-key") else { return Ok(None) };
    let k = v.as_bytes();
    if k.is_empty() || k.len() > 256 {
        let e = ApiError::new(ErrorCode::InvalidRequest, "`Idempotency-Key` must be 1-256 bytes");
        return Err(e.param("headers.idempotency-key"));
    }
    let digest = sha2::Sha256::digest(k);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(Some(format!("{tenant}.idem.{hex}")))
}

/// A batch of the lines of an uploaded file, queued for a runner.
async fn create_from_file(
    state: &AppState,
    who: &Principal,
    h: &HttpHeaders,
    b: CreateBody,
    priority: Priority,
) -> Result<Value, ApiError> {
    let bad = |m: String, p: &str| ApiError::new(ErrorCode::InvalidRequest, m).param(p);
    if kind_of(&b.endpoint).is_none() {
        return Err(bad(format!("`{}` is not a batch endpoint: {}", b.endpoint, lines::ENDPOINTS), "endpoint"));
    }
    let most = state.results_max_age_secs;
    let window = window_secs(&b.completion_window).filter(|w| *w <= most).ok_or_else(|| {
        bad(
            format!(
                "`completion_window` is `24h` or `<n>h`, `<n>m`, `<n>s`, at most {most} s (how long results are kept)"
            ),
            "completion_window",
        )
    })?;
    if b.metadata.as_ref().is_some_and(|m| m.len() > 16 || m.iter().any(|(k, v)| k.len() > 64 || v.len() > 512)) {
        return Err(bad(
            "`metadata` holds at most 16 pairs, keys up to 64 and values up to 512 characters".into(),
            "metadata",
        ));
    }
    if let Some(url) = &b.callback_url {
        super::webhooks::check_url(&state.cfg.webhooks, url)?;
    }
    let idem = idempotency_key(h, &who.tenant)?;
    if let Some(k) = &idem {
        if let Some(earlier) = earlier_batch(state, &who.tenant, k).await {
            return Ok(earlier);
        }
    }
    let input = files::info(&state.files, &who.tenant, &b.input_file_id).await.map_err(|e| e.param("input_file_id"))?;
    if input.purpose != "batch" {
        return Err(bad(
            format!("file `{}` was uploaded with purpose `{}`, not `batch`", input.id, input.purpose),
            "input_file_id",
        ));
    }
    let data = files::read(&state.files, &who.tenant, &input.id).await?;
    let text =
        std::str::from_utf8(&data).map_err(|_| bad("the input file is not UTF-8 text".into(), "input_file_id"))?;
    let lines: Vec<&str> = lines::of(text);
    if lines.is_empty() || lines.len() > state.cfg.max_batch_lines {
        let m = format!("the input file has {} lines; a batch has 1-{}", lines.len(), state.cfg.max_batch_lines);
        return Err(bad(m, "input_file_id"));
    }
    // custom ids are unique (a malformed line is reported in the error file)
    let mut seen = HashSet::new();
    for (i, raw) in lines.iter().enumerate() {
        if let Some(c) = lines::custom_id(raw) {
            if !seen.insert(c.clone()) {
                return Err(bad(format!("line {}: `custom_id` {c} appears twice", i + 1), "input_file_id"));
            }
        }
    }
    let id = format!("batch_{}", ulid::Ulid::new());
    let now = now_secs();
    let record = Record {
        id: id.clone(),
        endpoint: b.endpoint,
        tenant: who.tenant.clone(),
        priority,
        created_at: now,
        total: lines.len(),
        rejected: Vec::new(),
        file: Some(FileBatch {
            input_file_id: input.id,
            completion_window: b.completion_window,
            expires_at: now + window,
            metadata: b.metadata,
            caller: who.id.clone(),
            budget: who.budget,
            status: BatchStatus::InProgress,
            at: BTreeMap::from([(BatchStatus::InProgress, now)]),
            output_file_id: None,
            error_file_id: None,
            errors: Vec::new(),
            callback_url: b.callback_url,
        }),
    };
    save(state, &record).await?;
    if let Some(k) = &idem {
        // the first of two racing creates wins; the second answers its batch
        if state.batches.create(k, Bytes::from(id.clone())).await.is_err() {
            if let Some(earlier) = earlier_batch(state, &who.tenant, k).await {
                let _ = state.batches.delete(record_key(&who.tenant, &id)).await;
                return Ok(earlier);
            }
            let _ = state.batches.put(k, Bytes::from(id.clone())).await;
        }
    }
    queue(state, &record).await?;
    tracing::info!(batch = %id, tenant = %who.tenant, lines = record.total, file = %record.file.as_ref().map_or("", |f| f.input_file_id.as_str()), "batch created");
    Ok(view(state, &record, &Progress::default(), None))
}

/// Queues a created batch for a runner ([`run`]).
async fn queue(state: &AppState, r: &Record) -> Result<(), ApiError> {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", r.id.as_str());
    let subject = subjects::batch_run(&r.tenant, &r.id);
    let acked = match state.js.publish_with_headers(subject, h, Bytes::new()).await {
        Ok(f) => f.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    acked.map_err(|e| {
        ApiError::new(ErrorCode::Overloaded, format!("queueing batch {} failed ({e}); retry", r.id))
            .retry_after(state.cfg.retry_after_secs)
    })
}

/// The batch an `Idempotency-Key` created before, if it still exists.
async fn earlier_batch(state: &AppState, tenant: &str, key: &str) -> Option<Value> {
    let id = state.batches.get(key).await.ok().flatten()?;
    let record = load(state, tenant, std::str::from_utf8(&id).ok()?).await.ok()?;
    Some(status(state, &record).await)
}

/// Writes a batch's record.
pub(crate) async fn save(state: &AppState, r: &Record) -> Result<(), ApiError> {
    let value = Bytes::from(serde_json::to_vec(r).expect("record serialises"));
    state.batches.put(record_key(&r.tenant, &r.id), value).await.map(|_| ()).map_err(|e| {
        ApiError::new(ErrorCode::Overloaded, format!("storing the batch failed ({e}); retry"))
            .retry_after(state.cfg.retry_after_secs)
    })
}

/// OpenAI's `batch` object: a file batch as its runner left it (with a
/// cancel asked for at `cancel_at` shown as `cancelling`), a JSONL batch
/// from the lines found finished.
pub(crate) fn view(state: &AppState, r: &Record, p: &Progress, cancel_at: Option<u64>) -> Value {
    let failed = p.failed + r.rejected.len();
    let done = p.completed + failed >= r.total;
    let mut v = json!({
        "id": r.id, "object": "batch", "endpoint": r.endpoint, "priority": r.priority, "tenant": r.tenant,
        "created_at": r.created_at, "errors": null,
        "request_counts": {"total": r.total, "completed": p.completed, "failed": failed},
        "input_file_id": null, "output_file_id": null, "error_file_id": null, "metadata": null,
        "in_progress_at": r.created_at, "finalizing_at": null, "completed_at": null, "failed_at": null,
        "expired_at": null, "cancelling_at": null, "cancelled_at": null,
    });
    match &r.file {
        None => {
            v["status"] = json!(if done { "completed" } else { "in_progress" });
            v["completion_window"] = json!(format!("{}s", state.cfg.batch_timeout_secs));
            v["expires_at"] = json!(r.created_at + state.cfg.batch_timeout_secs);
            v["results_url"] = json!(format!("/v1/batches/{}/results", r.id));
        }
        Some(f) => {
            let mut status = f.status;
            let mut at = f.at.clone();
            if let (Some(t), false) = (cancel_at, status.ended()) {
                status = BatchStatus::Cancelling;
                at.entry(BatchStatus::Cancelling).or_insert(t);
            }
            v["status"] = json!(status.as_str());
            v["completion_window"] = json!(f.completion_window);
            v["expires_at"] = json!(f.expires_at);
            v["input_file_id"] = json!(f.input_file_id);
            v["output_file_id"] = json!(f.output_file_id);
            v["error_file_id"] = json!(f.error_file_id);
            v["metadata"] = json!(f.metadata);
            v["in_progress_at"] = json!(at.get(&BatchStatus::InProgress));
            for (s, t) in at.iter().filter(|(s, _)| **s > BatchStatus::InProgress) {
                v[format!("{}_at", s.as_str())] = json!(t);
            }
            if !f.errors.is_empty() {
                v["errors"] = json!({"object": "list", "data": f.errors});
            }
        }
    }
    v
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
            let (js, id) = (state.js.clone(), lines::request_id(&r.id, i));
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
/// the record (`<tenant>.<batch id>.progress`) by the reads that found
/// them (a JSONL batch) or by its runner (a file batch).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(crate) struct Progress {
    completed: usize,
    failed: usize,
    /// One bit per line: finished (or rejected at submission).
    done: Vec<u8>,
    /// A file batch: lines before this one have been sent (or refused).
    #[serde(default)]
    next: usize,
}

impl Progress {
    fn is_done(&self, i: usize) -> bool {
        self.done.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Marks line `i` of `total` finished, counted by its outcome (once).
    fn finish(&mut self, i: usize, total: usize, ok: bool) {
        if self.is_done(i) {
            return;
        }
        self.done.resize(total.div_ceil(8), 0);
        self.done[i / 8] |= 1 << (i % 8);
        if ok {
            self.completed += 1;
        } else {
            self.failed += 1;
        }
    }
}

fn progress_key(r: &Record) -> String {
    format!("{}.progress", record_key(&r.tenant, &r.id))
}

fn cancel_key(r: &Record) -> String {
    format!("{}.cancel", record_key(&r.tenant, &r.id))
}

async fn load_progress(state: &AppState, r: &Record) -> Progress {
    match state.batches.get(progress_key(r)).await {
        Ok(Some(v)) => serde_json::from_slice(&v).unwrap_or_default(),
        _ => Progress::default(),
    }
}

/// Keeps a batch's progress; a lost write only means work looked up again.
async fn save_progress(state: &AppState, r: &Record, p: &Progress) {
    if let Err(e) = state.batches.put(progress_key(r), Bytes::from(serde_json::to_vec(p).expect("serialises"))).await {
        tracing::debug!(batch = %r.id, error = %e, "keeping the batch's progress failed");
    }
}

/// When a cancel of the batch was asked for.
async fn cancel_asked(state: &AppState, r: &Record) -> Option<u64> {
    let v = state.batches.get(cancel_key(r)).await.ok().flatten()?;
    std::str::from_utf8(&v).ok()?.parse().ok()
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

/// A batch's view. A JSONL batch's unfinished lines are looked up.
async fn status(state: &AppState, record: &Record) -> Value {
    let mut progress = load_progress(state, record).await;
    if record.file.is_some() {
        let cancel = cancel_asked(state, record).await;
        return view(state, record, &progress, cancel);
    }
    let found = results(state, record, (0..record.total).filter(|i| !progress.is_done(*i))).await;
    if !found.is_empty() {
        for (i, r) in found {
            progress.finish(i, record.total, r.status == Status::Ok);
        }
        save_progress(state, record, &progress).await;
    }
    view(state, record, &progress, None)
}

/// `POST /v1/batches/{id}/cancel`: a file batch stops; lines not sent are
/// never computed, running ones are cancelled. An ended batch is answered
/// as it is.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let record = load(&state, &who.tenant, &id).await?;
    let Some(f) = &record.file else {
        let m = "a batch submitted as a JSONL body runs whole and cannot be cancelled; create batches from a file \
                 (`POST /v1/files`, then `input_file_id`) to cancel them";
        return Err(ApiError::new(ErrorCode::Unsupported, m).param("id"));
    };
    if !f.status.ended() && cancel_asked(&state, &record).await.is_none() {
        let now = Bytes::from(now_secs().to_string());
        state
            .batches
            .put(cancel_key(&record), now)
            .await
            .map_err(|e| ApiError::new(ErrorCode::Overloaded, format!("storing the cancel failed ({e}); retry")))?;
        tracing::info!(batch = %id, tenant = %who.tenant, "batch cancel asked for");
    }
    Ok(Json(status(&state, &record).await))
}

/// `?after=&limit=` of `GET /v1/batches`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// The last id of the previous page.
    #[serde(default)]
    pub after: Option<String>,
    /// Batches per page, 1-100 (default 20).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `GET /v1/batches`: the caller's batches, newest first.
pub async fn list(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "`limit` is 1-100").param("limit"));
    }
    let all = records(&state, &who.tenant)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("listing batches failed: {e}")))?;
    let ids: Vec<(String, Value)> = all.iter().map(|r| (r.id.clone(), json!(r.id))).collect();
    let mut page = files::page(ids, q.after.as_deref(), limit, files::Order::Desc);
    let mut data = Vec::new();
    for id in page["data"].as_array().cloned().unwrap_or_default() {
        if let Some(r) = all.iter().find(|r| id == r.id.as_str()) {
            data.push(status(&state, r).await);
        }
    }
    page["data"] = json!(data);
    Ok(Json(page))
}

/// Every batch record of `tenant` (`*`: of every tenant), newest first,
/// read from the bucket's stream by subject, without listing other keys.
async fn records(state: &AppState, tenant: &str) -> anyhow::Result<Vec<Record>> {
    let stream = state.js.get_stream(format!("KV_{BUCKET}")).await?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: format!("$KV.{BUCKET}.{tenant}.*"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    for _ in 0..pending {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await else { break };
        let m = m?;
        let deleted = m.headers.as_ref().and_then(|h| h.get("KV-Operation")).is_some();
        if deleted {
            continue;
        }
        match serde_json::from_slice::<Record>(&m.payload) {
            Ok(r) if r.id.starts_with("batch_") => out.push(r),
            _ => {}
        }
    }
    out.sort_by(|a, b| b.id.cmp(&a.id));
    Ok(out)
}

/// The `limit` newest batches of every tenant, with their progress
/// (`GET /v1/admin/batches`).
pub async fn recent(state: &AppState, limit: usize) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for record in records(state, "*").await?.into_iter().take(limit) {
        out.push(status(state, &record).await);
    }
    Ok(out)
}

/// `GET /v1/batches/{id}/results`: JSONL, one line per finished request
/// (a file batch: its output and error files, once it ended).
pub async fn get_results(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let record = load(&state, &who.tenant, &id).await?;
    let jsonl = |out: Vec<u8>| ([(axum::http::header::CONTENT_TYPE, "application/jsonl")], out).into_response();
    if let Some(f) = &record.file {
        let mut out = Vec::new();
        for file in [&f.output_file_id, &f.error_file_id].into_iter().flatten() {
            out.extend(files::read(&state.files, &who.tenant, file).await?);
        }
        return Ok(jsonl(out));
    }
    let rs = results(&state, &record, 0..record.total).await;
    let kind = lines::endpoint_of(&record.endpoint);
    let key = record_key(&record.tenant, &record.id);
    let mut custom_ids: Vec<String> = Vec::with_capacity(record.total);
    for k in 0..record.total.div_ceil(CHUNK) {
        match state.batches.get(format!("{key}.ids.{k}")).await {
            Ok(Some(v)) => custom_ids.extend(serde_json::from_slice::<Vec<String>>(&v).unwrap_or_default()),
            _ => return Err(ApiError::new(ErrorCode::Internal, "the batch's custom ids are missing")),
        }
    }
    let mut out = Vec::new();
    for (i, r) in &rs {
        let custom_id = custom_ids.get(*i).map(String::as_str).unwrap_or("");
        serde_json::to_writer(&mut out, &lines::output(kind, custom_id, r).1).expect("JSON writes");
        out.push(b'\n');
    }
    Ok(jsonl(out))
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
