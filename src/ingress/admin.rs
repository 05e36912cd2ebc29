//! Admin routes (role `admin`): what the fleet looks like from the ingress.
//!
//! - `GET /v1/admin/config`: the effective configuration, secrets redacted.
//! - `GET /v1/admin/queues`: depth of each request stream and the pending
//!   and in-flight counts of its worker consumers.
//!
//! Draining workers, pausing priorities, DLQ replay and cache purge are not
//! served here yet.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use retro_fleet_schemas::{subjects, ErrorCode, Priority};
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::config::Config;

/// The configuration as JSON with every secret replaced by `"<redacted>"`.
pub fn redacted(config: &Config) -> Value {
    let mut c = config.clone();
    c.ingress.auth = c.ingress.auth.redacted();
    let mut v = serde_json::to_value(&c).unwrap_or(Value::Null);
    if let Some(url) = v.pointer_mut("/nats/url") {
        // user:password@host in a NATS URL
        if let Some(s) = url.as_str().filter(|s| s.contains('@')) {
            *url = json!(s
                .split(',')
                .map(|u| match u.split_once('@') {
                    Some((scheme_user, host)) => {
                        let scheme = scheme_user.split("://").next().unwrap_or("nats");
                        format!("{scheme}://<redacted>@{host}")
                    }
                    None => u.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","));
        }
    }
    v
}

/// `GET /v1/admin/config`.
pub async fn config(State(state): State<AppState>) -> Json<Value> {
    Json(state.config_view.clone())
}

/// `GET /v1/admin/queues`.
pub async fn queues(State(state): State<AppState>) -> Response {
    let mut out = Vec::new();
    for p in Priority::ALL {
        let name = subjects::request_stream(p);
        let mut stream = match state.js.get_stream(name).await {
            Ok(s) => s,
            Err(e) => return ApiError::new(ErrorCode::Internal, format!("stream {name}: {e}")).into_response(),
        };
        let info = match stream.info().await {
            Ok(i) => i.clone(),
            Err(e) => return ApiError::new(ErrorCode::Internal, format!("stream {name}: {e}")).into_response(),
        };
        let mut consumers = Vec::new();
        let mut list = stream.consumers();
        while let Some(Ok(c)) = list.next().await {
            consumers.push(json!({
                "name": c.name, "pending": c.num_pending, "in_flight": c.num_ack_pending,
                "redelivered": c.num_redelivered, "waiting_pulls": c.num_waiting,
            }));
        }
        out.push(json!({
            "priority": p, "stream": name, "messages": info.state.messages, "bytes": info.state.bytes,
            "consumers": consumers,
        }));
    }
    Json(json!({"queues": out})).into_response()
}
