//! The process roles: worker and ingress alone, and `up` (everything in one
//! process, with a local nats-server when none answers).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer::PullConsumer;
use retro_fleet_schemas::{subjects, Priority};
use retro_fleet_worker::cache::ResultCache;
use retro_fleet_worker::{backend, Backend, Worker};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::{ingress, nats, telemetry, topology};

/// Fires `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
            _ = term => tracing::info!("SIGTERM: shutting down"),
        }
        token.cancel();
    });
}

/// Opens the worker's result cache, when enabled.
async fn open_cache(
    config: &Config,
    js: &async_nats::jetstream::Context,
    worker_id: &str,
    registry: &prometheus::Registry,
) -> anyhow::Result<Option<Arc<ResultCache>>> {
    let cfg = &config.worker.cache;
    if !cfg.enabled {
        return Ok(None);
    }
    let mut cache = ResultCache::open(cfg, &config.data_dir, registry).await?;
    if cfg.coalesce_across_workers {
        let wait = std::time::Duration::from_millis(cfg.claim_wait_ms);
        if let Some(claims) = retro_fleet_worker::cache::sync::Claims::open(js, worker_id, wait).await {
            cache = cache.with_claims(claims);
        }
    }
    Ok(Some(Arc::new(cache)))
}

/// Builds a worker for the configured models (topology applied first).
pub async fn build_worker(
    config: &Config,
    client: &async_nats::Client,
    registry: &prometheus::Registry,
) -> anyhow::Result<Worker> {
    let js = async_nats::jetstream::new(client.clone());
    topology::apply(&js, config).await?;
    let served: Vec<String> = if config.worker.models.is_empty() {
        config.models.keys().cloned().collect()
    } else {
        config.worker.models.clone()
    };
    let breakers = retro_fleet_worker::breaker::Board::new(config.worker.breaker.clone(), registry)?;
    let budget = backend::pool::Budget::with_metrics(config.worker.model_memory_bytes, registry)?;
    let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    for name in &served {
        let Some(model) = config.models.get(name) else {
            bail!(
                "worker.models names `{name}`, which is not in [models]; configured: {:?}",
                config.models.keys().collect::<Vec<_>>()
            );
        };
        let loaded = match backend::build(name, model, &breakers, &budget).await {
            Ok(b) => b,
            Err(e) => {
                // the other models still serve; this one answers why it cannot
                tracing::error!(model = %name, error = %e, "model failed to load; its requests get an error result");
                Arc::new(backend::Unavailable::new(name, &e.message)) as Arc<dyn Backend>
            }
        };
        backends.insert(name.clone(), loaded);
    }
    let mut consumers: Vec<(Priority, String, PullConsumer)> = Vec::new();
    for p in Priority::ALL {
        let stream = js.get_stream(subjects::request_stream(p)).await?;
        for name in &served {
            let consumer = stream
                .get_consumer(&subjects::consumer(name))
                .await
                .map_err(|e| anyhow::anyhow!("consumer of `{name}` on {}: {e}", subjects::request_stream(p)))?;
            consumers.push((p, name.clone(), consumer));
        }
    }
    let id = config.worker.id.clone().unwrap_or_else(retro_fleet_worker::default_worker_id);
    let catalog: BTreeSet<String> = config.models.keys().cloned().collect();
    let cache = open_cache(config, &js, &id, registry).await?;
    Ok(Worker::new(
        client.clone(),
        consumers,
        backends,
        catalog,
        id,
        config.worker.clone(),
        config.topology.max_deliver,
        std::time::Duration::from_secs(config.topology.ack_wait_secs),
        cache,
        registry,
    )?
    .with_breakers(breakers))
}

/// Serves `/metrics` and `/health/*` for roles without the ingress.
async fn serve_telemetry(
    addr: &str,
    registry: prometheus::Registry,
    client: async_nats::Client,
    breakers: Option<retro_fleet_worker::breaker::Board>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use axum::routing::get;
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics listener {addr}"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let r = registry.clone();
                async move { telemetry::render(&r) }
            }),
        )
        .route("/health/live", get(|| async { "ok\n" }))
        .route(
            "/health/ready",
            get(move || {
                let (c, b) = (client.clone(), breakers.clone());
                async move { worker_readiness(&c, b.as_ref()) }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    });
    Ok(())
}

/// A worker's readiness: connected to NATS (the client reconnects by
/// itself; pulling resumes when it does), with every breaker's state.
/// Ready while connected and not every model instance is open.
fn worker_readiness(
    client: &async_nats::Client,
    breakers: Option<&retro_fleet_worker::breaker::Board>,
) -> (axum::http::StatusCode, axum::Json<serde_json::Value>) {
    use retro_fleet_worker::breaker::State;
    let connected = client.connection_state() == async_nats::connection::State::Connected;
    let snapshot = breakers.map(|b| b.snapshot()).unwrap_or_default();
    let all_open = !snapshot.is_empty() && snapshot.iter().all(|s| s.state == State::Open);
    let degraded = snapshot.iter().any(|s| s.state != State::Closed);
    let reason = match (connected, all_open) {
        (false, _) => Some("not connected to NATS; reconnecting"),
        (true, true) => Some("every model instance's circuit breaker is open"),
        _ => None,
    };
    let status =
        if reason.is_none() { axum::http::StatusCode::OK } else { axum::http::StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "ready": reason.is_none(),
        "reason": reason,
        "nats": if connected { "connected" } else { "disconnected" },
        "degraded": degraded,
        "breakers": snapshot,
    });
    (status, axum::Json(body))
}

