//! The pull loop.
//!
//! Every lane the worker serves ([`crate::lanes`]: each model's shared lane
//! and the tenants' lanes the survey finds) has a continuous pull stream
//! with a small prefetch (the server pushes messages as they arrive, as the
//! bare JetStream floor does); the loop takes one free slot at a time
//! (bounded by `max_inflight`), asks the [`Scheduler`] which class goes
//! first, and among that class's lanes with a message here lets
//! [`Fair`] choose the tenant; if none is waiting anywhere it waits for the
//! first arrival. Each message is processed in its own task holding its
//! slot. Prefetch bounds priority inversion: at most `prefetch` lower-class
//! messages per lane wait in the worker while higher ones arrive, and lower
//! classes keep their guaranteed share.
//!
//! Shutdown is an argument: when it fires the loop stops taking messages,
//! hands prefetched ones back (nak, so other workers get them at once),
//! waits for in-flight work up to the drain timeout, and returns. An
//! operator's drain ([`crate::control`]) does the same without returning:
//! the loop closes its pull streams and waits until it is resumed.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use futures::FutureExt;
use retro_fleet_schemas::Priority;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::config::WorkerConfig;
use crate::fair::{self, Fair, Slot};
use crate::lanes::{self, Lane};
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

/// One shared lane the worker pulls from.
struct Source {
    priority: Priority,
    model: String,
    consumer: PullConsumer,
}

/// Hands back every lane's prefetched messages and closes the pull streams.
async fn hand_back(lanes: &mut [Lane], client: &async_nats::Client) -> (usize, usize) {
    let (mut handed_back, mut kept) = (0, 0);
    for lane in lanes.iter_mut() {
        let (h, k) = lane.hand_back(client).await;
        handed_back += h;
        kept += k;
    }
    (handed_back, kept)
}

/// A tenant lane with no message for this long is closed.
const LANE_IDLE: Duration = Duration::from_secs(60);

/// Closes the tenant lanes quiet for [`LANE_IDLE`] and forgets their tenants.
fn close_quiet_lanes(lanes: &mut Vec<Lane>, open: &lanes::Open, fair: &mut Fair) {
    let mut open = open.lock().expect("lanes lock");
    lanes.retain_mut(|lane| {
        // a message that arrived since the last look keeps the lane
        let quiet = !lane.peek() && lane.quiet_for(LANE_IDLE);
        if quiet {
            tracing::debug!(priority = %lane.priority, model = %lane.model, tenant = %lane.tenant, "closing a quiet tenant lane");
            open.remove(&lane.key());
        }
        !quiet
    });
    fair.forget_idle(|tenant| lanes.iter().any(|l| l.tenant == tenant));
}

/// What woke the pull loop while nothing could start.
// a local of one turn of the loop, never stored or moved around
#[allow(clippy::large_enum_variant)]
enum Woke {
    /// A lane's pull stream brought a message, failed, or ended.
    Arrival(usize, Option<Result<async_nats::jetstream::Message, String>>),
    /// The survey found a tenant lane.
    Lane(Box<lanes::Found>),
    /// A slot freed or a request finished: look again.
    Nothing,
}

