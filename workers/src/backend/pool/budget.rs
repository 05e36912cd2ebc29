//! The worker-wide memory budget of loaded model instances: every pool
//! reserves an instance's estimated bytes before loading it, and when the
//! budget is used up the least recently used other pools unload an idle
//! instance each until the new one fits.
//!
//! The budget knows pools only as [`Evictable`], so it depends on nothing
//! of the pool's routing.

use std::sync::{Arc, Mutex, Weak};

use tokio::time::Instant;

use crate::metrics::registered;

/// What the budget asks of a pool to make room for another.
pub(super) trait Evictable: Send + Sync {
    /// When any of its instances last served.
    fn last_used(&self) -> Instant;

    /// Unloads its least recently used idle instance; false if none is idle.
    fn unload_lru_idle(&self) -> bool;
}

/// The worker-wide memory budget of loaded instances.
pub struct Budget {
    limit: u64,
    ledger: Mutex<Ledger>,
    metrics: Option<PoolMetrics>,
}

/// What the budget's one lock guards.
#[derive(Default)]
struct Ledger {
    /// Bytes held by loaded instances.
    used: u64,
    /// The pools that may be asked to unload, in the order they were built.
    pools: Vec<Weak<dyn Evictable>>,
}

/// `fleet_model_instances{model}` (loaded now), `fleet_model_memory_bytes`
/// (estimated bytes of loaded instances) and `fleet_model_waiting{model}`
/// (requests queued for a place in an engine).
#[derive(Clone)]
struct PoolMetrics {
    instances: prometheus::IntGaugeVec,
    bytes: prometheus::IntGauge,
    waiting: prometheus::IntGaugeVec,
}

impl Budget {
    /// A budget of `limit` bytes (0: unlimited).
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget { limit, ledger: Mutex::default(), metrics: None })
    }

    /// [`Budget::new`], with the pools' metrics registered on `registry`.
    pub fn with_metrics(limit: u64, registry: &prometheus::Registry) -> prometheus::Result<Arc<Budget>> {
        let m = PoolMetrics {
            instances: registered(
                registry,
                prometheus::IntGaugeVec::new(
                    prometheus::Opts::new("fleet_model_instances", "Model instances loaded in this worker"),
                    &["model"],
                )?,
            )?,
            bytes: registered(
                registry,
                prometheus::IntGauge::new(
                    "fleet_model_memory_bytes",
                    "Estimated bytes of the loaded model instances (weight files)",
                )?,
            )?,
            waiting: registered(
                registry,
                prometheus::IntGaugeVec::new(
                    prometheus::Opts::new(
                        "fleet_model_waiting",
                        "Requests this worker holds waiting for a place in a model's engine (cohort admission)",
                    ),
                    &["model"],
                )?,
            )?,
        };
        Ok(Arc::new(Budget { limit, ledger: Mutex::default(), metrics: Some(m) }))
    }

    /// The gauge of requests waiting for `model`'s engines, when metrics are on.
    pub fn waiting_gauge(&self, model: &str) -> Option<prometheus::IntGauge> {
        self.metrics.as_ref().map(|m| m.waiting.with_label_values(&[model]))
    }

    /// Bytes held by loaded instances.
    pub fn used(&self) -> u64 {
        self.ledger.lock().expect("budget").used
    }

    /// Publishes that `model` has `loaded` instances (and the bytes held).
    pub(super) fn observe(&self, model: &str, loaded: usize) {
        if let Some(m) = &self.metrics {
            m.instances.with_label_values(&[model]).set(loaded as i64);
            m.bytes.set(self.used() as i64);
        }
    }

    /// Lets the budget unload idle instances of `pool` for other pools.
    pub(super) fn enroll(&self, pool: Weak<dyn Evictable>) {
        self.ledger.lock().expect("budget").pools.push(pool);
    }

    /// Reserves `bytes` for a new instance of `for_pool`, unloading idle
    /// instances of the least recently used other pools when needed.
    pub(super) fn reserve(&self, bytes: u64, for_pool: &dyn Evictable) -> Result<(), String> {
        loop {
            let mut others: Vec<Arc<dyn Evictable>> = {
                let mut ledger = self.ledger.lock().expect("budget");
                if self.limit == 0 || ledger.used + bytes <= self.limit {
                    ledger.used += bytes;
                    return Ok(());
                }
                ledger
                    .pools
                    .iter()
                    .filter_map(Weak::upgrade)
                    .filter(|p| !std::ptr::addr_eq(Arc::as_ptr(p), for_pool as *const dyn Evictable))
                    .collect()
            };
            // pools unload outside the lock: unloading releases bytes here
            others.sort_by_key(|p| p.last_used());
            if !others.iter().any(|p| p.unload_lru_idle()) {
                return Err(format!(
                    "model memory budget of {} bytes is used up by instances in use ({} bytes held)",
                    self.limit,
                    self.used()
                ));
            }
        }
    }

    /// Gives back the bytes of an unloaded (or never loaded) instance.
    pub(super) fn release(&self, bytes: u64) {
        let mut ledger = self.ledger.lock().expect("budget");
        ledger.used = ledger.used.saturating_sub(bytes);
    }
}
