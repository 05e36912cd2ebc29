//! The pull loop.
//!
//! Every consumer the worker serves has a continuous pull stream with a
//! small prefetch (the server pushes messages as they arrive, as the bare
//! JetStream floor does); the loop takes one free slot at a time (bounded by
//! `max_inflight`), asks the [`Scheduler`] which class goes first, and takes
//! the next message already waiting in that class's streams; if none is
//! waiting anywhere it waits for the first arrival. Each message is processed
//! in its own task holding its slot. Prefetch bounds priority inversion: at
//! most `prefetch` lower-class messages wait in the worker while higher ones
//! arrive, and lower classes keep their guaranteed share.
//!
//! Shutdown is an argument: when it fires the loop stops taking messages,
//! hands prefetched ones back (nak, so other workers get them at once),
//! waits for in-flight work up to the drain timeout, and returns. An
//! operator's drain ([`crate::control`]) does the same without returning:
//! the loop closes its pull streams and waits until it is resumed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::AckKind;
use futures::{FutureExt, StreamExt};
use retro_fleet_schemas::Priority;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::config::WorkerConfig;
use crate::metrics::Metrics;
use crate::process::{self, Shared};
use crate::scheduler::Scheduler;

/// Errors that stop a worker from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The configuration cannot work.
    #[error("invalid worker configuration: {0}")]
    Config(String),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// One consumer the worker pulls from.
struct Source {
    priority: Priority,
    model: String,
    consumer: PullConsumer,
}

/// A source's open pull stream (reopened when it ends).
struct Pulling {
    priority: Priority,
    model: String,
    consumer: PullConsumer,
    prefetch: usize,
    expires: Duration,
    stream: Option<pull::Stream>,
}