/// A running request's hold on its slot: reports its tenant to the pull
/// loop when the request ends, however it ends.
struct Held {
    _permit: OwnedSemaphorePermit,
    tenant: String,
    done: mpsc::UnboundedSender<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.done.send(std::mem::take(&mut self.tenant));
    }
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
            archive: false,
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

    /// Records each settled request in `FLEET_ARCHIVE` (which `topology
    /// apply` creates when the archive is on) when `on`.
    pub fn with_archive(mut self, on: bool) -> Self {
        let shared = Arc::get_mut(&mut self.shared).expect("the archive is set before the worker runs");
        shared.archive = on;
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
        let prefetch = |p: Priority| if p == Priority::High { cfg.batch_size } else { (cfg.batch_size / 4).max(4) };
        let expires = Duration::from_millis(cfg.idle_wait_ms.max(100));
        let mut lanes: Vec<Lane> = self
            .sources
            .iter()
            .flatten()
            .map(|s| Lane::shared(s.priority, s.model.clone(), s.consumer.clone(), prefetch(s.priority), expires))
            .collect();
        let open: lanes::Open = Default::default();
        let (found_tx, mut found) = mpsc::channel::<lanes::Found>(64);
        let shared = self.sources.iter().flatten().map(|s| (s.priority, s.model.clone(), s.consumer.clone()));
        tokio::spawn(lanes::survey(
            self.shared.js.clone(),
            shared.collect(),
            open.clone(),
            found_tx,
            Duration::from_millis(cfg.lane_scan_ms),
            stop_sweeper.clone(),
        ));
        let burst = Arc::new(Semaphore::new(cfg.fair_burst));
        let mut fair = Fair::new(cfg.max_inflight);
        let (policy_tx, mut policies) = mpsc::unbounded_channel();
        tokio::spawn(crate::tenants::follow(self.shared.js.clone(), policy_tx, stop_sweeper.clone()));
        let (done_tx, mut done) = mpsc::unbounded_channel::<String>();
        // slots taken ahead of a message to start
        let (mut regular, mut extra): (Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>) = (None, None);
        let mut tidy_at = Instant::now() + LANE_IDLE;
        let mut rotation = 0usize;
        // the scheduler's order of classes for the next start: planned once
        // per start, however many times the loop looks before it (planning
        // earns the lower classes their shares)
        let mut order: Option<Vec<(Priority, usize)>> = None;

        'pull: loop {
            if *quiet.borrow_and_update() {
                (regular, extra) = (None, None);
                let (handed_back, _) = hand_back(&mut lanes, &self.shared.client).await;
                tracing::info!(handed_back, "drained by an operator: taking no new requests until resumed");
                tokio::select! {
                    _ = quiet.wait_for(|q| !q) => continue 'pull,
                    _ = shutdown.cancelled() => break 'pull,
                }
            }
            while let Ok(tenant) = done.try_recv() {
                fair.finished(&tenant);
            }
            while let Ok((tenant, policy)) = policies.try_recv() {
                tracing::info!(tenant = %tenant, weight = policy.weight, "tenant weight");
                fair.set_weight(&tenant, policy.weight);
            }
            while let Ok(f) = found.try_recv() {
                self.add_lane(&mut lanes, &open, f, prefetch, expires);
            }
            if Instant::now() >= tidy_at {
                tidy_at = Instant::now() + LANE_IDLE;
                close_quiet_lanes(&mut lanes, &open, &mut fair);
            }
            if regular.is_none() {
                regular = slots.clone().try_acquire_owned().ok();
            }
            if regular.is_none() && extra.is_none() {
                extra = burst.clone().try_acquire_owned().ok();
            }
            let open_all = async {
                for lane in lanes.iter_mut() {
                    lane.open().await;
                }
            };
            tokio::select! {
                _ = open_all => {}
                _ = shutdown.cancelled() => break,
            }
            rotation = rotation.wrapping_add(1);
            // A message already here: the scheduler's order of classes, then
            // the fair order of tenants in the class.
            let mut taken = None;
            if regular.is_some() || extra.is_some() {
                let n = lanes.len();
                for &(priority, _) in order.get_or_insert_with(|| scheduler.plan(1)).iter() {
                    let candidates: Vec<usize> = (0..n)
                        .map(|k| (rotation + k) % n)
                        .filter(|&i| lanes[i].priority == priority && lanes[i].peek())
                        .collect();
                    let ready: Vec<_> =
                        candidates.iter().map(|&i| fair::Ready { tenant: &lanes[i].tenant, priority }).collect();
                    if let Some((k, slot)) = fair.pick(&ready, regular.is_some(), extra.is_some()) {
                        taken = Some((candidates[k], slot));
                        break;
                    }
                }
            }
            let Some((i, slot)) = taken else {
                // Nothing may start: wait for a slot, an arrival, a finished
                // request (shares change) or a new lane.
                let woke = {
                    let arrivals: Vec<_> = lanes
                        .iter_mut()
                        .enumerate()
                        .filter_map(|(i, lane)| lane.arrival().map(|f| f.map(move |m| (i, m)).boxed()))
                        .collect();
                    let any_arrival = async {
                        if arrivals.is_empty() {
                            // every pull stream is closed: open them again soon
                            tokio::time::sleep(Duration::from_millis(250)).await;
                            return None;
                        }
                        Some(futures::future::select_all(arrivals).await.0)
                    };
                    tokio::select! {
                        p = slots.clone().acquire_owned(), if regular.is_none() => { regular = p.ok(); Woke::Nothing }
                        p = burst.clone().acquire_owned(), if regular.is_none() && extra.is_none() => { extra = p.ok(); Woke::Nothing }
                        arrival = any_arrival => arrival.map_or(Woke::Nothing, |(i, next)| Woke::Arrival(i, next)),
                        Some(tenant) = done.recv() => { fair.finished(&tenant); Woke::Nothing }
                        Some(f) = found.recv() => Woke::Lane(Box::new(f)),
                        _ = quiet.changed() => continue 'pull,
                        _ = shutdown.cancelled() => break 'pull,
                    }
                };
                match woke {
                    Woke::Arrival(i, next) => match next {
                        Some(Ok(msg)) => lanes[i].park(msg),
                        Some(Err(e)) => tracing::debug!(error = %e, "pull stream error"),
                        None => lanes[i].ended(),
                    },
                    Woke::Lane(f) => self.add_lane(&mut lanes, &open, *f, prefetch, expires),
                    Woke::Nothing => {}
                }
                continue;
            };
            let permit = match slot {
                Slot::Regular => regular.take(),
                Slot::Burst => extra.take(),
            }
            .expect("a slot was held to pick with");
            let lane = &mut lanes[i];
            let msg = lane.take().expect("a picked lane has a message");
            if *quiet.borrow() {
                // drained while this message was being taken: hand it back
                let _ = msg.ack_with(AckKind::Nak(None)).await;
                continue;
            }
            let priority = lane.priority;
            order = None;
            scheduler.took(priority, 1);
            fair.started(&lane.tenant, priority, slot);
            self.shared.metrics.pulled(priority);
            let held = Held { _permit: permit, tenant: lane.tenant.clone(), done: done_tx.clone() };
            let sh = self.shared.clone();
            tasks.spawn(async move {
                let _held = held;
                process::handle(sh, priority, msg).await
            });
        }

        drop((regular, extra));
        self.finish(lanes, &slots, &burst, tasks, [stop_cancels, stop_heartbeat], heartbeat).await
    }

    /// Adds a lane the survey found, unless it is open already.
    fn add_lane(
        &self,
        lanes: &mut Vec<Lane>,
        open: &lanes::Open,
        found: lanes::Found,
        prefetch: impl Fn(Priority) -> usize,
        expires: Duration,
    ) {
        let key = (found.priority, found.model.clone(), found.tenant.clone());
        if !open.lock().expect("lanes lock").insert(key) {
            return;
        }
        let p = found.priority;
        tracing::debug!(priority = %p, model = %found.model, tenant = %found.tenant, "pulling a tenant's lane");
        lanes.push(Lane::tenant(found, prefetch(p), expires));
    }

    /// The end of [`Worker::run`]: hands prefetched messages back, waits for
    /// in-flight work up to the drain timeout, stops the listeners and the
    /// heartbeat (bounded), closes the cache.
    async fn finish(
        &self,
        mut lanes: Vec<Lane>,
        slots: &Semaphore,
        burst: &Semaphore,
        tasks: TaskTracker,
        stops: [CancellationToken; 2],
        heartbeat: Option<tokio::task::JoinHandle<()>>,
    ) -> Drained {
        let cfg = &self.shared.cfg;
        let (handed_back, kept) = hand_back(&mut lanes, &self.shared.client).await;
        let drain = Duration::from_millis(cfg.drain_timeout_ms);
        let running = || cfg.max_inflight - slots.available_permits() + cfg.fair_burst - burst.available_permits();
        let inflight = running();
        tracing::info!(inflight, handed_back, ?drain, "shutdown: stopped pulling, draining in-flight work");
        tasks.close();
        let unfinished = if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            running()
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
    /// on start if configured, and answer warm requests and feedback.
    async fn start_cache(&self, cache: Arc<crate::cache::ResultCache>, stop: CancellationToken) {
        use crate::cache::{feedback, sync, warm};
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
        tokio::spawn(feedback::serve(cache.clone(), sh.client.clone(), sh.worker_id.clone(), stop.clone()));
        tokio::spawn(warm::serve(cache, sh.client.clone(), sh.js.clone(), sh.worker_id.clone(), stop));
    }
}
