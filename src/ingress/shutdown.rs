//! A bounded shutdown of the HTTP side. When the shutdown fires the
//! ingress stops accepting connections and calls in flight have
//! `ingress.drain_timeout_ms` to finish; a call still waiting then (NATS
//! gone, a slow model) is answered 503 with `Retry-After` and its request
//! id, and counted. Connections still open a moment later (a stream still
//! sending) are closed. So the ingress exits within its bound even when
//! NATS is gone, and says how many calls it cut short.
//!
//! Requests of calls cut short stay queued and are not cancelled: a retry
//! with the same `X-Request-Id` gets their result.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use retro_fleet_schemas::ErrorCode;
use tokio_util::sync::CancellationToken;

use super::error::{ApiError, REQUEST_ID};

/// The drain of one ingress: when it began, how long it lasts, and how
/// many calls it cut short.
#[derive(Clone)]
pub struct Drain {
    begun: CancellationToken,
    grace: Duration,
    cut: Arc<AtomicUsize>,
}

impl Drain {
    /// A drain that lets calls in flight finish for `grace` once begun.
    pub fn new(grace: Duration) -> Drain {
        Drain { begun: CancellationToken::new(), grace, cut: Default::default() }
    }

    /// Starts the drain (idempotent).
    pub fn begin(&self) {
        self.begun.cancel();
    }

    /// Whether the drain has begun.
    pub fn begun(&self) -> bool {
        self.begun.is_cancelled()
    }

    /// Completes when the drain begins (streams that never end, like the
    /// console's, end then instead of holding the drain up).
    pub async fn beginning(&self) {
        self.begun.cancelled().await;
    }

    /// Completes `grace` after the drain began.
    pub async fn expired(&self) {
        self.begun.cancelled().await;
        tokio::time::sleep(self.grace).await;
    }

    /// Calls answered 503 because the drain ended before they did, plus
    /// connections closed while still sending.
    pub fn cut_short(&self) -> usize {
        self.cut.load(Ordering::Relaxed)
    }

    /// Counts connections closed at the end of the drain.
    pub fn count_closed(&self, n: usize) {
        self.cut.fetch_add(n, Ordering::Relaxed);
    }
}

/// Middleware: runs the call, or answers 503 when the drain ends first.
pub async fn bound(State(drain): State<Drain>, req: Request, next: Next) -> Response {
    // a header value is shared, not copied
    let id = req.headers().get(REQUEST_ID).cloned();
    tokio::select! {
        biased;
        resp = next.run(req) => resp,
        _ = drain.expired() => {
            drain.cut.fetch_add(1, Ordering::Relaxed);
            let mut e = ApiError::new(
                ErrorCode::Overloaded,
                "this ingress is shutting down and the call did not finish in its drain time; \
                 retry (another ingress answers; with the same X-Request-Id the request is not run twice)",
            )
            .retry_after(1);
            if let Some(id) = id.as_ref().and_then(|v| v.to_str().ok()) {
                e = e.with_id(id);
            }
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drain_expires_its_grace_after_it_began() {
        let d = Drain::new(Duration::from_secs(3));
        let started = tokio::time::Instant::now();
        let waiter = tokio::spawn({
            let d = d.clone();
            async move { d.expired().await }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!waiter.is_finished(), "no drain before it begins");
        d.begin();
        waiter.await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(13));
        assert!(d.begun());
    }
}
