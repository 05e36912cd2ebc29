//! The process roles: worker and ingress alone, and `up` (everything in one
//! process, with a local nats-server when none answers).

use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal as _;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer::PullConsumer;
use retro_fleet_schemas::{subjects, Priority};
use retro_fleet_worker::cache::ResultCache;
use retro_fleet_worker::checkpoint::Checkpoints;
use retro_fleet_worker::usage::Meter;
use retro_fleet_worker::{backend, Backend, Worker};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::{ingress, nats, telemetry, topology};

/// How a serving role ended, for its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Everything taken was finished (or handed back): exit 0.
    Clean,
    /// Work was abandoned within the shutdown bound (its messages are
    /// redelivered by JetStream, or HTTP calls were answered 503): exit
    /// [`Exit::ABANDONED`].
    Abandoned,
}

impl Exit {
    /// Exit code after a bounded shutdown that abandoned work (EX_TEMPFAIL:
    /// what was abandoned comes back, from JetStream or the caller's retry).
    pub const ABANDONED: u8 = 75;

    /// Clean when `clean`, else abandoned.
    pub fn of(clean: bool) -> Exit {
        if clean {
            Exit::Clean
        } else {
            Exit::Abandoned
        }
    }

    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Clean => 0,
            Exit::Abandoned => Exit::ABANDONED,
        }
    }
}

/// The two signals that stop a serving role.
#[derive(Debug, Clone, Copy)]
enum Stop {
    Interrupt,
    Terminate,
}

impl Stop {
    fn name(self) -> &'static str {
        match self {
            Stop::Interrupt => "Ctrl-C",
            Stop::Terminate => "SIGTERM",
        }
    }

    /// 128 + the signal's number, as shells report a death by it.
    fn exit_code(self) -> i32 {
        match self {
            Stop::Interrupt => 130,
            Stop::Terminate => 143,
        }
    }
}

/// Waits for the next Ctrl-C (SIGINT) or SIGTERM.
#[cfg(unix)]
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
    }

    async fn next(&mut self) -> Stop {
        tokio::select! {
            _ = self.int.recv() => Stop::Interrupt,
            _ = self.term.recv() => Stop::Terminate,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Signals> {
        Ok(Signals)
    }

    async fn next(&mut self) -> Stop {
        let _ = tokio::signal::ctrl_c().await;
        Stop::Interrupt
    }
}

/// Fires `token` on the first Ctrl-C or SIGTERM (the role then drains,
/// bounded); a second one exits at once with 130 or 143.
pub fn cancel_on_signal(token: CancellationToken) {
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for signals; stop the process with SIGKILL");
            return;
        }
    };
    tokio::spawn(async move {
        let first = signals.next().await;
        tracing::info!("{}: shutting down (again to exit at once)", first.name());
        token.cancel();
        let second = signals.next().await;
        tracing::warn!("{} again: exiting at once; unfinished work is redelivered by JetStream", second.name());
        std::process::exit(second.exit_code());
    });
}

/// `fut`, unless `shutdown` fires first (then `None`): a signal while a
/// role starts (connecting, loading models) stops it at once.
async fn unless_stopped<T>(shutdown: &CancellationToken, fut: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::select! {
        r = fut => Some(r),
        _ = shutdown.cancelled() => None,
    }
}

/// A shutdown's last flush of what the client still holds (bounded).
async fn final_flush(client: &async_nats::Client) {
    retro_fleet_worker::final_op(client, "flush", client.flush()).await;
}

async fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))
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

/// The meter of this process, when metering is on: one per process, shared
/// by its worker and ingress, writing through `js` (the fleet's streams).
fn meter(
    config: &Config,
    js: async_nats::jetstream::Context,
    registry: &prometheus::Registry,
) -> anyhow::Result<Option<Arc<Meter>>> {
    if !config.topology.metering {
        return Ok(None);
    }
    Ok(Some(Arc::new(Meter::new(js, registry, config.topology.usage_tenant_labels)?)))
}

