//! The HTTP ingress: a thin layer that turns HTTP calls into requests on
//! the priority streams and waits for their replies.
//!
//! # Layout
//!
//! One path carries every request to the fleet: an API adapter reads its
//! body into a [`submit::Draft`], and [`submit`] does the rest. Adapters
//! never import each other.
//!
//! - [`submit`]: the submit service: validation (`Draft` → `Prepared`),
//!   token charging, publishing, waiting (`call`), streaming
//!   (`open_stream`) and following a repeated request id's first result.
//! - [`native`]: adapter for `POST /v1/infer`, `POST /v1/infer/async`, `GET /v1/results/{id}`.
//! - [`openai`]: adapter for `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`.
//! - [`batch`]: OpenAI's Batches API (runs file batches, [`batch::run`]) and
//!   JSONL batches, progress and results; KV `fleet_batches`.
//! - [`files`]: OpenAI's Files API on the Object Store `fleet_files`.
//! - [`webhooks`]: completion webhooks, queued in `FLEET_WEBHOOKS` and
//!   delivered by every ingress.
//! - [`openai_shapes`]: OpenAI bodies into drafts and results into OpenAI
//!   objects, shared by `openai` and `batch`.
//! - [`sse`]: a Server-Sent Events stream fed by a task, for the streaming adapters.
//! - [`replies`]: the per-process inbox, demultiplexed by request id.
//! - [`answers`]: the ingress's memory of recent answers (the first cache level).
//! - [`error`]: API errors, their one code enum and its one mapping to HTTP status.
//! - [`conn`]: the accept loop: connection caps, header and body timeouts.
//! - [`guard`]: middleware: failed-login throttle, credential, role and
//!   rate limit per route class.
//! - [`request_id`]: middleware: every request's id, echoed on its response.
//! - [`auth`]: API keys and JWTs: the caller a credential establishes.
//! - [`principal`]: the caller: tenant, roles and priority ceilings.
//! - [`jwt`]: verifying HS256/RS256/ES256 tokens and their claims.
//! - [`ratelimit`]: request and token limits, in process or shared via NATS KV.
//! - [`budgets`]: tenants' and keys' budgets per day or month, counted from
//!   the usage stream.
//! - [`admin`]: `/v1/admin/*` (role admin): config (redacted), queues and
//!   pausing them, workers and draining them, dead letters, cache purge.
//! - [`openapi`]: `GET /openapi.json`, generated from the handlers' types.
//! - [`state`]: the state handlers share, and the metric handles.
//! - [`shutdown`]: the bounded drain: calls still waiting when it ends are answered 503.
//! - this file: building the state, health, metrics, the router and `serve`.

pub mod admin;
pub mod answers;
pub mod auth;
pub mod batch;
pub mod budgets;
pub mod config;
pub mod conn;
pub mod console;
pub mod error;
pub mod feedback;
pub mod files;
pub mod guard;
pub mod jwt;
pub mod native;
pub mod openai;
pub mod openai_shapes;
pub mod openapi;
pub mod principal;
pub mod ratelimit;
pub mod replies;
pub mod request_id;
pub mod shutdown;
pub mod sse;
pub mod state;
pub mod submit;
pub mod usage;
pub mod watch;
pub mod webhooks;

pub use state::{AppState, Ingress, IngressMetrics};

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use prometheus::Registry;
use retro_fleet_worker::trace;
use tokio_util::sync::CancellationToken;

use config::Setup;
use ratelimit::RouteClass;
use replies::Replies;

