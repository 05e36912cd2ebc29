//! Several instances of one model in a worker; each request goes to the
//! instance with the fewest requests in flight (ties: round robin), among
//! those whose circuit breaker admits calls when there are any.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;
use retro_fleet_schemas::InferRequest;

use super::{Backend, BackendError, DeltaSender, Generation};

/// Instances of one model.
pub struct Pool {
    instances: Vec<(Arc<dyn Backend>, AtomicUsize)>,
    next: AtomicUsize,
}

impl Pool {
    /// A pool over `instances` (at least one).
    pub fn new(instances: Vec<Arc<dyn Backend>>) -> Self {
        assert!(!instances.is_empty(), "a pool needs an instance");
        Pool { instances: instances.into_iter().map(|b| (b, AtomicUsize::new(0))).collect(), next: AtomicUsize::new(0) }
    }

    /// Index of the least busy available instance (any instance when none
    /// is available), starting the scan at a rotating offset.
    fn pick(&self) -> usize {
        let n = self.instances.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let order = (0..n).map(|k| (start + k) % n);
        let load = |&i: &usize| self.instances[i].1.load(Ordering::Relaxed);
        order
            .clone()
            .filter(|&i| self.instances[i].0.available())
            .min_by_key(load)
            .unwrap_or_else(|| order.min_by_key(load).expect("non-empty"))
    }

    /// Requests in flight per instance.
    pub fn loads(&self) -> Vec<usize> {
        self.instances.iter().map(|(_, n)| n.load(Ordering::Relaxed)).collect()
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backend for Pool {
    fn revision(&self) -> Option<String> {
        self.instances[0].0.revision()
    }

    fn available(&self) -> bool {
        self.instances.iter().any(|(b, _)| b.available())
    }

    fn generate<'a>(
        &'a self,
        req: &'a InferRequest,
        deltas: Option<DeltaSender>,
    ) -> BoxFuture<'a, Result<Generation, BackendError>> {
        let i = self.pick();
        let (backend, count) = &self.instances[i];
        count.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(count);
        Box::pin(async move {
            let out = backend.generate(req, deltas).await;
            drop(guard);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::synthetic::Synthetic;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn requests_go_to_the_least_busy_instance() {
        let make = || Arc::new(Synthetic::new(Duration::from_secs(1), 1, None, None)) as Arc<dyn Backend>;
        let pool = Arc::new(Pool::new(vec![make(), make(), make()]));
        let req = retro_fleet_schemas::InferRequest {
            v: 1,
            id: "a".into(),
            model: "m".into(),
            adapter: None,
            input: retro_fleet_schemas::Input::Completion { prompt: "x".into() },
            params: Default::default(),
            stream: false,
            cache: Default::default(),
            tenant: None,
            metadata: Default::default(),
        };
        let req = Arc::new(req);
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let (pool, req) = (pool.clone(), req.clone());
            tasks.push(tokio::spawn(async move { pool.generate(&req, None).await.map(|_| ()) }));
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        assert_eq!(pool.loads(), vec![2, 2, 2]);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(pool.loads(), vec![0, 0, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_with_an_open_breaker_gets_no_requests() {
        use crate::breaker::{Board, BreakerConfig};
        let board =
            Board::unregistered(BreakerConfig { consecutive_failures: 2, open_ms: 60_000, ..Default::default() });
        let sick = board.guard("m", 0, Arc::new(Synthetic::new(Duration::ZERO, 1, None, None).with_fail_rate(1.0)));
        let well = board.guard("m", 1, Arc::new(Synthetic::new(Duration::ZERO, 1, None, None)));
        let pool = Pool::new(vec![sick, well]);
        let req = crate::backend::tests_support::request("a");
        let mut failures = 0;
        for _ in 0..20 {
            if pool.generate(&req, None).await.is_err() {
                failures += 1;
            }
        }
        assert_eq!(failures, 2, "only the calls that opened the sick instance's breaker failed");
        assert!(pool.available());
    }
}
