//! Admin routes (role `admin`): look at the fleet and steer it.
//!
//! - `GET /v1/admin/config`: the effective configuration, secrets redacted.
//! - `GET /v1/admin/queues`: depth of each request stream, and the pending,
//!   in-flight and paused state of its worker consumers.
//! - `POST /v1/admin/queues/{priority}/pause` (optional `?for_secs=N`) and
//!   `.../resume`: stop or restart delivery of a priority class to every worker.
//! - `GET /v1/admin/workers`: the live workers (registry).
//! - `POST /v1/admin/workers/{id}/drain` and `.../resume`: one worker stops
//!   taking requests (and stays up), or takes them again.
//! - `GET /v1/admin/dlq?model=&priority=&code=&id=&tenant=&limit=`: dead letters.
//! - `GET /v1/admin/dlq/{seq}`: one dead letter whole (headers, payload).
//! - `POST /v1/admin/dlq/replay`: replay the letters a filter selects.
//! - `GET /v1/admin/batches?limit=`: the newest batches of every tenant,
//!   with their progress.
//! - `POST /v1/admin/cache/purge`: new cache generation for models.
//! - `GET /v1/admin/tenants` and `PUT /v1/admin/tenants/{tenant}`: tenants'
//!   settings (weights for fair sharing).
//!
//! Each action is the same code the CLI runs ([`crate::ops`] and its
//! [`dlq`](crate::ops::dlq) and [`cache`](crate::ops::cache)).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use retro_fleet_schemas::{ErrorCode, Priority};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{parse_json, ApiError, ApiPath, ApiQuery};
use super::state::AppState;
use crate::ops::{self, OpsError};
use retro_fleet_worker::control::ControlState;

/// A failure of NATS or JetStream behind an admin action (500).
fn internal(e: anyhow::Error) -> ApiError {
    ApiError::new(ErrorCode::Internal, format!("{e:#}"))
}

/// A JSON body of an admin action.
fn body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    body.map_err(ApiError::from_body_rejection).and_then(|b| parse_json(&b))
}

/// `GET /v1/admin/config`.
pub async fn config(State(state): State<AppState>) -> Json<Value> {
    Json(state.config_view.clone())
}

/// `GET /v1/admin/queues`.
pub async fn queues(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    ops::queues(&state.js).await.map(Json).map_err(internal)
}

fn priority(p: &str) -> Result<Priority, ApiError> {
    p.parse().map_err(|_| {
        ApiError::new(ErrorCode::InvalidRequest, format!("unknown priority `{p}` (high, normal or low)"))
            .param("priority")
    })
}

/// Query of a pause.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseQuery {
    /// Seconds until delivery resumes by itself; absent: until resumed.
    pub for_secs: Option<u64>,
}

/// `POST /v1/admin/queues/{priority}/pause`.
pub async fn pause(
    State(state): State<AppState>,
    ApiPath(p): ApiPath<String>,
    ApiQuery(q): ApiQuery<PauseQuery>,
) -> Result<Json<Value>, ApiError> {
    pause_or_resume(&state, &p, false, q.for_secs).await
}

/// `POST /v1/admin/queues/{priority}/resume`.
pub async fn resume(State(state): State<AppState>, ApiPath(p): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    pause_or_resume(&state, &p, true, None).await
}

async fn pause_or_resume(
    state: &AppState,
    p: &str,
    resume: bool,
    for_secs: Option<u64>,
) -> Result<Json<Value>, ApiError> {
    let p = priority(p)?;
    if for_secs == Some(0) {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "for_secs must be at least 1").param("for_secs"));
    }
    let secs = for_secs.map(|s| s.min(100 * 365 * 24 * 3600));
    let consumers = ops::pause_priority(&state.js, p, resume, secs.map(Duration::from_secs)).await.map_err(internal)?;
    tracing::info!(priority = %p, resume, ?for_secs, "admin: {} a priority", if resume { "resumed" } else { "paused" });
    Ok(Json(json!({"priority": p, "paused": !resume, "consumers": consumers})))
}

/// `GET /v1/admin/workers`.
pub async fn workers(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let list = crate::registry::list(&state.js, state.worker_ttl_secs.max(1) * 1000).await.map_err(internal)?;
    Ok(Json(json!({ "workers": list })))
}