impl Pulling {
    async fn open(&mut self) {
        if self.stream.is_none() {
            match self.consumer.stream().max_messages_per_batch(self.prefetch).expires(self.expires).messages().await {
                Ok(s) => self.stream = Some(s),
                Err(e) => {
                    tracing::warn!(priority = %self.priority, model = %self.model, error = %e, "opening the pull stream failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// The next message if one is already here.
    fn ready(&mut self) -> Option<async_nats::jetstream::Message> {
        let stream = self.stream.as_mut()?;
        match stream.next().now_or_never()? {
            Some(Ok(m)) => Some(m),
            Some(Err(e)) => {
                tracing::debug!(priority = %self.priority, error = %e, "pull stream error");
                None
            }
            None => {
                self.stream = None;
                None
            }
        }
    }
}

/// Hands prefetched messages back (so other workers take them now instead
/// of after ack_wait) and closes the pull streams. Returns how many were
/// handed back and how many could not be (NATS gone or not answering: those
/// come back after ack_wait).
async fn hand_back(pulling: &mut [Vec<Pulling>; 3], client: &async_nats::Client) -> (usize, usize) {
    let (mut handed_back, mut kept) = (0, 0);
    for p in pulling.iter_mut().flatten() {
        while let Some(msg) = p.ready() {
            match crate::shutdown::final_op(client, "hand back a prefetched message", msg.ack_with(AckKind::Nak(None)))
                .await
            {
                Some(Ok(())) => handed_back += 1,
                _ => kept += 1,
            }
        }
        p.stream = None;
    }
    (handed_back, kept)
}

/// What a worker's shutdown left behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Drained {
    /// Prefetched messages handed back (nak): other workers took them at once.
    pub handed_back: usize,
    /// Messages JetStream will redeliver after `ack_wait`: requests still
    /// running when the drain timeout passed, and prefetched ones that could
    /// not be handed back.
    pub redelivered: usize,
}

impl Drained {
    /// Whether every request this worker took was finished or handed back.
    pub fn clean(&self) -> bool {
        self.redelivered == 0
    }
}

/// A worker bound to its consumers and backends.
pub struct Worker {
    shared: Arc<Shared>,
    sources: [Vec<Source>; 3],
    breakers: Option<crate::breaker::Board>,
}

impl Worker {
    /// Creates a worker. `consumers` are `(priority, model, consumer)` for the
    /// models in `backends`; `catalog` is every model the fleet configures.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: async_nats::Client,
        consumers: Vec<(Priority, String, PullConsumer)>,
        backends: HashMap<String, Arc<dyn Backend>>,
        catalog: BTreeSet<String>,
        worker_id: String,
        cfg: WorkerConfig,
        max_deliver: i64,
        ack_wait: Duration,
        cache: Option<Arc<crate::cache::ResultCache>>,
        registry: &prometheus::Registry,
    ) -> Result<Worker, WorkerError> {
        cfg.check().map_err(WorkerError::Config)?;
        if consumers.is_empty() {
            return Err(WorkerError::Config("no consumers: the worker serves no model".into()));
        }
        let mut sources: [Vec<Source>; 3] = Default::default();
        for (priority, model, consumer) in consumers {
            sources[priority.index()].push(Source { priority, model, consumer });
        }
        let js = async_nats::jetstream::new(client.clone());
        let pace = crate::process::chunks::Pace::new(
            Duration::from_millis(cfg.stream_interval_ms.min(crate::config::MAX_INTERVAL_MS)),
            cfg.stream_chunks_per_sec,
        );
        let shared = Shared {
            pace,
            client,
            js,
            backends,
            catalog,
            worker_id,
            cfg,
            metrics: Metrics::new(registry)?,
            max_deliver,
            ack_wait,
            cache,
            checkpoints: None,
            cancels: Default::default(),
            quiet: tokio::sync::watch::Sender::new(false),
            load_ms: Default::default(),
            meter: None,
        };
        Ok(Worker { shared: Arc::new(shared), sources, breakers: None })
    }

    /// Writes checkpoints of running generations to `checkpoints`, and
    /// resumes redelivered requests from them.
    pub fn with_checkpoints(mut self, checkpoints: crate::checkpoint::Checkpoints) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("checkpoints are attached before the worker runs");
        shared.checkpoints = Some(checkpoints);
        self
    }

    /// Meters each answered request with `meter` (`FLEET_USAGE`, which
    /// `topology apply` creates).
    pub fn with_meter(mut self, meter: Option<Arc<crate::usage::Meter>>) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("metering is set before the worker runs");
        shared.meter = meter;
        self
    }

    /// Records how long each model took to load (for the registry).
    pub fn with_load_times(mut self, load_ms: std::collections::BTreeMap<String, u64>) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("load times are attached before the worker runs");
        shared.load_ms = load_ms;
        self
    }

    /// Attaches the circuit breakers of this worker's backends (for health).
    pub fn with_breakers(mut self, breakers: crate::breaker::Board) -> Self {
        self.breakers = Some(breakers);
        self
    }

    /// The circuit breakers of this worker's backends, if attached.
    pub fn breakers(&self) -> Option<crate::breaker::Board> {
        self.breakers.clone()
    }

