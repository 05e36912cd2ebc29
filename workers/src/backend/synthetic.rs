//! The synthetic backend: a fixed latency per request and fixed output,
//! so scaling can be measured without a model (it sleeps; it does not burn CPU).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use retro_fleet_schemas::{ErrorCode, InferRequest};
use tokio::sync::Semaphore;

use super::{words, Attempt, Backend, BackendError, Generating};

/// Sleeps `latency`, then answers `output_tokens` words; at most
/// `concurrency` requests run at once per worker.
pub struct Synthetic {
    latency: Duration,
    output_tokens: u32,
    slots: Option<Semaphore>,
    revision: Option<String>,
    fail_rate: f64,
    calls: AtomicU64,
}

impl Synthetic {
    /// A synthetic backend.
    pub fn new(latency: Duration, output_tokens: u32, concurrency: Option<usize>, revision: Option<String>) -> Self {
        Synthetic {
            latency,
            output_tokens,
            slots: concurrency.map(Semaphore::new),
            revision,
            fail_rate: 0.0,
            calls: AtomicU64::new(0),
        }
    }

    /// Makes this fraction of calls (0..1, evenly spread) fail with a
    /// retryable `backend_error` after the latency, as a sick model would.
    pub fn with_fail_rate(mut self, fail_rate: f64) -> Self {
        self.fail_rate = fail_rate.clamp(0.0, 1.0);
        self
    }

    /// Whether call number `k` (from 0) fails: evenly spread, exact in the long run.
    fn fails(&self, k: u64) -> bool {
        (((k + 1) as f64) * self.fail_rate).floor() > ((k as f64) * self.fail_rate).floor()
    }
}

impl Backend for Synthetic {
    fn revision(&self) -> Option<String> {
        self.revision.clone()
    }

    fn generate<'a>(&'a self, req: &'a InferRequest, attempt: Attempt) -> Generating<'a> {
        Box::pin(async move {
            BackendError::refuses_embed(req)?;
            BackendError::refuses_beyond_basic(req, "synthetic")?;
            let _slot = match &self.slots {
                Some(s) => Some(s.acquire().await.expect("semaphore never closed")),
                None => None,
            };
            tokio::time::sleep(self.latency).await;
            if self.fail_rate > 0.0 && self.fails(self.calls.fetch_add(1, Ordering::Relaxed)) {
                return Err(BackendError {
                    code: ErrorCode::BackendError,
                    message: "synthetic failure (fail_rate)".into(),
                    retryable: true,
                });
            }
            let n = req.params.max_tokens.unwrap_or(self.output_tokens).min(self.output_tokens.max(1) * 64);
            Ok(words::answer(req, std::iter::repeat_n("token", n as usize), Some(n), attempt.deltas))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_rate_is_spread_evenly_and_exact() {
        let s = Synthetic::new(Duration::ZERO, 1, None, None).with_fail_rate(0.25);
        let fails: Vec<bool> = (0..8).map(|k| s.fails(k)).collect();
        assert_eq!(fails, [false, false, false, true, false, false, false, true]);
        let all = Synthetic::new(Duration::ZERO, 1, None, None).with_fail_rate(1.0);
        assert!((0..100).all(|k| all.fails(k)));
        let none = Synthetic::new(Duration::ZERO, 1, None, None);
        assert!((0..100).all(|k| !none.fails(k)));
    }
}
