//! Riding through a JetStream leader election: when a node of a cluster is
//! lost, the streams it led have no leader for a moment, and a write to them
//! gets no answer (no responders, no ack in time) rather than a refusal.
//! Such a write is sent again, unchanged, for up to [`RIDE_FOR`]: writes are
//! idempotent here (a request carries its `Nats-Msg-Id`, a result write
//! expects no earlier result for its id, a dead letter carries the request's
//! id), so a write that did land before its answer was lost is kept once.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};

/// Longest a write is retried: a leader election takes a few seconds; a
/// stream that stays without a leader longer is an outage to report.
pub const RIDE_FOR: Duration = Duration::from_secs(15);

/// Whether JetStream did not answer a publish (rather than refusing it): no
/// leader to take it, a lost connection, no ack in time.
pub fn unanswered(e: &PublishError) -> bool {
    matches!(e.kind(), PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe | PublishErrorKind::StreamNotFound)
}

/// Runs `write` until it is answered, `retry` says its error is not worth
/// another try, or `until` (at most [`RIDE_FOR`] from now) would pass;
/// `meanwhile` runs before each new try (keeping a message in progress).
pub async fn ride<T, E, W, Fut, M, MFut>(
    until: Instant,
    retry: impl Fn(&E) -> bool,
    mut write: W,
    mut meanwhile: M,
) -> Result<T, E>
where
    E: std::fmt::Display,
    W: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    M: FnMut() -> MFut,
    MFut: Future<Output = ()>,
{
    let until = until.min(Instant::now() + RIDE_FOR);
    let mut pause = Duration::from_millis(50);
    loop {
        match write().await {
            Err(e) if retry(&e) && Instant::now() + pause < until => {
                tracing::info!(error = %e, ?pause, "a JetStream write went unanswered; sending it again");
                meanwhile().await;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            done => return done,
        }
    }
}
