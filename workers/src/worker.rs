//! The pull loop.
//!
//! Each round takes every free slot (bounded by `max_inflight`, at most
//! `batch_size` per round), asks the [`Scheduler`] how to split them across
//! priorities, and fetches without waiting from the matching consumers that
//! may hold messages; each message is processed in its own task holding one
//! slot. A consumer found empty (a fetch returned less than asked, or the
//! last message said nothing is pending) is not fetched again: it gets a
//! long-poll for one message instead, whose arrival marks it busy again and
//! wakes the loop. So an idle class costs one outstanding pull request, not a
//! request per round, and a lone request is pushed to the worker at once.
//!
//! Shutdown is an argument: when it fires the loop stops pulling, waits for
//! in-flight work up to the drain timeout, and returns.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use futures::StreamExt;
use retro_fleet_schemas::Priority;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
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
    /// An idle long-poll is outstanding on this consumer.
    polling: Arc<AtomicBool>,
    /// The consumer may have messages waiting (fetch it in rounds).
    busy: Arc<AtomicBool>,
}

/// A worker bound to its consumers and backends.
pub struct Worker {
    shared: Arc<Shared>,
    sources: [Vec<Source>; 3],
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
        registry: &prometheus::Registry,
    ) -> Result<Worker, WorkerError> {
        if cfg.max_inflight == 0 || cfg.batch_size == 0 {
            return Err(WorkerError::Config("max_inflight and batch_size must be at least 1".into()));
        }
        if consumers.is_empty() {
            return Err(WorkerError::Config("no consumers: the worker serves no model".into()));
        }
        let mut sources: [Vec<Source>; 3] = Default::default();
        for (priority, model, consumer) in consumers {
            let busy = Arc::new(AtomicBool::new(true));
            sources[priority.index()].push(Source { priority, model, consumer, polling: Default::default(), busy });
        }
        let js = async_nats::jetstream::new(client.clone());
        let shared =
            Shared { client, js, backends, catalog, worker_id, cfg, metrics: Metrics::new(registry)?, max_deliver };
        Ok(Worker { shared: Arc::new(shared), sources })
    }

    /// The models this worker serves.
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self.shared.backends.keys().cloned().collect();
        m.sort();
        m
    }

    /// Pulls and processes until `shutdown` fires, then drains in-flight work.
    pub async fn run(self, shutdown: CancellationToken) {
        let cfg = &self.shared.cfg;
        let slots = Arc::new(Semaphore::new(cfg.max_inflight));
        let tasks = TaskTracker::new();
        let wake = Arc::new(Notify::new());
        let mut scheduler = Scheduler::new(cfg.normal_share, cfg.low_share);
        let mut rotation = [0usize; 3];
        let idle_wait = Duration::from_millis(cfg.idle_wait_ms.max(10));
        tracing::info!(worker = %self.shared.worker_id, models = ?self.models(), max_inflight = cfg.max_inflight, "worker pulling");
        let stop_sweeper = shutdown.child_token();
        if cfg.unrouted_sweep_ms > 0 {
            let every = Duration::from_millis(cfg.unrouted_sweep_ms);
            tokio::spawn(crate::sweeper::run(self.shared.clone(), every, stop_sweeper.clone()));
        }

        loop {
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
                _ = shutdown.cancelled() => break,
            };
            let mut held = vec![first];
            while held.len() < cfg.batch_size {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            let free = held.len();
            for (priority, cap) in scheduler.plan(free) {
                let want = cap.min(held.len());
                if want == 0 {
                    break;
                }
                let got = self.fetch(priority, want, &mut rotation[priority.index()], &mut held, &tasks).await;
                scheduler.took(priority, got);
            }
            let found = held.len() < free;
            // Consumers found empty wait on a long-poll for their next message.
            for source in self.sources.iter().flatten() {
                if source.busy.load(Ordering::Acquire) || source.polling.swap(true, Ordering::AcqRel) {
                    continue;
                }
                tasks.spawn(idle_poll(
                    self.shared.clone(),
                    source_handle(source),
                    slots.clone(),
                    idle_wait,
                    wake.clone(),
                    tasks.clone(),
                ));
            }
            if found {
                continue; // found work: look again right away
            }
            drop(held);
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(idle_wait) => {}
                _ = shutdown.cancelled() => break,
            }
        }

        let drain = Duration::from_millis(cfg.drain_timeout_ms);
        let inflight = cfg.max_inflight - slots.available_permits();
        tracing::info!(inflight, ?drain, "shutdown: stopped pulling, draining in-flight work");
        tasks.close();
        if tokio::time::timeout(drain, tasks.wait()).await.is_err() {
            let left = cfg.max_inflight - slots.available_permits();
            tracing::warn!(left, "drain timeout: unfinished requests stay unacked and will be redelivered");
        } else {
            tracing::info!("drained");
        }
    }

    /// Fetches up to `want` waiting messages of `priority` without waiting,
    /// dispatching each with one of `held`'s slots. Returns how many it took.
    async fn fetch(
        &self,
        priority: Priority,
        want: usize,
        rotation: &mut usize,
        held: &mut Vec<OwnedSemaphorePermit>,
        tasks: &TaskTracker,
    ) -> usize {
        let sources = &self.sources[priority.index()];
        let mut got = 0;
        for k in 0..sources.len() {
            let source = &sources[(*rotation + k) % sources.len()];
            let left = want - got;
            if left == 0 {
                break;
            }
            if !source.busy.load(Ordering::Acquire) {
                continue;
            }
            let mut batch = match source.consumer.fetch().max_messages(left).messages().await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(priority = %priority, model = %source.model, error = %e, "fetch failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut taken = 0;
            let mut pending = None;
            while let Some(next) = batch.next().await {
                match next {
                    Ok(msg) => {
                        let slot = held.pop().expect("never fetch more than the slots held");
                        got += 1;
                        taken += 1;
                        pending = msg.info().ok().map(|i| i.pending);
                        self.shared.metrics.pulled.with_label_values(&[priority.as_str()]).inc();
                        tasks.spawn(process::handle(self.shared.clone(), priority, msg, slot));
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "fetch ended with an error");
                        break;
                    }
                }
            }
            if taken < left || pending == Some(0) {
                source.busy.store(false, Ordering::Release);
            }
        }
        *rotation = rotation.wrapping_add(1);
        got
    }
}

