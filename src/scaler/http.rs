//! The scaler's HTTP endpoints: `/metrics`, `/health/live`, `/health/ready`
//! and `GET /v1/scaling` (the latest report of every model, JSON).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use super::Sampler;

/// What the handlers need.
#[derive(Clone)]
pub struct HttpState {
    /// NATS connection (readiness).
    pub client: async_nats::Client,
    /// Registry rendered at `/metrics`.
    pub registry: prometheus::Registry,
    /// The sampler whose snapshot `/v1/scaling` serves.
    pub sampler: Arc<Sampler>,
}

/// All routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/scaling", get(scaling))
        .route("/metrics", get(metrics))
        .route("/health/live", get(|| async { "ok\n" }))
        .route("/health/ready", get(ready))
        .with_state(state)
}

async fn scaling(State(s): State<HttpState>) -> impl IntoResponse {
    Json(s.sampler.snapshot())
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::telemetry::render(&s.registry))
}

async fn ready(State(s): State<HttpState>) -> impl IntoResponse {
    if s.client.connection_state() == async_nats::connection::State::Connected {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS\n")
    }
}
