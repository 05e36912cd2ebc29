//! The scaler's Prometheus metrics. Names are part of the deploy contract:
//! the KEDA ScaledObject, the HPA, the alert rules and the dashboard under
//! `deploy/` use them.

use prometheus::{GaugeVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use retro_fleet_worker::metrics::registered;

/// Handles to the scaler's metrics.
#[derive(Clone)]
pub struct ScalerMetrics {
    /// `fleet_recommended_replicas{model}`.
    pub recommended: IntGaugeVec,
    /// `fleet_desired_replicas{model}`: this sample's need before the cool-down.
    pub desired: IntGaugeVec,
    /// `fleet_consumer_lag{stream,consumer}`: pending + ack-pending.
    pub lag: IntGaugeVec,
    /// `fleet_consumer_pending{stream,consumer}`.
    pub pending: IntGaugeVec,
    /// `fleet_consumer_ack_pending{stream,consumer}`.
    pub ack_pending: IntGaugeVec,
    /// `fleet_consumer_redelivered{stream,consumer}`: unacked messages delivered more than once.
    pub redelivered: IntGaugeVec,
    /// `fleet_model_backlog{model,priority}`.
    pub backlog: IntGaugeVec,
    /// `fleet_queue_oldest_wait_seconds{model,priority}`: age of the oldest
    /// request no worker has taken yet (0: none waiting).
    pub oldest_wait: GaugeVec,
    /// `fleet_model_arrival_rate{model}`, requests/s.
    pub arrival: GaugeVec,
    /// `fleet_model_completion_rate{model}`, requests/s.
    pub completion: GaugeVec,
    /// `fleet_model_service_rate{model}`: one worker's, requests/s.
    pub service: GaugeVec,
    /// `fleet_model_drain_seconds{model}`: at current rates; +Inf when not shrinking.
    pub drain: GaugeVec,
    /// `fleet_model_workers{model}`: live workers from the registry.
    pub workers: IntGaugeVec,
    /// `fleet_model_lag_slope{model}`: backlog trend, requests/s.
    pub lag_slope: GaugeVec,
    /// `fleet_model_worker_latency_seconds{model}`: mean backend time the workers report.
    pub latency: GaugeVec,
    /// `fleet_scaler_warning{model,kind}`: 1 while a warning holds.
    pub warning: IntGaugeVec,
    /// `fleet_scaler_anomalies_total{model,signal}`.
    pub anomalies: IntCounterVec,
    /// `fleet_stream_messages{stream}`: messages stored in each fleet stream.
    pub stream_messages: IntGaugeVec,
    /// `fleet_stream_bytes{stream}`: bytes stored in `FLEET_RESULTS` and `FLEET_DLQ`.
    pub stream_bytes: IntGaugeVec,
    /// `fleet_stream_max_bytes{stream}` and `fleet_stream_max_messages{stream}`:
    /// their caps (-1: none).
    pub stream_max_bytes: IntGaugeVec,
    /// See `stream_max_bytes`.
    pub stream_max_messages: IntGaugeVec,
    /// `fleet_registry_workers`: live workers in the registry.
    pub registry_workers: IntGauge,
    /// `fleet_scaler_samples_total{result}`: `ok` or `error`.
    pub samples: IntCounterVec,
}

impl ScalerMetrics {
    /// Creates and registers the metrics on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let ig = |n: &str, h: &str, l: &[&str]| registered(registry, IntGaugeVec::new(Opts::new(n, h), l)?);
        let g = |n: &str, h: &str, l: &[&str]| registered(registry, GaugeVec::new(Opts::new(n, h), l)?);
        let counter = |n: &str, h: &str, l: &[&str]| registered(registry, IntCounterVec::new(Opts::new(n, h), l)?);
        let sc = &["stream", "consumer"];
        Ok(ScalerMetrics {
            recommended: ig("fleet_recommended_replicas", "Worker replicas the scaler recommends", &["model"])?,
            desired: ig("fleet_desired_replicas", "Replicas the latest sample alone asks for", &["model"])?,
            lag: ig("fleet_consumer_lag", "Pending plus unacknowledged messages of a worker consumer", sc)?,
            pending: ig("fleet_consumer_pending", "Messages not yet delivered", sc)?,
            ack_pending: ig("fleet_consumer_ack_pending", "Messages delivered and not yet acknowledged", sc)?,
            redelivered: ig("fleet_consumer_redelivered", "Unacknowledged messages delivered more than once", sc)?,
            backlog: ig("fleet_model_backlog", "Waiting plus unacknowledged requests", &["model", "priority"])?,
            oldest_wait: g(
                "fleet_queue_oldest_wait_seconds",
                "Age of the oldest request no worker has taken yet (0: none waiting)",
                &["model", "priority"],
            )?,
            arrival: g("fleet_model_arrival_rate", "Requests arriving per second", &["model"])?,
            completion: g("fleet_model_completion_rate", "Requests completed per second", &["model"])?,
            service: g("fleet_model_service_rate", "One worker's service rate in requests per second", &["model"])?,
            drain: g("fleet_model_drain_seconds", "Seconds to drain the backlog at current rates", &["model"])?,
            workers: ig("fleet_model_workers", "Live workers serving the model", &["model"])?,
            lag_slope: g("fleet_model_lag_slope", "Backlog trend over the window, requests per second", &["model"])?,
            latency: g("fleet_model_worker_latency_seconds", "Mean backend time reported by workers", &["model"])?,
            warning: ig("fleet_scaler_warning", "1 while a scaler warning holds", &["model", "kind"])?,
            anomalies: counter(
                "fleet_scaler_anomalies_total",
                "Anomalies seen (robust z-score)",
                &["model", "signal"],
            )?,
            stream_messages: ig("fleet_stream_messages", "Messages stored in a fleet stream", &["stream"])?,
            stream_bytes: ig("fleet_stream_bytes", "Bytes stored in a fleet stream", &["stream"])?,
            stream_max_bytes: ig("fleet_stream_max_bytes", "Byte cap of a fleet stream (-1: none)", &["stream"])?,
            stream_max_messages: ig(
                "fleet_stream_max_messages",
                "Message cap of a fleet stream (-1: none)",
                &["stream"],
            )?,
            registry_workers: registered(
                registry,
                IntGauge::new("fleet_registry_workers", "Live workers in the registry")?,
            )?,
            samples: counter("fleet_scaler_samples_total", "Scaler samples", &["result"])?,
        })
    }
}
