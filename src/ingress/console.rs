//! The web console at `/console`, for an operator who would rather look
//! than read.
//!
//! - `GET /console` (and its script and style): one page, embedded in the
//!   binary, no CDN. It holds no data, so it is served to anyone; everything
//!   it shows comes from the admin API with the key the operator types in
//!   (kept in the tab's session storage), and every button calls an admin
//!   route the CLI also uses. The console adds no power of its own.
//! - `GET /v1/admin/console/events` (role `admin`): Server-Sent Events,
//!   first `history` (the last 15 minutes of chart points), then a
//!   `sample` at every worker heartbeat ([`super::watch`]). The page reads
//!   it with `fetch`, since an `EventSource` cannot send a key.

use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;

use super::sse::task_stream;
use super::state::AppState;

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// Only this page's own script and style, and calls to this ingress.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                      img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

fn asset(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, body.into()).into_response()
}

/// `GET /console`: the page, told whether it needs a key (so that it asks
/// for one before calling the API).
pub async fn page(State(state): State<AppState>) -> Response {
    let auth = if state.auth.enabled() { "on" } else { "off" };
    asset("text/html; charset=utf-8", PAGE.replace("{auth}", auth))
}

/// `GET /console/console.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /console/console.css`.
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

/// `GET /v1/admin/console/events`. Ends when this ingress begins to drain.
pub async fn events(State(state): State<AppState>) -> impl IntoResponse {
    let (history, mut samples) = state.watch.subscribe();
    let drain = state.drain.clone();
    let stream = task_stream(move |tx| async move {
        let history = serde_json::json!({ "points": history }).to_string();
        if tx.send(Event::default().event("history").data(history)).await.is_err() {
            return;
        }
        loop {
            let sample = tokio::select! {
                s = samples.recv() => s,
                _ = drain.beginning() => return,
            };
            match sample {
                Ok(s) => {
                    if tx.send(Event::default().event("sample").data(&*s)).await.is_err() {
                        return;
                    }
                }
                // a slow reader skips samples, it is not cut off
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
