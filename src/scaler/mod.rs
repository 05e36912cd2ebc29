//! The scaler: samples every request stream's worker consumers and the
//! worker registry at an interval, computes per model the backlog, arrival
//! and completion rates, one worker's service rate and the time to drain,
//! and recommends a replica count (see [`recommend`]). Recommendations are
//! exported as Prometheus metrics (`fleet_recommended_replicas{model}` is
//! what KEDA or an HPA scales workers on), served at `GET /v1/scaling` and
//! published on `fleet.scaling.<model>`.
//!
//! - [`recommend`]: the pure recommender.
//! - [`stats`]: trend (least-squares slope) and anomaly (robust z-score) helpers.
//! - [`sampler`]: one sample of streams, consumers and registry → per-model reports.
//! - [`metrics`]: the scaler's Prometheus metrics.
//! - [`http`]: `/metrics`, `/health/*`, `/v1/scaling`.
//! - this file: settings and the sampling loop.

pub mod http;
pub mod metrics;
pub mod recommend;
pub mod sampler;
pub mod stats;

use std::future::IntoFuture as _;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
pub use recommend::{recommend, Policy, Reason, Recommendation, Sample, State};
pub use sampler::Sampler;

/// Scaler settings (`[scaler]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScalerConfig {
    /// Time between samples, in ms.
    pub interval_ms: u64,
    /// Window of the lag and latency trends and of the anomaly baseline, in seconds.
    pub window_secs: u64,
    /// Models to recommend for; empty = every model with a worker consumer.
    pub models: Vec<String>,
    /// Fewest replicas while a model has traffic.
    pub min_replicas: u32,
    /// Most replicas ever recommended.
    pub max_replicas: u32,
    /// Capacity kept above the arrival rate (1.25 = 25 % spare).
    pub headroom: f64,
    /// Time within which a backlog should be drained, in seconds.
    pub drain_target_secs: f64,
    /// How long the need must stay lower before scaling down, in seconds.
    pub scale_down_cooldown_secs: f64,
    /// Spare capacity kept over the peak need when scaling down (0.1 = 10 %).
    pub tolerance: f64,
    /// Idle time (no backlog, no arrivals) before zero replicas are
    /// recommended, in seconds; 0 never recommends zero.
    pub idle_to_zero_secs: f64,
    /// Backlog weight of high-priority requests (2 = drained in half the target).
    pub weight_high: f64,
    /// Backlog weight of normal-priority requests.
    pub weight_normal: f64,
    /// Backlog weight of low-priority requests.
    pub weight_low: f64,
    /// One worker's service rate (requests/s) assumed until one is measured
    /// (it is measured whenever requests wait while workers run).
    pub default_service_rate: f64,
    /// Robust z-score above which lag growth or latency is an anomaly.
    pub anomaly_z: f64,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            interval_ms: 5_000,
            window_secs: 300,
            models: Vec::new(),
            min_replicas: 1,
            max_replicas: 20,
            headroom: 1.25,
            drain_target_secs: 60.0,
            scale_down_cooldown_secs: 300.0,
            tolerance: 0.1,
            idle_to_zero_secs: 900.0,
            weight_high: 2.0,
            weight_normal: 1.0,
            weight_low: 0.5,
            default_service_rate: 10.0,
            anomaly_z: stats::ANOMALY_Z,
        }
    }
}

impl ScalerConfig {
    /// The recommender's policy.
    pub fn policy(&self) -> Policy {
        Policy {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas,
            headroom: self.headroom,
            drain_target_secs: self.drain_target_secs,
            scale_down_cooldown_secs: self.scale_down_cooldown_secs,
            tolerance: self.tolerance,
            idle_to_zero_secs: self.idle_to_zero_secs,
            priority_weights: [self.weight_high, self.weight_normal, self.weight_low],
            default_service_rate: self.default_service_rate,
        }
    }
}

/// Samples until `shutdown` fires, publishing every report on
/// `fleet.scaling.<model>` and keeping the latest for `/v1/scaling`.
pub async fn run(client: async_nats::Client, sampler: Arc<Sampler>, shutdown: CancellationToken) {
    let every = Duration::from_millis(sampler.config().interval_ms.max(50));
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(interval = ?every, "scaler sampling");
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        // a sample waiting on a lost connection must not hold up the shutdown
        let sampled = tokio::select! {
            r = sampler.sample() => r,
            _ = shutdown.cancelled() => break,
        };
        match sampled {
            Ok(reports) => {
                for r in reports {
                    let payload = serde_json::to_vec(&r).expect("report is JSON");
                    if let Err(e) =
                        client.publish(retro_fleet_schemas::subjects::scaling(&r.model), payload.into()).await
                    {
                        tracing::debug!(error = %e, "publishing a scaling report failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "scaler sample failed"),
        }
    }
    retro_fleet_worker::final_op(&client, "flush", client.flush()).await;
}

/// `retro-fleet scaler`: the sampling loop plus its HTTP endpoints on
/// `metrics_listen`.
pub async fn serve(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "scaler").await?;
    let registry = crate::telemetry::registry();
    let sampler = Arc::new(Sampler::new(client.clone(), &config, &registry)?);
    let addr = config.metrics_listen.clone().unwrap_or_else(|| "127.0.0.1:9091".into());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding scaler listener {addr}: {e}"))?;
    tracing::info!(addr = %listener.local_addr()?, "scaler listening");
    let app = http::router(http::HttpState { client: client.clone(), registry, sampler: sampler.clone() });
    let server = tokio::spawn(
        axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned()).into_future(),
    );
    run(client, sampler, shutdown).await;
    // its endpoints answer at once; one still waiting on NATS is dropped
    match tokio::time::timeout(retro_fleet_worker::FINAL_OP_TIMEOUT, server).await {
        Ok(r) => r??,
        Err(_) => tracing::warn!("scaler HTTP calls still open at shutdown: closed"),
    }
    Ok(())
}
