//! The HTTP ingress: a thin layer that turns HTTP calls into requests on
//! the priority streams and waits for their replies.
//!
//! - [`native`]: `POST /v1/infer`, `POST /v1/infer/async`, `GET /v1/results/{id}`.
//! - [`openai`]: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.
//! - [`replies`]: the per-process inbox, demultiplexed by request id.
//! - [`error`]: API errors and their one mapping to HTTP status.
//! - [`admin`]: `/v1/admin/*` (role admin): config (redacted), queues and
//!   pausing them, workers and draining them, dead letters, cache purge.
//! - [`auth`]: API keys, JWTs, roles and the tenant of a caller.
//! - [`jwt`]: verifying HS256/RS256/ES256 tokens and their claims.
//! - [`ratelimit`]: request and token limits, in process or shared via NATS KV.
//! - [`openapi`]: `GET /openapi.json`, generated from the handlers' types.
//! - [`batch`]: `POST /v1/batches` (JSONL), progress and results; KV `fleet_batches`.
//! - [`answers`]: the ingress's memory of recent answers (the first cache level).
//! - [`guard`]: middleware: request ids; credential, role and rate limit per route class.
//! - [`shutdown`]: the bounded drain: calls still waiting when it ends are answered 503.
//! - this file: shared state, health, metrics, the router and `serve`.

pub mod admin;
pub mod answers;
pub mod auth;
pub mod batch;
pub mod error;
pub mod guard;
pub mod jwt;
pub mod native;
pub mod openai;
pub mod openapi;
pub mod ratelimit;
pub mod replies;
pub mod shutdown;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};
use retro_fleet_worker::metrics::LATENCY_BUCKETS;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, IngressConfig};
use ratelimit::RouteClass;
use replies::Replies;

/// Ingress metrics.
#[derive(Clone)]
pub struct IngressMetrics {
    /// `fleet_http_requests_total{route,status}`.
    pub http: IntCounterVec,
    /// `fleet_request_duration_seconds{priority,model,outcome}`: end to end, as the HTTP caller sees it.
    pub e2e: HistogramVec,
    /// `fleet_ingress_published_total{priority}`.
    pub published: IntCounterVec,
    /// `fleet_ingress_unclaimed_replies_total`: replies that arrived after their caller left.
    pub unclaimed: IntCounter,
    /// `fleet_ingress_denied_total{class,reason}`: refused by the guard
    /// (`unauthenticated`, `forbidden`, `rate_limited`, `token_limited`).
    pub denied: IntCounterVec,
}

impl IngressMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = IngressMetrics {
            http: IntCounterVec::new(
                Opts::new("fleet_http_requests_total", "HTTP requests by route and status"),
                &["route", "status"],
            )?,
            e2e: HistogramVec::new(
                HistogramOpts::new("fleet_request_duration_seconds", "End-to-end latency of synchronous calls")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["priority", "model", "outcome"],
            )?,
            published: IntCounterVec::new(
                Opts::new("fleet_ingress_published_total", "Requests published"),
                &["priority"],
            )?,
            unclaimed: IntCounter::new("fleet_ingress_unclaimed_replies_total", "Replies nobody waited for any more")?,
            denied: IntCounterVec::new(
                Opts::new("fleet_ingress_denied_total", "Requests refused by authentication, roles or rate limits"),
                &["class", "reason"],
            )?,
        };
        registry.register(Box::new(m.http.clone()))?;
        registry.register(Box::new(m.e2e.clone()))?;
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.unclaimed.clone()))?;
        registry.register(Box::new(m.denied.clone()))?;
        Ok(m)
    }
}

/// State shared by every handler.
pub struct Ingress {
    /// Core client.
    pub client: async_nats::Client,
    /// JetStream context.
    pub js: jetstream::Context,
    /// Settings.
    pub cfg: IngressConfig,
    /// Models the fleet serves.
    pub models: BTreeSet<String>,
    /// The reply inbox.
    pub replies: Replies,
    /// Metrics handles.
    pub metrics: IngressMetrics,
    /// Registry rendered at `/metrics`.
    pub registry: Registry,
    /// Checks credentials.
    pub auth: auth::Authenticator,
    /// Rate limits.
    pub limits: ratelimit::Limiter,
    /// Batch records (KV `fleet_batches`).
    pub batches: async_nats::jetstream::kv::Store,
    /// The configuration with secrets redacted (`/v1/admin/config`).
    pub config_view: serde_json::Value,
    /// Registry entries older than this are not live (`/v1/admin/workers`).
    pub worker_ttl_secs: u64,
    /// The OpenAPI document (`/openapi.json`).
    pub openapi: serde_json::Value,
    /// Recent cacheable answers, served to identical calls without a queue.
    pub answers: Arc<answers::AnswerCache>,
    /// The drain on shutdown (`ingress.drain_timeout_ms`).
    pub drain: shutdown::Drain,
}

/// Handle to the shared state.
pub type AppState = Arc<Ingress>;

