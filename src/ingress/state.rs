//! The state every handler shares, and the ingress's metric handles. It
//! only holds them: [`Ingress::new`](super::Ingress::new) in the module root
//! builds it, so the handler modules import this module and nothing here
//! imports them back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use async_nats::jetstream;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use retro_fleet_worker::metrics::{latency, registered};

use super::config::IngressConfig;
use super::replies::Replies;
use super::{answers, auth, ratelimit, shutdown};

/// Ingress metrics.
#[derive(Clone)]
pub struct IngressMetrics {
    /// `fleet_http_requests_total{route,status}`.
    pub http: IntCounterVec,
    /// `fleet_request_duration_seconds{priority,model,outcome}`: end to end, as the HTTP caller sees it.
    pub e2e: HistogramVec,
    /// `fleet_ingress_published_total{priority}`.
    pub published: IntCounterVec,
    /// `fleet_ingress_unclaimed_replies_total`: replies that arrived after their caller left.
    pub unclaimed: IntCounter,
    /// `fleet_ingress_denied_total{class,reason}`: refused by the guard
    /// (`login_throttled`, `unauthenticated`, `forbidden`, `rate_limited`,
    /// `token_limited`, `budget_exceeded`).
    pub denied: IntCounterVec,
    /// `fleet_ingress_connections_refused_total{reason}`: connections
    /// closed at once at a connection cap (`max_open`, `max_per_peer`).
    pub connections_refused: IntCounterVec,
    /// `fleet_batch_lines_total{outcome}`: lines of file batches finished
    /// by this ingress's runners (`completed`, `failed`).
    pub batch_lines: IntCounterVec,
    /// `fleet_batches_running`: file batches this ingress runs.
    pub batches_running: IntGauge,
    /// `fleet_batch_lines_in_flight`: their lines sent and not finished.
    pub batch_in_flight: IntGauge,
}

impl IngressMetrics {
    /// Makes the handles and registers them.
    pub(super) fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |n: &str, h: &str, l: &[&str]| registered(registry, IntCounterVec::new(Opts::new(n, h), l)?);
        Ok(IngressMetrics {
            http: counter("fleet_http_requests_total", "HTTP requests by route and status", &["route", "status"])?,
            e2e: registered(
                registry,
                latency(
                    "fleet_request_duration_seconds",
                    "End-to-end latency of synchronous calls",
                    &["priority", "model", "outcome"],
                )?,
            )?,
            published: counter("fleet_ingress_published_total", "Requests published", &["priority"])?,
            unclaimed: registered(
                registry,
                IntCounter::new("fleet_ingress_unclaimed_replies_total", "Replies nobody waited for any more")?,
            )?,
            denied: counter(
                "fleet_ingress_denied_total",
                "Requests refused by authentication, roles or rate limits",
                &["class", "reason"],
            )?,
            connections_refused: counter(
                "fleet_ingress_connections_refused_total",
                "Connections closed at once at a connection cap",
                &["reason"],
            )?,
            batch_lines: counter(
                "fleet_batch_lines_total",
                "Lines of file batches finished by this ingress's runners",
                &["outcome"],
            )?,
            batches_running: registered(
                registry,
                IntGauge::new("fleet_batches_running", "File batches this ingress runs")?,
            )?,
            batch_in_flight: registered(
                registry,
                IntGauge::new("fleet_batch_lines_in_flight", "Lines of running file batches sent and not finished")?,
            )?,
        })
    }
}

/// State shared by every handler.
pub struct Ingress {
    /// Core client.
    pub client: async_nats::Client,
    /// JetStream context.
    pub js: jetstream::Context,
    /// Settings.
    pub cfg: IngressConfig,
    /// Models the fleet serves.
    pub models: BTreeSet<String>,
    /// Each model's `max_tokens` default, where it has one (token estimates).
    pub output_defaults: BTreeMap<String, u64>,
    /// Failed credentials per peer address.
    pub logins: ratelimit::logins::FailedLogins,
    /// The reply inbox.
    pub replies: Replies,
    /// Metrics handles.
    pub metrics: IngressMetrics,
    /// Registry rendered at `/metrics`.
    pub registry: Registry,
    /// Checks credentials.
    pub auth: auth::Authenticator,
    /// Rate limits.
    pub limits: ratelimit::Limiter,
    /// Batch records (KV `fleet_batches`).
    pub batches: async_nats::jetstream::kv::Store,
    /// The Files API's Object Store (`fleet_files`).
    pub files: async_nats::jetstream::object_store::ObjectStore,
    /// The configuration with secrets redacted (`/v1/admin/config`).
    pub config_view: serde_json::Value,
    /// Registry entries older than this are not live (`/v1/admin/workers`).
    pub worker_ttl_secs: u64,
    /// The longest a result is kept (`topology.results_max_age_secs`): the
    /// most an `X-Result-Ttl` may ask for.
    pub results_max_age_secs: u64,
    /// Metering (`topology.metering`): an answer from this ingress's memory
    /// is metered here, as a worker meters the results it stores.
    pub meter: Option<Arc<retro_fleet_worker::usage::Meter>>,
    /// Tenants' and keys' budgets, counted from the metered usage (with
    /// metering on).
    pub budgets: Option<Arc<super::budgets::Budgets>>,
    /// The OpenAPI document (`/openapi.json`).
    pub openapi: serde_json::Value,
    /// Recent cacheable answers, served to identical calls without a queue.
    pub answers: Arc<answers::AnswerCache>,
    /// The drain on shutdown (`ingress.drain_timeout_ms`).
    pub drain: shutdown::Drain,
    /// What the console shows, sampled while someone watches.
    pub watch: super::watch::Watch,
}

impl Ingress {
    /// [`estimated_tokens`](super::submit::validate::estimated_tokens)
    /// with the model's own `max_tokens` default (else
    /// `rate_limit.default_max_tokens`).
    pub fn estimated_tokens(&self, req: &retro_fleet_schemas::InferRequest) -> u64 {
        let default = self.output_defaults.get(&req.model).copied().unwrap_or(self.limits.default_max_tokens());
        super::submit::validate::estimated_tokens(req, default)
    }
}

/// Handle to the shared state.
pub type AppState = Arc<Ingress>;
