//! Cancellation: a caller (the ingress, when its HTTP caller disconnects or
//! times out) publishes on `fleet.ctl.cancel.<tenant>.<id>`; every worker
//! listens. Requests are known by tenant and id (`Cancels` keys are
//! `<tenant>.<id>`): ids are per tenant.
//! The worker running that request aborts the generation (its future is
//! dropped, which stops the backend's work) and answers `cancelled`; a
//! worker that has not started it yet remembers the id for a while, so it is
//! answered `cancelled` without running when it is picked up.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use retro_fleet_schemas::subjects;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a cancel for a request not (yet) running here is remembered.
const REMEMBER: Duration = Duration::from_secs(600);
/// Most remembered cancels (oldest forgotten first).
const REMEMBER_MAX: usize = 100_000;

/// Cancel tokens of the requests running in this worker, and recent cancels.
#[derive(Default)]
pub struct Cancels {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: HashMap<String, CancellationToken>,
    recent: HashMap<String, Instant>,
    order: VecDeque<(Instant, String)>,
}

/// A running request's registration; unregisters on drop.
pub struct Registration<'a> {
    cancels: &'a Cancels,
    id: String,
    /// Fires when the request is cancelled.
    pub token: CancellationToken,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.cancels.inner.lock().expect("cancels").running.remove(&self.id);
    }
}

impl Cancels {
    /// Registers request `id` as running; its token is already cancelled
    /// when a cancel for it arrived earlier.
    pub fn register(&self, id: &str) -> Registration<'_> {
        let token = CancellationToken::new();
        let mut inner = self.inner.lock().expect("cancels");
        if inner.recent.contains_key(id) {
            token.cancel();
        }
        inner.running.insert(id.to_string(), token.clone());
        Registration { cancels: self, id: id.to_string(), token }
    }

    /// Cancels `id`: fires its token if it runs here, else remembers it.
    /// Returns whether it was running here.
    pub fn cancel(&self, id: &str) -> bool {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("cancels");
        while let Some((t, _)) = inner.order.front() {
            if now.duration_since(*t) < REMEMBER && inner.order.len() < REMEMBER_MAX {
                break;
            }
            let (_, old) = inner.order.pop_front().expect("front exists");
            inner.recent.remove(&old);
        }
        if inner.recent.insert(id.to_string(), now).is_none() {
            inner.order.push_back((now, id.to_string()));
        }
        match inner.running.get(id) {
            Some(t) => {
                t.cancel();
                true
            }
            None => false,
        }
    }
}

/// Listens for cancels until `shutdown`.
pub async fn listen(client: async_nats::Client, cancels: Arc<Cancels>, shutdown: CancellationToken) {
    let mut sub = match client.subscribe(subjects::CANCEL_WILDCARD).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to cancels; requests cannot be cancelled");
            return;
        }
    };
    // once the server has the subscription, cancels from now on are heard
    if client.flush().await.is_ok() {
        tracing::info!(subject = subjects::CANCEL_WILDCARD, "listening for cancels");
    }
    loop {
        let msg = tokio::select! {
            m = sub.next() => match m { Some(m) => m, None => return },
            _ = shutdown.cancelled() => return,
        };
        if let Some((tenant, id)) = subjects::parse_cancel(&msg.subject) {
            if cancels.cancel(&format!("{tenant}.{id}")) {
                tracing::info!(tenant, id, "cancel received; aborting the generation");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_cancel_fires_a_running_request_or_waits_for_it() {
        let c = Cancels::default();
        let r = c.register("a");
        assert!(!r.token.is_cancelled());
        assert!(c.cancel("a"));
        assert!(r.token.is_cancelled());
        drop(r);
        assert!(!c.cancel("b"), "not running here");
        assert!(c.register("b").token.is_cancelled(), "remembered until it is picked up");
        tokio::time::advance(REMEMBER + Duration::from_secs(1)).await;
        c.cancel("c"); // expires old entries
        assert!(!c.register("b").token.is_cancelled(), "forgotten after a while");
    }
}
