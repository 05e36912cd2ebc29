//! What the console shows: a sample of the fleet every heartbeat, and the
//! last 15 minutes of them, for whoever watches.
//!
//! A sample is the queues ([`ops::queues`](crate::ops::queues)), the live
//! workers (the registry), the scaler's latest report per model (core
//! subscription to `fleet.scaling.*`) and one [`Point`] of the charts. The
//! point's rates and percentiles come from the workers' heartbeats: the
//! difference of each worker's last two [`Totals`], added up across
//! workers, so the fleet's figures cost the workers nothing.
//!
//! Sampling starts with the first watcher and stops 15 minutes after the
//! last one left (its history would be stale by then): an ingress nobody
//! watches reads nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use retro_fleet_schemas::{subjects, ModelScaling, Totals, WorkerInfo};
use serde::Serialize;
use tokio::sync::broadcast;

/// One sample per worker heartbeat (the workers' default `heartbeat_ms`).
const EVERY: Duration = Duration::from_secs(2);
/// How much history a watcher gets, and how long sampling outlives the last one.
const HISTORY: Duration = Duration::from_secs(15 * 60);
/// A model whose report is older than this has no scaler watching it.
const REPORT_MAX_AGE_MS: u64 = 60_000;

/// One point of the console's charts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Point {
    /// Unix ms.
    pub t: u64,
    /// Requests finished per second, fleet-wide.
    pub rps: f64,
    /// Requests finished with an error per second.
    pub errors_per_s: f64,
    /// Time from publish to result, ms: median, 95th and 99th percentile
    /// over the workers' last heartbeat interval (none: nothing finished).
    pub p50_ms: Option<f64>,
    /// 95th percentile.
    pub p95_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Share of cache lookups answered from the cache (none: no lookups).
    pub hit_rate: Option<f64>,
    /// Per model: the scaler's figures.
    pub models: BTreeMap<String, ModelPoint>,
}

/// A model at one point.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelPoint {
    /// Waiting and unacknowledged requests, all classes.
    pub backlog: u64,
    /// Recommended replicas.
    pub recommended: u32,
    /// Live workers serving it.
    pub live: u32,
}

/// The sampler, shared by every watcher of this ingress.
#[derive(Clone)]
pub struct Watch {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    js: jetstream::Context,
    worker_ttl_ms: u64,
    tx: broadcast::Sender<Arc<str>>,
    /// Whether a sampler runs, and its history. Watchers subscribe under
    /// this lock and the sampler decides to stop under it, so none is left
    /// subscribed to a sampler that is gone.
    state: Mutex<Sampling>,
}

#[derive(Default)]
struct Sampling {
    running: bool,
    history: VecDeque<Point>,
}

impl Watch {
    /// A sampler of the fleet behind `client`; it starts with its first watcher.
    pub fn new(client: async_nats::Client, js: jetstream::Context, worker_ttl_ms: u64) -> Watch {
        let (tx, _) = broadcast::channel(16);
        Watch { inner: Arc::new(Inner { client, js, worker_ttl_ms, tx, state: Mutex::default() }) }
    }

    /// The history so far and the samples to come (each a JSON object:
    /// `at_ms`, `queues`, `workers`, `scaling`, `point`).
    pub fn subscribe(&self) -> (Vec<Point>, broadcast::Receiver<Arc<str>>) {
        let mut s = self.inner.state.lock().expect("watch lock");
        let rx = self.inner.tx.subscribe();
        if !s.running {
            s.running = true;
            tokio::spawn(sample(self.inner.clone()));
        }
        (s.history.iter().cloned().collect(), rx)
    }
}

