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
//! - this file: the sampling loop and the `scaler` role.

pub mod http;
pub mod metrics;
pub mod recommend;
pub mod sampler;
pub mod stats;

use std::future::IntoFuture as _;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use recommend::{recommend, Policy, Reason, Recommendation, Sample, State};
pub use sampler::Sampler;

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

/// What `retro-fleet scaler` runs with.
pub struct Setup {
    /// Where NATS is.
    pub nats: crate::nats::NatsConfig,
    /// `[scaler]`.
    pub policy: Policy,
    /// How long a worker stays in the registry after its last heartbeat.
    pub worker_ttl_secs: u64,
    /// Where `/metrics`, `/health/*` and `/v1/scaling` are served.
    pub listen: String,
}

/// `retro-fleet scaler`: the sampling loop plus its HTTP endpoints on
/// `metrics_listen`.
pub async fn serve(setup: Setup, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = crate::nats::connect(&setup.nats, "scaler").await?;
    let registry = crate::telemetry::registry();
    let sampler = Arc::new(Sampler::new(client.clone(), setup.policy, setup.worker_ttl_secs, &registry)?);
    let addr = setup.listen;
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