impl Ingress {
    /// Builds the state: subscribes the inbox and registers metrics. `js`
    /// is the JetStream of the fleet's streams (another domain's, at an
    /// edge site).
    pub async fn new(
        client: async_nats::Client,
        js: jetstream::Context,
        setup: Setup,
        registry: Registry,
    ) -> anyhow::Result<AppState> {
        let Setup { ingress: cfg, plan, output_defaults, config_view, meter } = setup;
        let metrics = IngressMetrics::new(&registry)?;
        let auth = auth::Authenticator::new(&cfg.auth)?;
        if !auth.enabled() {
            tracing::warn!("ingress authentication is off: every caller may submit and read (ingress.auth.enabled)");
        }
        let bucket = |name| crate::topology::ingress_bucket(&plan, name);
        let limits = ratelimit::Limiter::new(cfg.rate_limit.clone(), &js, bucket(ratelimit::kv::BUCKET)).await?;
        let batches = crate::topology::open_bucket(&js, bucket(batch::BUCKET)).await?;
        let files =
            crate::topology::batch::open_files(&js, crate::topology::batch::files_store(&plan.topology)).await?;
        let runs = crate::topology::batch::open_runs(&js, &plan.topology).await?;
        if cfg.webhooks.enabled() {
            let events = crate::topology::batch::open_webhooks(&js, &plan.topology).await?;
            webhooks::start(js.clone(), cfg.webhooks.clone(), events)?;
        }
        if auth.enabled() && cfg.auth.api_keys.is_empty() && cfg.auth.jwt_keys.is_empty() {
            tracing::warn!(
                "no API or JWT keys configured: only keys in KV {} are accepted (`retro-fleet keys add`)",
                retro_fleet_schemas::subjects::API_KEYS_BUCKET
            );
        }
        if let Some(keys) = auth.kv_keys() {
            let kv = crate::topology::open_bucket(&js, bucket(retro_fleet_schemas::subjects::API_KEYS_BUCKET)).await?;
            tokio::spawn(auth::follow_kv_keys(kv, keys));
        }
        let replies = Replies::start(&client, &js, metrics.unclaimed.clone()).await?;
        let answers = Arc::new(answers::AnswerCache::new(cfg.cache.clone(), &registry)?);
        if cfg.cache.enabled {
            use retro_fleet_worker::cache::sync;
            const CONSEQUENCE: &str = "the ingress forgets the model's answers";
            sync::load_generations(answers.generations(), &js, CONSEQUENCE).await;
            tokio::spawn(sync::follow_generations(answers.generations().clone(), js.clone(), CONSEQUENCE));
        }
        let models: BTreeSet<String> = plan.models.iter().cloned().collect();
        // 429: a rate limit, or an address throttled for failed credentials
        let throttled = limits.enabled() || (auth.enabled() && cfg.auth.failed_logins_per_minute > 0);
        let logins = ratelimit::logins::FailedLogins::new(cfg.auth.failed_logins_per_minute);
        let (settle, mut settled) = tokio::sync::mpsc::unbounded_channel();
        let budgets = match meter {
            Some(_) => {
                let b = Arc::new(budgets::Budgets::new());
                budgets::start(js.clone(), b.clone(), settle, tokio_util::sync::CancellationToken::new()).await?;
                Some(b)
            }
            None => {
                tracing::info!(
                    "metering is off (topology.metering): budgets are not enforced, token charges not settled"
                );
                None
            }
        };
        let openapi = openapi::spec(&models, auth.enabled(), throttled, budgets.is_some());
        let watch = watch::Watch::new(client.clone(), js.clone(), plan.topology.worker_ttl_secs.max(1) * 1000);
        let state = Arc::new(Ingress {
            watch,
            js,
            auth,
            limits,
            batches,
            files,
            config_view,
            worker_ttl_secs: plan.topology.worker_ttl_secs,
            results_max_age_secs: plan.topology.results_max_age_secs,
            meter,
            budgets,
            openapi,
            answers,
            drain: shutdown::Drain::new(Duration::from_millis(cfg.drain_timeout_ms)),
            client,
            cfg,
            models,
            output_defaults,
            logins,
            replies,
            metrics,
            registry,
        });
        batch::run::start(state.clone(), runs);
        // each request's real tokens settle its up-front charge, several at
        // once (a shared counter takes a NATS round trip per settlement)
        let weak = Arc::downgrade(&state);
        let settlements = futures::stream::poll_fn(move |cx| settled.poll_recv(cx));
        tokio::spawn(futures::StreamExt::for_each_concurrent(settlements, 32, move |s| {
            let weak = weak.clone();
            async move {
                if let Some(state) = weak.upgrade() {
                    state.limits.settle(&s.caller, &s.tenant, s.charged_at_ms, s.estimate, s.actual).await;
                }
            }
        }));
        Ok(state)
    }
}