/// `POST /v1/admin/workers/{id}/drain`.
pub async fn drain_worker(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ControlState>, ApiError> {
    control(&state, &id, true).await
}

/// `POST /v1/admin/workers/{id}/resume`.
pub async fn resume_worker(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ControlState>, ApiError> {
    control(&state, &id, false).await
}

async fn control(state: &AppState, id: &str, drain: bool) -> Result<Json<ControlState>, ApiError> {
    let s = ops::drain_worker(&state.client, id, drain).await.map_err(|e| match e {
        OpsError::NoSuchWorker(_) => ApiError::new(ErrorCode::NotFound, e.to_string()),
        OpsError::Other(e) => internal(e),
    })?;
    tracing::info!(worker = id, drain, "admin: worker {}", if drain { "drained" } else { "resumed" });
    Ok(Json(s))
}

/// Which dead letters: every given field must match.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DlqFilter {
    /// Model name.
    pub model: Option<String>,
    /// Priority class.
    pub priority: Option<Priority>,
    /// Error code (`decode_error`, `max_deliver_exceeded`, ...).
    pub code: Option<String>,
    /// Request id.
    pub id: Option<String>,
    /// Tenant.
    pub tenant: Option<String>,
}

impl DlqFilter {
    fn parse(&self) -> Result<crate::ops::dlq::Filter, ApiError> {
        let mut pairs = Vec::new();
        let fields = [
            ("model", self.model.clone()),
            ("priority", self.priority.map(|p| p.as_str().to_string())),
            ("code", self.code.clone()),
            ("id", self.id.clone()),
            ("tenant", self.tenant.clone()),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                pairs.push(format!("{k}={v}"));
            }
        }
        crate::ops::dlq::Filter::parse(&pairs).map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("{e:#}")))
    }
}

/// Query of `GET /v1/admin/dlq`: the filter's fields, and a limit.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DlqQuery {
    /// Most letters returned (default 100, at most 10,000).
    pub limit: Option<usize>,
    /// Model name.
    pub model: Option<String>,
    /// Priority class.
    pub priority: Option<Priority>,
    /// Error code.
    pub code: Option<String>,
    /// Request id.
    pub id: Option<String>,
    /// Tenant.
    pub tenant: Option<String>,
}

/// `GET /v1/admin/dlq`.
pub async fn dlq_list(State(state): State<AppState>, ApiQuery(q): ApiQuery<DlqQuery>) -> Result<Json<Value>, ApiError> {
    let filter =
        DlqFilter { model: q.model, priority: q.priority, code: q.code, id: q.id, tenant: q.tenant }.parse()?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let stream = crate::ops::dlq::open(&state.js).await.map_err(internal)?;
    let letters = crate::ops::dlq::read(&stream, &filter, limit).await.map_err(internal)?;
    Ok(Json(json!({"letters": letters.iter().map(|l| l.summary()).collect::<Vec<_>>()})))
}

/// `GET /v1/admin/dlq/{seq}`.
pub async fn dlq_letter(State(state): State<AppState>, ApiPath(seq): ApiPath<u64>) -> Result<Json<Value>, ApiError> {
    let stream = crate::ops::dlq::open(&state.js).await.map_err(internal)?;
    match crate::ops::dlq::get(&stream, seq).await {
        Ok(l) => Ok(Json(l.detail())),
        Err(_) => Err(ApiError::new(ErrorCode::NotFound, format!("no dead letter {seq}")).param("seq")),
    }
}

/// Query of `GET /v1/admin/batches` and `GET /v1/admin/webhooks`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecentQuery {
    /// Most entries returned, the newest (default 20, at most 200).
    pub limit: Option<usize>,
}

impl RecentQuery {
    fn limit(&self) -> usize {
        self.limit.unwrap_or(20).min(200)
    }
}

/// `GET /v1/admin/batches`: newest first.
pub async fn batches(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<RecentQuery>,
) -> Result<Json<Value>, ApiError> {
    let list = super::batch::recent(&state, q.limit()).await.map_err(internal)?;
    Ok(Json(json!({ "object": "list", "data": list })))
}

