//! Worker metrics, registered once per process on the caller's registry.

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use retro_fleet_schemas::{ErrorCode, Priority};

/// Histogram buckets (seconds) for every latency in the fleet, set in one place:
/// from 100 µs (cache hits, echo) to 2 minutes (long generations).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
];

/// Outcomes that do not finish a request (it comes back).
const NOT_FINISHED: &[&str] = &["retried", "nats_error"];

/// Registers `metric` on `registry` and hands it back, so that a metric
/// family is declared, registered and kept in one expression.
pub fn registered<M: Collector + Clone + 'static>(registry: &Registry, metric: M) -> prometheus::Result<M> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// A histogram family over [`LATENCY_BUCKETS`].
pub fn latency(name: &str, help: &str, labels: &[&str]) -> prometheus::Result<HistogramVec> {
    HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)
}

/// The worker's metrics. Each method is one event: it records it (and,
/// where the event is worth a line, logs it) in one place, so call sites
/// never spell label lists.
#[derive(Clone)]
pub struct Metrics {
    /// `fleet_worker_requests_total{priority,model,outcome}`: outcome is `ok` or an error code.
    requests: IntCounterVec,
    /// `fleet_queue_wait_seconds{priority,model}`: publish → picked up by a worker.
    queue_wait: HistogramVec,
    /// `fleet_compute_seconds{priority,model}`: backend time.
    compute: HistogramVec,
    /// `fleet_worker_inflight`: requests being processed.
    pub inflight: IntGauge,
    /// `fleet_dead_letters_total{priority,model,code}`.
    dead_letters: IntCounterVec,
    /// `fleet_worker_naks_total{priority,model}`: retryable failures handed back.
    naks: IntCounterVec,
    /// `fleet_worker_pulled_total{priority}`: messages taken from each class.
    pulled: IntCounterVec,
    /// `fleet_worker_generated_tokens_total{model}`: tokens the backend computed.
    generated: IntCounterVec,
    /// `fleet_time_to_first_token_seconds{priority,model}`: publish → the model's first token.
    ttft: HistogramVec,
    /// `fleet_time_per_output_token_seconds{priority,model}`: first → last token, per token after the first.
    tpot: HistogramVec,
    /// Publish to result, per finished request.
    request: HistogramVec,
}