/// What an idle poll needs of a [`Source`].
struct SourceHandle {
    priority: Priority,
    consumer: PullConsumer,
    polling: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
}

fn source_handle(s: &Source) -> SourceHandle {
    SourceHandle {
        priority: s.priority,
        consumer: s.consumer.clone(),
        polling: s.polling.clone(),
        busy: s.busy.clone(),
    }
}

/// Waits up to `expires` for one message on one consumer; processes it if
/// one comes, marks the consumer busy when more are pending, and wakes the
/// pull loop (also on expiry, so it can poll again).
///
/// A long-poll holds no slot while it waits, so idle classes never take
/// capacity from busy ones; the message it brings waits for a free slot, so
/// at most one message per consumer is ever held beyond `max_inflight`.
async fn idle_poll(
    shared: Arc<Shared>,
    source: SourceHandle,
    slots: Arc<Semaphore>,
    expires: Duration,
    wake: Arc<Notify>,
    tasks: TaskTracker,
) {
    let batch = source.consumer.batch().max_messages(1).expires(expires).messages().await;
    match batch {
        Ok(mut batch) => {
            while let Some(next) = batch.next().await {
                if let Ok(msg) = next {
                    let s = slots.clone().acquire_owned().await.expect("semaphore never closed");
                    shared.metrics.pulled.with_label_values(&[source.priority.as_str()]).inc();
                    if msg.info().map_or(true, |i| i.pending > 0) {
                        source.busy.store(true, Ordering::Release);
                    }
                    tasks.spawn(process::handle(shared.clone(), source.priority, msg, s));
                    // polling ends here, before the loop looks again
                    source.polling.store(false, Ordering::Release);
                    wake.notify_one();
                }
            }
        }
        Err(e) => {
            tracing::warn!(priority = %source.priority, error = %e, "long-poll failed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    source.polling.store(false, Ordering::Release);
    wake.notify_one();
}