impl Ingress {
    /// Builds the state: subscribes the inbox and registers metrics.
    pub async fn new(client: async_nats::Client, config: &Config, registry: Registry) -> anyhow::Result<AppState> {
        let metrics = IngressMetrics::new(&registry)?;
        let auth = auth::Authenticator::new(&config.ingress.auth)?;
        if !auth.enabled() {
            tracing::warn!("ingress authentication is off: every caller may submit and read (ingress.auth.enabled)");
        }
        let js = jetstream::new(client.clone());
        let bucket = |name| crate::topology::ingress_bucket(config, name);
        let limits =
            ratelimit::Limiter::new(config.ingress.rate_limit.clone(), &js, bucket(ratelimit::kv::BUCKET)).await?;
        let batches = crate::topology::open_bucket(&js, bucket(batch::BUCKET)).await?;
        if auth.enabled() && config.ingress.auth.api_keys.is_empty() && config.ingress.auth.jwt_keys.is_empty() {
            tracing::warn!(
                "no API or JWT keys configured: only keys in KV {} are accepted (`retro-fleet keys add`)",
                retro_fleet_schemas::subjects::API_KEYS_BUCKET
            );
        }
        if let Some(keys) = auth.kv_keys() {
            let kv = crate::topology::open_bucket(&js, bucket(retro_fleet_schemas::subjects::API_KEYS_BUCKET)).await?;
            tokio::spawn(auth::follow_kv_keys(kv, keys));
        }
        let replies = Replies::start(&client, metrics.unclaimed.clone()).await?;
        let answers = Arc::new(answers::AnswerCache::new(config.ingress.cache.clone(), &registry)?);
        if config.ingress.cache.enabled {
            use retro_fleet_worker::cache::sync;
            sync::load_generations(answers.as_ref(), &js).await;
            tokio::spawn(sync::follow_generations(answers.clone(), js.clone()));
        }
        let models: BTreeSet<String> = config.models.keys().cloned().collect();
        let openapi = openapi::spec(&models, auth.enabled(), limits.enabled());
        Ok(Arc::new(Ingress {
            js,
            auth,
            limits,
            batches,
            config_view: admin::redacted(config),
            worker_ttl_secs: config.topology.worker_ttl_secs,
            openapi,
            answers,
            drain: shutdown::Drain::new(Duration::from_millis(config.ingress.drain_timeout_ms)),
            client,
            cfg: config.ingress.clone(),
            models,
            replies,
            metrics,
            registry,
        }))
    }
}

/// All routes.
pub fn router(state: AppState) -> Router {
    let limit = state.cfg.max_body_bytes;
    let guarded = |class: RouteClass, routes: Router<AppState>| {
        routes.route_layer(axum::middleware::from_fn_with_state((state.clone(), class), guard::guard))
    };
    let submit = Router::new()
        .route("/v1/infer", post(native::infer))
        .route("/v1/infer/async", post(native::infer_async))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/batches", post(batch::create).layer(DefaultBodyLimit::max(state.cfg.max_batch_bytes)));
    let read = Router::new()
        .route("/v1/results/{id}", get(native::get_result))
        .route("/v1/models", get(openai::models))
        .route("/v1/batches/{id}", get(batch::get))
        .route("/v1/batches/{id}/results", get(batch::get_results));
    let admin = Router::new()
        .route("/v1/admin/config", get(admin::config))
        .route("/v1/admin/queues", get(admin::queues))
        .route("/v1/admin/queues/{priority}/pause", post(admin::pause))
        .route("/v1/admin/queues/{priority}/resume", post(admin::resume))
        .route("/v1/admin/workers", get(admin::workers))
        .route("/v1/admin/workers/{id}/drain", post(admin::drain_worker))
        .route("/v1/admin/workers/{id}/resume", post(admin::resume_worker))
        .route("/v1/admin/dlq", get(admin::dlq_list))
        .route("/v1/admin/dlq/replay", post(admin::dlq_replay))
        .route("/v1/admin/cache/purge", post(admin::cache_purge));
    Router::new()
        .merge(guarded(RouteClass::Submit, submit))
        .merge(guarded(RouteClass::Admin, admin))
        .merge(guarded(RouteClass::Read, read))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(|State(s): State<AppState>| async move { Json(s.openapi.clone()) }))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(axum::middleware::from_fn_with_state(state.drain.clone(), shutdown::bound))
        .layer(axum::middleware::from_fn(guard::request_id))
        .with_state(state)
}

async fn count_requests(
    State(state): State<AppState>,
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = matched.map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    state.metrics.http.with_label_values(&[&route, resp.status().as_str()]).inc();
    resp
}

async fn not_found(uri: axum::http::Uri) -> error::ApiError {
    error::ApiError::new(
        retro_fleet_schemas::ErrorCode::NotFound,
        format!("no route {} (see /openapi.json)", uri.path()),
    )
}

async fn live() -> &'static str {
    "ok\n"
}

async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if state.client.connection_state() != async_nats::connection::State::Connected {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": "not connected to NATS"})),
        );
    }
    match tokio::time::timeout(Duration::from_secs(2), crate::topology::streams_present(&state.js)).await {
        Ok(Ok(())) => (StatusCode::OK, Json(serde_json::json!({"ready": true}))),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"ready": false, "reason": e}))),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reason": "JetStream did not answer"})),
        ),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render(&state.registry))
}

/// Serves until `shutdown` fires, then lets open calls finish for
/// `ingress.drain_timeout_ms` (later ones are answered 503, connections
/// still open a moment after are closed) and returns how many calls it cut
/// short.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<usize> {
    tracing::info!(addr = %listener.local_addr()?, "ingress listening");
    let (drain, replies) = (state.drain.clone(), state.replies.clone());
    let begin = {
        let drain = drain.clone();
        async move {
            shutdown.cancelled().await;
            // calls cut short keep their requests: a retry with the id gets the result
            replies.stop_cancelling();
            drain.begin();
        }
    };
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(begin);
    let closing = async {
        drain.expired().await;
        // the 503s of calls cut short are written in this moment
        tokio::time::sleep(retro_fleet_worker::FINAL_OP_TIMEOUT).await;
    };
    tokio::select! {
        r = async move { server.await } => r?,
        _ = closing => {
            tracing::warn!("connections still open after the drain (a response still streaming): closed");
            drain.count_closed(1);
        }
    }
    let cut = drain.cut_short();
    if cut > 0 {
        tracing::warn!(
            cut_short = cut,
            "the drain ended before some calls did: answered 503, their requests stay queued"
        );
    }
    Ok(cut)
}