/// `retro-fleet worker`.
pub async fn worker(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = nats::connect(&config.nats, "worker").await?;
    let registry = telemetry::registry();
    let worker = build_worker(&config, &client, &registry).await?;
    if let Some(addr) = &config.metrics_listen {
        serve_telemetry(addr, registry, client.clone(), worker.breakers(), shutdown.clone()).await?;
    }
    worker.run(shutdown).await;
    client.flush().await.ok();
    Ok(())
}

/// `retro-fleet ingress`.
pub async fn ingress(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let client = nats::connect(&config.nats, "ingress").await?;
    let state = ingress::Ingress::new(client.clone(), &config, telemetry::registry()).await?;
    let listener = tokio::net::TcpListener::bind(&config.ingress.listen)
        .await
        .with_context(|| format!("binding {}", config.ingress.listen))?;
    ingress::serve(listener, state, shutdown).await?;
    client.flush().await.ok();
    Ok(())
}

/// `retro-fleet up`: ingress and worker in one process against `nats.url`,
/// starting a local nats-server (store under the data dir) when none answers.
pub async fn up(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut config = config;
    add_demo_model(&mut config)?;
    let local = if nats::answers(&config.nats.url).await {
        tracing::info!(url = %config.nats.url, "using the running NATS server");
        None
    } else {
        let port = port_of(&config.nats.url).unwrap_or(4222);
        let store = config.data_dir.join("nats");
        tracing::info!(port, store = %store.display(), "no NATS server answers; starting a local nats-server");
        let server = nats::LocalServer::start(&store, port).await?;
        config.nats.url = server.url.clone();
        Some(server)
    };
    let client = nats::connect(&config.nats, "up").await?;
    let registry = telemetry::registry();
    let worker = build_worker(&config, &client, &registry).await?;
    let registry_for_scaler = registry.clone();
    let state = ingress::Ingress::new(client.clone(), &config, registry).await?;
    let listener = tokio::net::TcpListener::bind(&config.ingress.listen)
        .await
        .with_context(|| format!("binding {}", config.ingress.listen))?;
    let addr = listener.local_addr()?;
    let models: Vec<&String> = config.models.keys().collect();
    eprintln!("retro-fleet is up: http://{addr} (models: {models:?}, NATS: {}). Ctrl-C stops it.", config.nats.url);
    let ingress_task = tokio::spawn(ingress::serve(listener, state, shutdown.clone()));
    let scaler_task = tokio::spawn(up_scaler(config.clone(), client.clone(), registry_for_scaler, shutdown.clone()));
    worker.run(shutdown).await;
    ingress_task.await??;
    scaler_task.await.ok();
    client.flush().await.ok();
    drop(client);
    if let Some(server) = local {
        server.stop().await;
    }
    Ok(())
}

/// The scaler inside `up`: its metrics join the process registry (served by
/// the ingress at `/metrics`); `/v1/scaling` is served on `metrics_listen`
/// when that address is free (a busy port only costs that endpoint).
async fn up_scaler(
    config: Config,
    client: async_nats::Client,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
) {
    let sampler = match crate::scaler::Sampler::new(client.clone(), &config, &registry) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "scaler metrics could not be registered; no scaler in this process");
            return;
        }
    };
    if let Some(addr) = &config.metrics_listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let app = crate::scaler::http::router(crate::scaler::http::HttpState {
                    client: client.clone(),
                    registry,
                    sampler: sampler.clone(),
                });
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
                });
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot serve /v1/scaling (metrics_listen busy); the scaler still runs")
            }
        }
    }
    crate::scaler::run(client, sampler, shutdown).await;
}

/// With no model configured (only the built-in `echo`), `up` also serves
/// `tiny`: a small random-weights Llama written under the data dir, so the
/// quick start answers with a real model and nothing is downloaded.
fn add_demo_model(config: &mut Config) -> anyhow::Result<()> {
    if !cfg!(feature = "mistralrs") || config.models != retro_fleet_worker::config::default_models() {
        return Ok(());
    }
    let dir = config.data_dir.join("models").join("tiny");
    if !dir.join("model.safetensors").exists() {
        retro_fleet_worker::tiny_model::write(&dir, &Default::default())
            .with_context(|| format!("writing the demo model to {}", dir.display()))?;
    }
    config.models.insert("tiny".into(), retro_fleet_worker::ModelConfig::mistralrs(dir, 64));
    Ok(())
}

fn port_of(url: &str) -> Option<u16> {
    let first = url.split(',').next()?.trim();
    first.rsplit(':').next()?.trim_end_matches('/').parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn port_of_urls() {
        assert_eq!(super::port_of("nats://127.0.0.1:4333"), Some(4333));
        assert_eq!(super::port_of("nats://a:1,nats://b:2"), Some(1));
        assert_eq!(super::port_of("nats://host"), None);
    }
}