async fn sample(inner: Arc<Inner>) {
    let mut reports: BTreeMap<String, ModelScaling> = BTreeMap::new();
    let mut scaling = match inner.client.subscribe(subjects::SCALING_WILDCARD).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "console: no scaling reports (subscribing failed)");
            None
        }
    };
    let mut rates = Rates::default();
    let mut ticks = tokio::time::interval(EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watched = Instant::now();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            Some(m) = async { scaling.as_mut()?.next().await } => {
                match serde_json::from_slice::<ModelScaling>(&m.payload) {
                    Ok(r) => { reports.insert(r.model.clone(), r); }
                    Err(e) => tracing::debug!(error = %e, "console: unreadable scaling report"),
                }
                continue;
            }
        }
        if inner.tx.receiver_count() > 0 {
            watched = Instant::now();
        } else if watched.elapsed() > HISTORY {
            let mut s = inner.state.lock().expect("watch lock");
            if inner.tx.receiver_count() == 0 {
                *s = Sampling::default();
                return;
            }
        }
        let at_ms = retro_fleet_worker::unix_ms();
        reports.retain(|_, r| at_ms.saturating_sub(r.at_ms) <= REPORT_MAX_AGE_MS);
        let workers = crate::registry::list(&inner.js, inner.worker_ttl_ms).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "console: reading the registry failed");
            Vec::new()
        });
        let queues = crate::ops::queues(&inner.js)
            .await
            .unwrap_or_else(|e| serde_json::json!({"error": format!("reading the queues failed: {e:#}")}));
        let point = rates.point(at_ms, &workers, &reports);
        {
            let mut s = inner.state.lock().expect("watch lock");
            s.history.push_back(point.clone());
            while s.history.front().is_some_and(|p| at_ms.saturating_sub(p.t) > HISTORY.as_millis() as u64) {
                s.history.pop_front();
            }
        }
        if inner.tx.receiver_count() > 0 {
            let snapshot = serde_json::json!({
                "at_ms": at_ms, "queues": queues["queues"].clone(), "queues_error": queues.get("error"),
                "workers": workers, "scaling": reports.values().collect::<Vec<_>>(), "point": point,
            });
            let _ = inner.tx.send(Arc::from(snapshot.to_string()));
        }
    }
}

/// Each worker's last two distinct heartbeats.
#[derive(Default)]
struct Rates {
    beats: HashMap<String, (WorkerInfo, WorkerInfo)>,
}

impl Rates {
    /// The point at `at_ms` of these live workers and reports.
    fn point(&mut self, at_ms: u64, workers: &[WorkerInfo], reports: &BTreeMap<String, ModelScaling>) -> Point {
        self.beats.retain(|id, _| workers.iter().any(|w| &w.id == id));
        for w in workers {
            match self.beats.get_mut(&w.id) {
                Some((prev, cur)) if cur.updated_ms != w.updated_ms => *prev = std::mem::replace(cur, w.clone()),
                Some(_) => {}
                None => {
                    self.beats.insert(w.id.clone(), (w.clone(), w.clone()));
                }
            }
        }
        let mut p = Point { t: at_ms, ..Point::default() };
        let (mut hits, mut misses) = (0u64, 0u64);
        let mut latency: Option<(Vec<f64>, Vec<u64>)> = None;
        for (prev, cur) in self.beats.values() {
            p.rps += cur.throughput;
            let secs = cur.updated_ms.saturating_sub(prev.updated_ms) as f64 / 1e3;
            let d = delta(&prev.totals, &cur.totals);
            if secs > 0.0 {
                p.errors_per_s += d.failed as f64 / secs;
            }
            hits += d.cache_hits;
            misses += d.cache_misses;
            match &mut latency {
                None => latency = Some((d.latency_bounds_s, d.latency_counts)),
                // a worker of another version with other bounds is left out
                Some((bounds, counts)) if *bounds == d.latency_bounds_s && counts.len() == d.latency_counts.len() => {
                    counts.iter_mut().zip(&d.latency_counts).for_each(|(c, n)| *c += n)
                }
                Some(_) => {}
            }
        }
        if let Some((bounds, counts)) = latency {
            let ms = |q| quantile(&bounds, &counts, q).map(|s| s * 1e3);
            (p.p50_ms, p.p95_ms, p.p99_ms) = (ms(0.5), ms(0.95), ms(0.99));
        }
        p.hit_rate = (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64);
        for (model, r) in reports {
            let b = r.backlog;
            let point = ModelPoint { backlog: b.high + b.normal + b.low, recommended: r.replicas, live: r.workers };
            p.models.insert(model.clone(), point);
        }
        p
    }
}