/// All routes.
pub fn router(state: AppState) -> Router {
    let limit = state.cfg.max_body_bytes;
    let body_timeout = Duration::from_millis(state.cfg.connections.body_timeout_ms.max(1));
    // the guard runs first (401 before a byte of body is read), then the
    // body is read whole within its size and time bounds
    let guarded = |class: RouteClass, routes: Router<AppState>, limit: usize| {
        routes
            .route_layer(axum::middleware::from_fn(move |req, next| conn::read_body(limit, body_timeout, req, next)))
            .layer(DefaultBodyLimit::max(limit))
            .route_layer(axum::middleware::from_fn_with_state((state.clone(), class), guard::guard))
    };
    let submit = Router::new()
        .route("/v1/infer", post(native::infer))
        .route("/v1/infer/async", post(native::infer_async))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/cache/feedback", post(feedback::post));
    let batches = Router::new().route("/v1/batches", post(batch::create));
    let uploads = Router::new().route("/v1/files", post(files::upload));
    let submit = submit
        .route("/v1/batches/{id}/cancel", post(batch::cancel))
        .route("/v1/files/{id}", axum::routing::delete(files::delete));
    let read = Router::new()
        .route("/v1/results/{id}", get(native::get_result))
        .route("/v1/models", get(openai::models))
        .route("/v1/usage", get(usage::get))
        .route("/v1/batches", get(batch::list))
        .route("/v1/files", get(files::list))
        .route("/v1/files/{id}", get(files::get))
        .route("/v1/files/{id}/content", get(files::content))
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
        .route("/v1/admin/dlq/{seq}", get(admin::dlq_letter))
        .route("/v1/admin/batches", get(admin::batches))
        .route("/v1/admin/webhooks", get(admin::webhooks))
        .route("/v1/admin/console/events", get(console::events))
        .route("/v1/admin/cache/purge", post(admin::cache_purge))
        .route("/v1/admin/tenants", get(admin::tenants))
        .route("/v1/admin/tenants/{tenant}", put(admin::set_tenant));
    Router::new()
        .merge(guarded(RouteClass::Submit, submit, limit))
        .merge(guarded(RouteClass::Submit, batches, state.cfg.max_batch_bytes))
        .merge(guarded(RouteClass::Submit, uploads, state.cfg.max_file_bytes))
        .merge(guarded(RouteClass::Admin, admin, limit))
        .merge(guarded(RouteClass::Read, read, limit))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/console", get(console::page))
        .route("/console/console.js", get(console::script))
        .route("/console/console.css", get(console::style))
        .route("/openapi.json", get(|State(s): State<AppState>| async move { Json(s.openapi.clone()) }))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::middleware::from_fn_with_state(state.drain.clone(), shutdown::bound))
        .layer(axum::middleware::from_fn(request_id::middleware))
        .with_state(state)
}

/// Counts every HTTP request by route and status, and traces the API's.
async fn observe(
    State(state): State<AppState>,
    matched: Option<axum::extract::MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = matched.as_ref().map_or("unmatched", |m| m.as_str());
    // the API's routes are traced (a span per call, under the caller's
    // `traceparent`); probes and scrapes are not
    let resp = if route.starts_with("/v1/") {
        let caller = req.headers().get(retro_fleet_schemas::headers::TRACEPARENT).and_then(|v| v.to_str().ok());
        let method = req.method().as_str().to_string();
        let attrs = || {
            vec![
                opentelemetry::KeyValue::new("http.request.method", method.clone()),
                opentelemetry::KeyValue::new("http.route", route.to_string()),
            ]
        };
        let kind = opentelemetry::trace::SpanKind::Server;
        let cx = trace::start(format!("{method} {route}"), kind, &trace::remote(caller), None, attrs);
        let resp = trace::within(cx.clone(), next.run(req)).await;
        let status = resp.status();
        let code = || vec![opentelemetry::KeyValue::new("http.response.status_code", status.as_u16() as i64)];
        trace::end(&cx, code, status.is_server_error().then(|| status.as_str()));
        resp
    } else {
        next.run(req).await
    };
    state.metrics.http.with_label_values(&[route, resp.status().as_str()]).inc();
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
    let (limits, refused) = (state.cfg.connections.clone(), state.metrics.connections_refused.clone());
    let server = async move {
        let stop = CancellationToken::new();
        let serving = conn::serve(listener, router(state), limits, refused, stop.clone());
        tokio::join!(serving, async {
            begin.await;
            stop.cancel();
        });
        anyhow::Ok(())
    };
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