    /// The models this worker serves.
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self.shared.backends.keys().cloned().collect();
        m.sort();
        m
    }

    /// Pulls and processes until `shutdown` fires, then drains in-flight
    /// work (bounded by `drain_timeout_ms`; the final NATS operations by
    /// [`crate::shutdown::FINAL_OP_TIMEOUT`] each) and says what it left behind.
    pub async fn run(self, shutdown: CancellationToken) -> Drained {
        let cfg = &self.shared.cfg;
        let slots = Arc::new(Semaphore::new(cfg.max_inflight));
        let tasks = TaskTracker::new();
        let mut scheduler = Scheduler::new(cfg.normal_share, cfg.low_share);
        tracing::info!(worker = %self.shared.worker_id, models = ?self.models(), max_inflight = cfg.max_inflight, "worker pulling");
        let stop_sweeper = shutdown.child_token();
        if let Some(cache) = &self.shared.cache {
            self.start_cache(cache.clone(), stop_sweeper.clone()).await;
        }
        // cancels are heard until in-flight work has drained
        let stop_cancels = CancellationToken::new();
        tokio::spawn(crate::cancel::listen(
            self.shared.client.clone(),
            self.shared.cancels.clone(),
            stop_cancels.clone(),
        ));
        if cfg.unrouted_sweep_ms > 0 {
            let every = Duration::from_millis(cfg.unrouted_sweep_ms);
            tokio::spawn(crate::sweeper::run(self.shared.clone(), every, stop_sweeper.clone()));
        }
        tokio::spawn(crate::control::listen(
            self.shared.client.clone(),
            self.shared.worker_id.clone(),
            self.shared.quiet.clone(),
            self.shared.metrics.inflight.clone(),
            stop_cancels.clone(),
        ));
        let mut quiet = self.shared.quiet.subscribe();
        let stop_heartbeat = CancellationToken::new();
        let heartbeat = (cfg.heartbeat_ms > 0).then(|| {
            let every = Duration::from_millis(cfg.heartbeat_ms);
            tokio::spawn(crate::heartbeat::run(self.shared.clone(), every, shutdown.clone(), stop_heartbeat.clone()))
        });
        // High prefetches a full batch; lower classes a quarter of one, which
        // bounds how many of them wait in the worker while high work arrives.
        let mut pulling: [Vec<Pulling>; 3] = Default::default();
        for (i, group) in self.sources.iter().enumerate() {
            for s in group {
                let prefetch = if i == 0 { cfg.batch_size } else { (cfg.batch_size / 4).max(4) };
                pulling[i].push(Pulling {
                    priority: s.priority,
                    model: s.model.clone(),
                    consumer: s.consumer.clone(),
                    prefetch,
                    expires: Duration::from_millis(cfg.idle_wait_ms.max(100)),
                    stream: None,
                });
            }
        }
        let mut rotation = 0usize;

        'pull: loop {
            if *quiet.borrow_and_update() {
                let (handed_back, _) = hand_back(&mut pulling, &self.shared.client).await;
                tracing::info!(handed_back, "drained by an operator: taking no new requests until resumed");
                tokio::select! {
                    _ = quiet.wait_for(|q| !q) => continue 'pull,
                    _ = shutdown.cancelled() => break 'pull,
                }
            }
            let slot = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = quiet.changed() => continue 'pull,
                _ = shutdown.cancelled() => break,
            };
            let open_all = async {
                for p in pulling.iter_mut().flatten() {
                    p.open().await;
                }
            };
            tokio::select! {
                _ = open_all => {}
                _ = shutdown.cancelled() => break,
            }
            rotation = rotation.wrapping_add(1);
            // A message already here, in the scheduler's order of classes.
            let mut taken = None;
            'plan: for (priority, _) in scheduler.plan(1) {
                let group = &mut pulling[priority.index()];
                let n = group.len();
                for k in 0..n {
                    if let Some(msg) = group[(rotation + k) % n].ready() {
                        taken = Some((priority, msg));
                        break 'plan;
                    }
                }
            }
            // Nothing here: wait for the first arrival of any class.
            let (priority, msg) = match taken {
                Some(t) => t,
                None => {
                    let waits = pulling.iter_mut().flatten().filter_map(|p| {
                        let priority = p.priority;
                        p.stream.as_mut().map(|s| s.next().map(move |m| (priority, m)).boxed())
                    });
                    let waits: Vec<_> = waits.collect();
                    if waits.is_empty() {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                    tokio::select! {
                        ((priority, next), _, _) = futures::future::select_all(waits) => match next {
                            Some(Ok(msg)) => (priority, msg),
                            Some(Err(e)) => {
                                tracing::debug!(priority = %priority, error = %e, "pull stream error");
                                continue 'pull;
                            }
                            None => continue 'pull,
                        },
                        _ = quiet.changed() => continue 'pull,
                        _ = shutdown.cancelled() => break 'pull,
                    }
                }
            };
            if *quiet.borrow() {
                // drained while this message was being taken: hand it back
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            }
            scheduler.took(priority, 1);
            self.shared.metrics.pulled(priority);
            tasks.spawn(process::handle(self.shared.clone(), priority, msg, slot));
        }

        self.finish(pulling, &slots, tasks, [stop_cancels, stop_heartbeat], heartbeat).await
    }

    /// The end of [`Worker::run`]: hands prefetched messages back, waits for
    /// in-flight work up to the drain timeout, stops the listeners and the
    /// heartbeat (bounded), closes the cache.
    async fn finish(
        &self,
        mut pulling: [Vec<Pulling>; 3],
        slots: &Semaphore,
        tasks: TaskTracker,
        stops: [CancellationToken; 2],
        heartbeat: Option<tokio::task::JoinHandle<()>>,
    ) -> Drained {
        let cfg = &self.shared.cfg;
        let (handed_back, kept) = hand_back(&mut pulling, &self.shared.client).await;
        let drain = Duration::from_millis(cfg.drain_timeout_ms);
        let inflight = cfg.max_inflight - slots.available_permits();
        tracing::info!(inflight, handed_back, ?drain, "shutdown: stopped pulling, draining in-flight work");
        tasks.close();
        let unfinished = if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            cfg.max_inflight - slots.available_permits()
        } else {
            tracing::info!("drained");
            0
        };
        stops.iter().for_each(CancellationToken::cancel);
        if let Some(mut task) = heartbeat {
            // its last act is one bounded registry delete
            if tokio::time::timeout(crate::shutdown::FINAL_OP_TIMEOUT * 2, &mut task).await.is_err() {
                task.abort();
            }
        }
        if let Some(cache) = &self.shared.cache {
            cache.close().await;
        }
        let drained = Drained { handed_back, redelivered: unfinished + kept };
        if !drained.clean() {
            tracing::warn!(
                unfinished,
                not_handed_back = kept,
                redelivered = drained.redelivered,
                ack_wait = ?self.shared.ack_wait,
                "shutdown abandoned work: JetStream will redeliver {} message(s) after ack_wait",
                drained.redelivered
            );
        }
        drained
    }

    /// Cache duties: current model generations (then follow changes), warm
    /// on start if configured, and answer warm requests.
    async fn start_cache(&self, cache: Arc<crate::cache::ResultCache>, stop: CancellationToken) {
        use crate::cache::{sync, warm};
        let sh = &self.shared;
        const CONSEQUENCE: &str = "earlier answers of the model are unreachable";
        sync::load_generations(cache.generations(), &sh.js, CONSEQUENCE).await;
        let follow = tokio::spawn(sync::follow_generations(cache.generations().clone(), sh.js.clone(), CONSEQUENCE));
        let stop_follow = stop.clone();
        tokio::spawn(async move {
            stop_follow.cancelled().await;
            follow.abort();
        });
        if cache.config().warm_on_start {
            let since_ms = crate::clock::unix_ms().saturating_sub(cache.config().warm_window_secs * 1000);
            let from = warm::WarmFrom { since_ms: Some(since_ms), from_seq: None };
            match warm::replay(&cache, &sh.js, from, |_| {}, &sh.worker_id).await {
                Ok(p) => tracing::info!(
                    scanned = p.scanned,
                    inserted = p.inserted,
                    expired = p.expired,
                    "cache warmed on start"
                ),
                Err(e) => tracing::warn!(error = %e, "warming the cache on start failed; starting cold"),
            }
        }
        tokio::spawn(warm::serve(cache, sh.client.clone(), sh.js.clone(), sh.worker_id.clone(), stop));
    }
}