/// What happened between two heartbeats of one worker (nothing when it
/// restarted under the same id and its totals went back).
fn delta(prev: &Totals, cur: &Totals) -> Totals {
    let counts = if prev.latency_counts.len() == cur.latency_counts.len() {
        cur.latency_counts.iter().zip(&prev.latency_counts).map(|(c, p)| c.saturating_sub(*p)).collect()
    } else {
        cur.latency_counts.iter().map(|_| 0).collect()
    };
    Totals {
        failed: cur.failed.saturating_sub(prev.failed),
        cache_hits: cur.cache_hits.saturating_sub(prev.cache_hits),
        cache_misses: cur.cache_misses.saturating_sub(prev.cache_misses),
        latency_counts: counts,
        latency_bounds_s: cur.latency_bounds_s.clone(),
    }
}

/// The `q` quantile of cumulative counts per bound (one more count: all),
/// interpolated within its bucket as Prometheus's `histogram_quantile`
/// does; beyond the last bound, the last bound. None when nothing counted.
fn quantile(bounds: &[f64], cumulative: &[u64], q: f64) -> Option<f64> {
    let total = *cumulative.get(bounds.len())?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = (0.0, 0u64);
    for (bound, &count) in bounds.iter().zip(cumulative) {
        if count as f64 >= rank {
            let (lo, n_lo) = below;
            let inside = (count - n_lo) as f64;
            return Some(if inside == 0.0 { *bound } else { lo + (bound - lo) * (rank - n_lo as f64) / inside });
        }
        below = (*bound, count);
    }
    bounds.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_prometheus() {
        let bounds = [0.1, 0.5, 1.0];
        // 10 at most 0.1 s, 10 more up to 0.5 s, none up to 1 s, 0 beyond
        let counts = [10, 20, 20, 20];
        assert_eq!(quantile(&bounds, &counts, 0.5), Some(0.1));
        assert_eq!(quantile(&bounds, &counts, 0.25), Some(0.05));
        assert!((quantile(&bounds, &counts, 0.75).unwrap() - 0.3).abs() < 1e-9);
        assert_eq!(quantile(&bounds, &[0, 0, 0, 0], 0.5), None);
        // beyond the last bound: the last bound
        assert_eq!(quantile(&bounds, &[0, 0, 0, 5], 0.5), Some(1.0));
    }

    fn beat(id: &str, updated_ms: u64, failed: u64, hits: u64, misses: u64, counts: Vec<u64>) -> WorkerInfo {
        WorkerInfo {
            v: 1,
            id: id.into(),
            models: vec!["m".into()],
            capacity: 4,
            inflight: 0,
            completed: 0,
            throughput: 5.0,
            latency_ms: None,
            per_model: BTreeMap::new(),
            draining: false,
            started_ms: 0,
            updated_ms,
            totals: Totals {
                failed,
                cache_hits: hits,
                cache_misses: misses,
                latency_counts: counts,
                latency_bounds_s: vec![0.1, 1.0],
            },
        }
    }

    #[test]
    fn a_point_adds_up_each_workers_last_interval() {
        let mut r = Rates::default();
        let none = BTreeMap::new();
        r.point(0, &[beat("a", 1000, 1, 0, 0, vec![0, 0, 0]), beat("b", 1000, 0, 0, 0, vec![0, 0, 0])], &none);
        // a: 2 s later, 4 more failures, 3 hits and 1 miss, 4 answers under 0.1 s
        // b: 1 s later, 2 more failures, 4 answers between 0.1 and 1 s
        let a = beat("a", 3000, 5, 3, 1, vec![4, 4, 4]);
        let b = beat("b", 2000, 2, 0, 0, vec![0, 4, 4]);
        let p = r.point(3000, &[a.clone(), b.clone()], &none);
        assert_eq!(p.rps, 10.0);
        assert_eq!(p.errors_per_s, 4.0);
        assert_eq!(p.hit_rate, Some(0.75));
        assert_eq!(p.p50_ms, Some(100.0));
        // a heartbeat read again changes nothing; a worker gone is dropped
        assert_eq!(r.point(3000, &[a.clone(), b], &none).errors_per_s, 4.0);
        assert_eq!(r.point(3000, &[a], &none).errors_per_s, 2.0);
        // a worker restarted under its id: its totals went back, nothing counted
        let p = r.point(4000, &[beat("a", 4000, 0, 0, 0, vec![0, 0, 0])], &none);
        assert_eq!((p.errors_per_s, p.hit_rate, p.p50_ms), (0.0, None, None));
    }
}