/// `GET /v1/admin/webhooks`: the last webhook delivery attempts, oldest first.
pub async fn webhooks(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<RecentQuery>,
) -> Result<Json<Value>, ApiError> {
    let list = match super::webhooks::log(&state.js, q.limit()).await {
        Ok(l) => l,
        // no webhook was ever queued here
        Err(_) if !state.cfg.webhooks.enabled() => Vec::new(),
        Err(e) => return Err(internal(e)),
    };
    Ok(Json(json!({ "object": "list", "data": list })))
}

/// Body of `POST /v1/admin/dlq/replay`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayBody {
    /// Which letters (all when absent).
    #[serde(default)]
    pub filter: DlqFilter,
    /// Most letters replayed (default 1,000).
    pub limit: Option<usize>,
    /// Keep the letters in the DLQ after replaying them.
    #[serde(default)]
    pub keep: bool,
    /// Report what would be replayed, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// `POST /v1/admin/dlq/replay`.
pub async fn dlq_replay(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<crate::ops::dlq::Replayed>, ApiError> {
    let b: ReplayBody = body(raw)?;
    let filter = b.filter.parse()?;
    let done = crate::ops::dlq::replay(&state.js, &filter, b.limit.unwrap_or(1000), b.keep, b.dry_run)
        .await
        .map_err(internal)?;
    tracing::info!(replayed = done.replayed, skipped = done.skipped, dry_run = b.dry_run, "admin: DLQ replay");
    Ok(Json(done))
}

/// Body of `POST /v1/admin/cache/purge`.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeBody {
    /// Models whose cached answers are dropped (all configured when empty).
    #[serde(default)]
    pub models: Vec<String>,
}

/// `POST /v1/admin/cache/purge`.
pub async fn cache_purge(
    State(state): State<AppState>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let b: PurgeBody = body(raw)?;
    if let Some(m) = b.models.iter().find(|m| !state.models.contains(*m)) {
        return Err(ApiError::new(ErrorCode::UnknownModel, format!("model `{m}` is not configured")).param("models"));
    }
    let purged: BTreeMap<String, String> =
        crate::ops::cache::purge(&state.js, &state.models, b.models).await.map_err(internal)?.into_iter().collect();
    tracing::info!(models = ?purged.keys().collect::<Vec<_>>(), "admin: cache purged");
    Ok(Json(json!({ "generations": purged })))
}

/// Body of `PUT /v1/admin/tenants/{tenant}`: the tenant's whole settings
/// (a field left out gets its default).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantBody {
    /// Share of each worker's slots against other tenants with work in the
    /// same class (positive, at most 1000; default 1).
    pub weight: Option<f64>,
    /// What the tenant may use per UTC day or month (none: no limit).
    pub budget: Option<retro_fleet_schemas::Budget>,
}

/// `GET /v1/admin/tenants`.
pub async fn tenants(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let list = crate::ops::tenants::list(&state.js).await.map_err(internal)?;
    let data: Vec<Value> = list.into_iter().map(|(tenant, p)| tenant_json(&tenant, &p)).collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `PUT /v1/admin/tenants/{tenant}`.
pub async fn set_tenant(
    State(state): State<AppState>,
    ApiPath(tenant): ApiPath<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    if !retro_fleet_schemas::subjects::is_token(&tenant) {
        let message = format!("tenant `{tenant}` must be characters from [A-Za-z0-9_-]");
        return Err(ApiError::new(ErrorCode::InvalidRequest, message).param("tenant"));
    }
    let b: TenantBody = body(raw)?;
    let policy = retro_fleet_schemas::TenantPolicy { weight: b.weight.unwrap_or(1.0), budget: b.budget };
    let invalid = |field: &'static str| move |m: String| ApiError::new(ErrorCode::InvalidRequest, m).param(field);
    policy.budget.as_ref().map_or(Ok(()), |b| b.check()).map_err(invalid("budget"))?;
    policy.check().map_err(invalid("weight"))?;
    crate::ops::tenants::set(&state.js, &tenant, &policy).await.map_err(internal)?;
    tracing::info!(tenant = %tenant, weight = policy.weight, budget = ?policy.budget, "admin: tenant settings stored");
    Ok(Json(tenant_json(&tenant, &policy)))
}

/// A tenant's settings as stored, with its name.
fn tenant_json(tenant: &str, p: &retro_fleet_schemas::TenantPolicy) -> Value {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    v["tenant"] = json!(tenant);
    v
}