impl Metrics {
    /// Creates and registers the worker metrics on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            registered(registry, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let latency = |name: &str, help: &str| registered(registry, latency(name, help, &["priority", "model"])?);
        Ok(Metrics {
            requests: counter(
                "fleet_worker_requests_total",
                "Requests finished by workers, by outcome",
                &["priority", "model", "outcome"],
            )?,
            queue_wait: latency("fleet_queue_wait_seconds", "Time from publish to a worker picking the request up")?,
            compute: latency("fleet_compute_seconds", "Backend time per request")?,
            inflight: registered(
                registry,
                IntGauge::new("fleet_worker_inflight", "Requests being processed by this worker")?,
            )?,
            dead_letters: counter(
                "fleet_dead_letters_total",
                "Requests sent to the dead-letter stream",
                &["priority", "model", "code"],
            )?,
            naks: counter(
                "fleet_worker_naks_total",
                "Retryable failures handed back for redelivery",
                &["priority", "model"],
            )?,
            pulled: counter("fleet_worker_pulled_total", "Messages pulled, by priority class", &["priority"])?,
            generated: counter(
                "fleet_worker_generated_tokens_total",
                "Tokens computed by the backend (a resumed generation counts only those after its checkpoint)",
                &["model"],
            )?,
            ttft: latency(
                "fleet_time_to_first_token_seconds",
                "Time from publish to the model's first token (queue wait included; computed answers only)",
            )?,
            request: latency(
                "fleet_publish_to_result_seconds",
                "Time from publish to the result, queue wait included, per finished request",
            )?,
            tpot: latency(
                "fleet_time_per_output_token_seconds",
                "Time per output token after the first, per computed answer of two tokens or more",
            )?,
        })
    }

    /// A message of class `p` was pulled.
    pub fn pulled(&self, p: Priority) {
        self.pulled.with_label_values(&[p.as_str()]).inc();
    }

    /// A request was picked up `queued` after it was published.
    pub fn picked_up(&self, p: Priority, model: &str, queued: Duration) {
        self.queue_wait.with_label_values(&[p.as_str(), model]).observe(queued.as_secs_f64());
    }

    /// The backend worked `took` on a request.
    pub fn computed(&self, p: Priority, model: &str, took: Duration) {
        self.compute.with_label_values(&[p.as_str(), model]).observe(took.as_secs_f64());
    }

    /// The backend computed `tokens` tokens of a completion, the first
    /// `ttft` after the request was published, then one every `tpot`.
    pub fn generated(&self, p: Priority, model: &str, tokens: u32, ttft: Option<Duration>, tpot: Option<Duration>) {
        self.generated.with_label_values(&[model]).inc_by(tokens as u64);
        if let Some(t) = ttft {
            self.ttft.with_label_values(&[p.as_str(), model]).observe(t.as_secs_f64());
        }
        if let Some(t) = tpot {
            self.tpot.with_label_values(&[p.as_str(), model]).observe(t.as_secs_f64());
        }
    }

    /// A request left the worker with `outcome` (`ok`, an error code, ...),
    /// `since_publish` after it was published.
    pub fn finished(&self, p: Priority, model: &str, outcome: &str, since_publish: Duration) {
        self.requests.with_label_values(&[p.as_str(), model, outcome]).inc();
        if !NOT_FINISHED.contains(&outcome) {
            self.request.with_label_values(&[p.as_str(), model]).observe(since_publish.as_secs_f64());
        }
    }

    /// Requests finished with an error, and the cumulative counts of
    /// [`fleet_publish_to_result_seconds`](Self::finished) per bound of
    /// [`LATENCY_BUCKETS`] (one more entry: all of them), since start.
    pub fn failed_and_latency(&self) -> (u64, Vec<u64>) {
        let mut failed = 0;
        for family in self.requests.collect() {
            for m in family.get_metric() {
                let outcome = m.get_label().iter().find(|l| l.name() == "outcome").map_or("", |l| l.value());
                if outcome != "ok" && !NOT_FINISHED.contains(&outcome) {
                    failed += m.get_counter().get_value() as u64;
                }
            }
        }
        let mut counts = vec![0u64; LATENCY_BUCKETS.len() + 1];
        for family in self.request.collect() {
            for m in family.get_metric() {
                let h = m.get_histogram();
                for (c, b) in counts.iter_mut().zip(h.get_bucket()) {
                    *c += b.cumulative_count();
                }
                counts[LATENCY_BUCKETS.len()] += h.get_sample_count();
            }
        }
        (failed, counts)
    }

    /// A retryable failure was handed back for redelivery.
    pub fn handed_back(&self, p: Priority, model: &str) {
        self.naks.with_label_values(&[p.as_str(), model]).inc();
    }

    /// A request is in `FLEET_DLQ` now.
    pub fn dead_lettered(&self, p: Priority, model: &str, code: ErrorCode, id: Option<&str>, message: &str) {
        tracing::warn!(%model, id = id.unwrap_or("-"), code = code.as_str(), %message, "request failed; dead-lettering");
        self.dead_letters.with_label_values(&[p.as_str(), model, code.as_str()]).inc();
    }

    /// Per-model totals read from the metrics: (finished, backend seconds, backend count).
    pub fn per_model_totals(&self) -> BTreeMap<String, (u64, f64, u64)> {
        let mut t: BTreeMap<String, (u64, f64, u64)> = BTreeMap::new();
        for family in self.requests.collect() {
            for m in family.get_metric() {
                let label = |name: &str| {
                    m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_string()).unwrap_or_default()
                };
                if NOT_FINISHED.contains(&label("outcome").as_str()) {
                    continue;
                }
                t.entry(label("model")).or_default().0 += m.get_counter().get_value() as u64;
            }
        }
        for family in self.compute.collect() {
            for m in family.get_metric() {
                let model = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "model")
                    .map(|l| l.value().to_string())
                    .unwrap_or_default();
                let h = m.get_histogram();
                let e = t.entry(model).or_default();
                e.1 += h.get_sample_sum();
                e.2 += h.get_sample_count();
            }
        }
        t
    }
}