/// Builds a worker for the configured models (topology applied first),
/// metering with `meter`.
pub async fn build_worker(
    config: &Config,
    client: &async_nats::Client,
    registry: &prometheus::Registry,
    meter: Option<Arc<Meter>>,
) -> anyhow::Result<Worker> {
    let js = async_nats::jetstream::new(client.clone());
    topology::apply(&js, &config.topology_plan()).await?;
    let served: Vec<String> = if config.worker.models.is_empty() {
        config.models.keys().cloned().collect()
    } else {
        config.worker.models.clone()
    };
    let breakers = retro_fleet_worker::breaker::Board::new(config.worker.breaker.clone(), registry)?;
    let budget = backend::pool::Budget::with_metrics(config.worker.model_memory_bytes, registry)?;
    // a one-thread runtime (`retro-fleet worker`) loads weights on a thread of its own
    let load_on = backend::pool::LoadOn::for_current_runtime();
    let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    let mut load_ms = std::collections::BTreeMap::new();
    for name in &served {
        let Some(model) = config.models.get(name) else {
            bail!(
                "worker.models names `{name}`, which is not in [models]; configured: {:?}",
                config.models.keys().collect::<Vec<_>>()
            );
        };
        let started = std::time::Instant::now();
        let loaded = match backend::build_on(name, model, &breakers, &budget, &load_on).await {
            Ok(b) => {
                load_ms.insert(name.clone(), started.elapsed().as_millis() as u64);
                b
            }
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
    let worker = Worker::new(
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
    .with_meter(meter)
    .with_archive(config.topology.archive_max_age_secs > 0)
    .with_breakers(breakers)
    .with_load_times(load_ms);
    Ok(match config.worker.checkpoint_interval_ms {
        0 => worker,
        ms => {
            let kv = topology::open_bucket(&js, topology::checkpoints_bucket(&config.topology)).await?;
            worker.with_checkpoints(Checkpoints::new(kv, std::time::Duration::from_millis(ms)))
        }
    })
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
pub async fn worker(config: Config, shutdown: CancellationToken) -> anyhow::Result<Exit> {
    let start = async {
        let client = nats::connect(&config.nats, "worker").await?;
        let registry = telemetry::registry();
        let meter = meter(&config, async_nats::jetstream::new(client.clone()), &registry)?;
        let worker = build_worker(&config, &client, &registry, meter).await?;
        anyhow::Ok((client, registry, worker))
    };
    let Some(started) = unless_stopped(&shutdown, start).await else { return Ok(Exit::Clean) };
    let (client, registry, worker) = started?;
    if let Some(addr) = &config.metrics_listen {
        serve_telemetry(addr, registry, client.clone(), worker.breakers(), shutdown.clone()).await?;
    }
    let drained = worker.run(shutdown).await;
    final_flush(&client).await;
    Ok(Exit::of(drained.clean()))
}

/// `retro-fleet scaler`.
pub async fn scaler(config: Config, shutdown: CancellationToken) -> anyhow::Result<Exit> {
    let setup = crate::scaler::Setup {
        nats: config.nats,
        policy: config.scaler,
        worker_ttl_secs: config.topology.worker_ttl_secs,
        listen: config.metrics_listen.unwrap_or_else(|| "127.0.0.1:9091".into()),
    };
    crate::scaler::serve(setup, shutdown).await.map(|()| Exit::Clean)
}

/// What the ingress takes from the whole configuration.
fn ingress_setup(config: &Config, meter: Option<Arc<Meter>>) -> ingress::config::Setup {
    ingress::config::Setup {
        ingress: config.ingress.clone(),
        plan: config.topology_plan(),
        output_defaults: config
            .models
            .iter()
            .filter_map(|(name, m)| Some((name.clone(), u64::from(m.default_max_tokens()?))))
            .collect(),
        config_view: serde_json::to_value(config.redacted()).unwrap_or(serde_json::Value::Null),
        meter,
    }
}

/// `retro-fleet ingress`.
pub async fn ingress(config: Config, shutdown: CancellationToken) -> anyhow::Result<Exit> {
    let start = async {
        let client = nats::connect(&config.nats, "ingress").await?;
        let js = config.nats.jetstream(client.clone());
        let registry = telemetry::registry();
        let meter = meter(&config, js.clone(), &registry)?;
        let state = ingress::Ingress::new(client.clone(), js, ingress_setup(&config, meter), registry).await?;
        let listener = bind(&config.ingress.listen).await?;
        anyhow::Ok((client, state, listener))
    };
    let Some(started) = unless_stopped(&shutdown, start).await else { return Ok(Exit::Clean) };
    let (client, state, listener) = started?;
    let cut_short = ingress::serve(listener, state, shutdown).await?;
    final_flush(&client).await;
    Ok(Exit::of(cut_short == 0))
}

/// `retro-fleet up`: ingress and worker in one process against `nats.url`,
/// starting a local nats-server (store under the data dir) when none answers.
pub async fn up(config: Config, shutdown: CancellationToken) -> anyhow::Result<Exit> {
    let mut config = config;
    add_demo_model(&mut config)?;
    let listener = bind(&config.ingress.listen).await?;
    let addr = listener.local_addr()?;
    greet_starting(addr);
    let Some(local) = unless_stopped(&shutdown, local_nats(&mut config)).await else { return Ok(Exit::Clean) };
    let local = local?;
    let start = async {
        let client = nats::connect(&config.nats, "up").await?;
        let registry = telemetry::registry();
        let js = config.nats.jetstream(client.clone());
        let meter = meter(&config, js.clone(), &registry)?;
        let worker = build_worker(&config, &client, &registry, meter.clone()).await?;
        let state = ingress::Ingress::new(client.clone(), js, ingress_setup(&config, meter), registry.clone()).await?;
        anyhow::Ok((client, registry, worker, state))
    };
    let Some(started) = unless_stopped(&shutdown, start).await else {
        if let Some(server) = local {
            server.stop().await;
        }
        return Ok(Exit::Clean);
    };
    let (client, registry, worker, state) = started?;
    greet_ready(addr, &config);
    let ingress_task = tokio::spawn(ingress::serve(listener, state, shutdown.clone()));
    let scaler_task = tokio::spawn(up_scaler(config.clone(), client.clone(), registry, shutdown.clone()));
    let drained = worker.run(shutdown).await;
    let cut_short = ingress_task.await??;
    // the scaler stops at once on shutdown; its last flush is bounded
    let _ = tokio::time::timeout(retro_fleet_worker::FINAL_OP_TIMEOUT * 2, scaler_task).await;
    final_flush(&client).await;
    drop(client);
    if let Some(server) = local {
        server.stop().await;
    }
    Ok(Exit::of(drained.clean() && cut_short == 0))
}

/// The NATS server `up` uses: the one answering at `nats.url`, or a local
/// one it starts (and `config.nats.url` then points at).
async fn local_nats(config: &mut Config) -> anyhow::Result<Option<nats::LocalServer>> {
    if nats::answers(&config.nats.url).await {
        tracing::info!(url = %nats::redact_url(&config.nats.url), "using the running NATS server");
        return Ok(None);
    }
    let port = port_of(&config.nats.url).unwrap_or(4222);
    let store = config.data_dir.join("nats");
    tracing::info!(port, store = %store.display(), "no NATS server answers; starting a local nats-server");
    let server = nats::LocalServer::start(&store, port).await?;
    config.nats.url = server.url.clone();
    Ok(Some(server))
}

/// The first line of `up`: where it will listen, before models load.
fn greet_starting(addr: std::net::SocketAddr) {
    if std::io::stderr().is_terminal() {
        eprintln!("retro-fleet up: starting on http://{addr} (loading models; Ctrl-C stops it)");
    }
}

/// Says where the fleet listens and how to try it: a few plain lines on a
/// terminal, one log line otherwise.
fn greet_ready(addr: std::net::SocketAddr, config: &Config) {
    let models: Vec<&str> = config.models.keys().map(String::as_str).collect();
    let nats_url = nats::redact_url(&config.nats.url);
    if !std::io::stderr().is_terminal() {
        tracing::info!(url = %format!("http://{addr}"), ?models, nats = %nats_url, "retro-fleet is up");
        return;
    }
    let model = if models.contains(&"echo") { "echo" } else { models.first().copied().unwrap_or("echo") };
    let mut lines = vec![
        format!("retro-fleet is up on http://{addr} (models: {}; NATS: {nats_url})", models.join(", ")),
        "  try it:".to_string(),
        format!("    curl -s {addr}/v1/infer -d '{{\"model\":\"{model}\",\"prompt\":\"hello fleet\"}}'"),
    ];
    if models.contains(&"tiny") {
        lines.push(format!(
            "    curl -s {addr}/v1/chat/completions -H 'content-type: application/json' \\\n      \
             -d '{{\"model\":\"tiny\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"max_tokens\":8}}'"
        ));
    }
    lines.push(format!("  metrics: http://{addr}/metrics   API: http://{addr}/openapi.json"));
    lines.push("  Ctrl-C drains and stops it; a second Ctrl-C exits at once.".to_string());
    eprintln!("{}", lines.join("\n"));
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
    let sampler =
        crate::scaler::Sampler::new(client.clone(), config.scaler.clone(), config.topology.worker_ttl_secs, &registry);
    let sampler = match sampler {
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
