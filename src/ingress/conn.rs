//! Connections: the accept loop in front of the router, and the limits a
//! caller meets before any handler runs (`[ingress.connections]`):
//!
//! - at most `max_open` connections at once, and `max_per_peer` from one
//!   IP address (0: no per-peer cap). A connection beyond either is closed
//!   as soon as it is accepted, and counted in
//!   `fleet_ingress_connections_refused_total{reason}`;
//! - `header_timeout_ms`: a request's headers must arrive within it,
//!   counted from when the connection starts waiting for them, so it also
//!   closes a kept-alive connection idle that long between requests;
//! - HTTP/1.1 only: every limit above holds for every connection (HTTP/2
//!   and TLS are for a proxy in front, see the threat model in
//!   `docs/INGRESS.md`).
//!
//! Bodies are bounded by [`read_body`] (size and time), a middleware on the
//! routes that take one. Handlers see the peer as
//! `ConnectInfo<SocketAddr>` (failed logins are throttled by it).
//!
//! On shutdown the loop stops accepting and each connection finishes the
//! request it is serving, then closes; [`serve`] returns when all have.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::IntCounterVec;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::error::{ApiError, IngressCode};
use retro_fleet_schemas::ErrorCode;

/// `[ingress.connections]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_open: usize,
    /// Most connections open at once from one IP address (0: no cap).
    /// Behind a proxy every caller has the proxy's address: raise it or
    /// set 0 there and cap per client at the proxy.
    pub max_per_peer: usize,
    /// How long a request's headers may take to arrive, in ms; also how
    /// long a kept-alive connection may sit idle between requests.
    pub header_timeout_ms: u64,
    /// How long a request's body may take to arrive once its headers have,
    /// in ms (408 beyond).
    pub body_timeout_ms: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { max_open: 4096, max_per_peer: 512, header_timeout_ms: 30_000, body_timeout_ms: 60_000 }
    }
}

/// Connections open now: in total and per peer.
struct Open {
    limits: ConnectionLimits,
    by_peer: Mutex<(usize, HashMap<IpAddr, usize>)>,
    none_left: tokio::sync::Notify,
}

/// One admitted connection; dropping it frees its place.
struct Place {
    open: Arc<Open>,
    peer: IpAddr,
}

impl Open {
    /// A place for a connection from `peer`, or why there is none.
    fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Place, &'static str> {
        let mut g = self.by_peer.lock().expect("connections lock");
        if g.0 >= self.limits.max_open {
            return Err("max_open");
        }
        let mine = g.1.entry(peer).or_default();
        if self.limits.max_per_peer > 0 && *mine >= self.limits.max_per_peer {
            return Err("max_per_peer");
        }
        *mine += 1;
        g.0 += 1;
        Ok(Place { open: self.clone(), peer })
    }

    fn count(&self) -> usize {
        self.by_peer.lock().expect("connections lock").0
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut g = self.open.by_peer.lock().expect("connections lock");
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.peer);
            }
        }
        if g.0 == 0 {
            self.open.none_left.notify_waiters();
        }
    }
}

/// Accepts connections on `listener` and serves `app` on each until
/// `stop` fires; then waits for the connections to finish their requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    refused: IntCounterVec,
    stop: CancellationToken,
) {
    let header_timeout = Duration::from_millis(limits.header_timeout_ms.max(1));
    let open = Arc::new(Open { limits, by_peer: Default::default(), none_left: Default::default() });
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // out of file descriptors, most likely: let some close
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let place = match open.admit(peer.ip()) {
            Ok(p) => p,
            Err(reason) => {
                refused.with_label_values(&[reason]).inc();
                tracing::debug!(%peer, reason, "connection refused: at the connection cap");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header_timeout);
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    loop {
        let none_left = open.none_left.notified();
        if open.count() == 0 {
            return;
        }
        none_left.await;
    }
}

/// Middleware on routes that read a body: a declared `Content-Length` over
/// `limit` is 413 at once, before a byte of the body is read; the body must
/// then arrive within `timeout` (408) and stay within `limit` (413).
pub async fn read_body(limit: usize, timeout: Duration, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(limit).into_response();
    }
    let (parts, body) = req.into_parts();
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) if is_length_limit(&e) => return too_large(limit).into_response(),
        Ok(Err(e)) => {
            return ApiError::new(IngressCode::UnreadableBody, format!("reading the body failed: {e}")).into_response();
        }
        Err(_) => {
            let secs = timeout.as_secs_f64();
            return ApiError::new(IngressCode::BodyTimeout, format!("the body did not arrive within {secs} s"))
                .into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorCode::PromptTooLarge, format!("the body is larger than this route's limit of {limit} bytes"))
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}
