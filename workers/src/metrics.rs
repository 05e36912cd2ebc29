//! Worker metrics, registered once per process on the caller's registry.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// Histogram buckets (seconds) for every latency in the fleet, set in one place:
/// from 100 µs (cache hits, echo) to 2 minutes (long generations).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
];

/// Handles to the worker's metrics.
#[derive(Clone)]
pub struct Metrics {
    /// `fleet_worker_requests_total{priority,model,outcome}`: outcome is `ok` or an error code.
    pub requests: IntCounterVec,
    /// `fleet_queue_wait_seconds{priority,model}`: publish → picked up by a worker.
    pub queue_wait: HistogramVec,
    /// `fleet_compute_seconds{priority,model}`: backend time.
    pub compute: HistogramVec,
    /// `fleet_worker_inflight`: requests being processed.
    pub inflight: IntGauge,
    /// `fleet_dead_letters_total{priority,model,code}`.
    pub dead_letters: IntCounterVec,
    /// `fleet_worker_naks_total{priority,model}`: retryable failures handed back.
    pub naks: IntCounterVec,
    /// `fleet_worker_pulled_total{priority}`: messages taken from each class.
    pub pulled: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the worker metrics on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new("fleet_worker_requests_total", "Requests finished by workers, by outcome"),
                &["priority", "model", "outcome"],
            )?,
            queue_wait: HistogramVec::new(
                HistogramOpts::new("fleet_queue_wait_seconds", "Time from publish to a worker picking the request up")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["priority", "model"],
            )?,
            compute: HistogramVec::new(
                HistogramOpts::new("fleet_compute_seconds", "Backend time per request")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["priority", "model"],
            )?,
            inflight: IntGauge::new("fleet_worker_inflight", "Requests being processed by this worker")?,
            dead_letters: IntCounterVec::new(
                Opts::new("fleet_dead_letters_total", "Requests sent to the dead-letter stream"),
                &["priority", "model", "code"],
            )?,
            naks: IntCounterVec::new(
                Opts::new("fleet_worker_naks_total", "Retryable failures handed back for redelivery"),
                &["priority", "model"],
            )?,
            pulled: IntCounterVec::new(
                Opts::new("fleet_worker_pulled_total", "Messages pulled, by priority class"),
                &["priority"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.queue_wait.clone()))?;
        registry.register(Box::new(m.compute.clone()))?;
        registry.register(Box::new(m.inflight.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.naks.clone()))?;
        registry.register(Box::new(m.pulled.clone()))?;
        Ok(m)
    }
}
