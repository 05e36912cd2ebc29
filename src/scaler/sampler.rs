//! One sample: every worker consumer of every request stream, the worker
//! registry and the stream sizes, turned into one [`ModelScaling`] report per
//! model.
//!
//! Rates come from deltas between samples of each consumer: a delivery
//! that leaves the unacknowledged set has completed (acked or terminated),
//! so `completions = Δdelivered − Δack_pending`; the backlog is pending plus
//! ack-pending, so `arrivals = Δbacklog + completions`. (A redelivery counts
//! as one more completion; the error is the redelivery rate, which has its
//! own alert.) While requests wait undelivered at both ends of an interval
//! the workers are saturated, and `completions / workers` is one worker's
//! service rate.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use futures::StreamExt;
use retro_fleet_schemas::{subjects, ModelScaling, PerPriority, Priority, WorkerInfo};
use serde::Serialize;

use super::metrics::ScalerMetrics;
use super::recommend::{recommend, Policy, Reason, Sample, State};
use super::stats::{robust_z, slope};

/// Every warning a report can carry.
const WARNINGS: [&str; 4] = ["lag_growing", "lag_anomaly", "latency_anomaly", "no_workers_with_backlog"];

/// What the previous sample saw of one consumer.
#[derive(Debug, Clone, Copy)]
struct Seen {
    t: f64,
    delivered: u64,
    ack_pending: u64,
    lag: u64,
    pending: u64,
}

/// Per-model history: the recommender's state and the trend windows.
#[derive(Debug, Default)]
struct Track {
    rec: State,
    lag: VecDeque<(f64, f64)>,
    growth: VecDeque<(f64, f64)>,
    latency: VecDeque<(f64, f64)>,
}

#[derive(Debug, Default)]
struct Inner {
    seen: HashMap<(Priority, String), Seen>, // by class and consumer name
    models: BTreeMap<String, Track>,
    /// Consumers seen by the last sample (stream, consumer), to drop the
    /// series of ones that are gone.
    consumers: Vec<(String, String)>,
}

/// One worker consumer as a sample reads it.
struct Consumer {
    p: Priority,
    model: String,
    info: async_nats::jetstream::consumer::Info,
    /// When its oldest undelivered request was published, unix ms.
    oldest_ms: Option<u64>,
}

/// When the oldest request `consumer` has not delivered yet was published,
/// unix ms: the next message on its subject after the last it delivered.
async fn oldest_undelivered(
    stream: &async_nats::jetstream::stream::Stream,
    consumer: &async_nats::jetstream::consumer::Info,
) -> Option<u64> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let next = consumer.delivered.stream_sequence + 1;
    match stream.direct_get_next_for_subject(consumer.config.filter_subject.clone(), Some(next)).await {
        Ok(msg) => Some(retro_fleet_worker::clock::ms_of(msg.time)),
        // taken since the consumer was read
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(consumer = %consumer.name, error = %e, "cannot read the oldest waiting request; counted as none");
            None
        }
    }
}

/// Per-model sums over its consumers in one sample.
#[derive(Debug, Default)]
struct Acc {
    backlog: [u64; 3],
    /// Publish time of the oldest undelivered request per class, unix ms.
    oldest_ms: [Option<u64>; 3],
    arrivals: f64,
    completions: f64,
    saturated: bool,
}

/// The latest reports, for `GET /v1/scaling`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    /// When the last sample finished, unix ms (0: none yet).
    pub at_ms: u64,
    /// Time between samples, ms.
    pub interval_ms: u64,
    /// One report per model.
    pub models: Vec<ModelScaling>,
}

/// Samples the fleet and keeps what the recommender needs between samples.
pub struct Sampler {
    js: async_nats::jetstream::Context,
    cfg: Policy,
    ttl_ms: u64,
    metrics: ScalerMetrics,
    started: Instant,
    inner: Mutex<Inner>,
    latest: RwLock<Snapshot>,
}

fn trim<T>(q: &mut VecDeque<(f64, T)>, horizon: f64) {
    while q.front().is_some_and(|(t, _)| *t < horizon) {
        q.pop_front();
    }
}

impl Sampler {
    /// A sampler following `policy`, counting a worker live for
    /// `worker_ttl_secs` after its last heartbeat, registering its metrics
    /// on `registry`.
    pub fn new(
        client: async_nats::Client,
        policy: Policy,
        worker_ttl_secs: u64,
        registry: &prometheus::Registry,
    ) -> prometheus::Result<Sampler> {
        Ok(Sampler {
            js: async_nats::jetstream::new(client),
            latest: RwLock::new(Snapshot { interval_ms: policy.interval_ms, ..Default::default() }),
            cfg: policy,
            ttl_ms: worker_ttl_secs.max(1) * 1000,
            metrics: ScalerMetrics::new(registry)?,
            started: Instant::now(),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// The scaler settings.
    pub fn config(&self) -> &Policy {
        &self.cfg
    }

    /// The latest reports.
    pub fn snapshot(&self) -> Snapshot {
        self.latest.read().expect("snapshot lock").clone()
    }

    /// Takes one sample, updates metrics and the snapshot, and returns the reports.
    pub async fn sample(&self) -> anyhow::Result<Vec<ModelScaling>> {
        let r = self.sample_inner().await;
        self.metrics.samples.with_label_values(&[if r.is_ok() { "ok" } else { "error" }]).inc();
        r
    }

    async fn read_consumers(&self) -> anyhow::Result<Vec<Consumer>> {
        let mut out = Vec::new();
        for p in Priority::ALL {
            let name = subjects::request_stream(p);
            let mut stream = self.js.get_stream(name).await?;
            let messages = stream.info().await?.state.messages;
            self.metrics.stream_messages.with_label_values(&[name]).set(messages as i64);
            let mut consumers = stream.consumers();
            while let Some(info) = consumers.next().await {
                let info = info?;
                // a model's shared lane and its tenants' lanes all count for it
                let Some((model, _)) = subjects::parse_consumer(&info.name) else { continue };
                let model = model.to_string();
                if !self.cfg.models.is_empty() && !self.cfg.models.contains(&model) {
                    continue;
                }
                out.push(Consumer { p, model, info, oldest_ms: None });
            }
            // the oldest request no worker has taken yet, in each lane that has one
            let mut waiting: Vec<&mut Consumer> =
                out.iter_mut().filter(|c| c.p == p && c.info.num_pending > 0 && !c.info.paused).collect();
            for lanes in waiting.chunks_mut(64) {
                let found = futures::future::join_all(lanes.iter().map(|c| oldest_undelivered(&stream, &c.info))).await;
                for (c, oldest) in lanes.iter_mut().zip(found) {
                    c.oldest_ms = oldest;
                }
            }
        }
        for name in [subjects::RESULTS_STREAM, subjects::DLQ_STREAM] {
            if let Ok(mut s) = self.js.get_stream(name).await {
                if let Ok(info) = s.info().await {
                    let m = &self.metrics;
                    m.stream_messages.with_label_values(&[name]).set(info.state.messages as i64);
                    m.stream_bytes.with_label_values(&[name]).set(info.state.bytes as i64);
                    m.stream_max_bytes.with_label_values(&[name]).set(info.config.max_bytes);
                    m.stream_max_messages.with_label_values(&[name]).set(info.config.max_messages);
                }
            }
        }
        Ok(out)
    }

    async fn sample_inner(&self) -> anyhow::Result<Vec<ModelScaling>> {
        let consumers = self.read_consumers().await?;
        let workers = crate::registry::list(&self.js, self.ttl_ms).await?;
        let t = self.started.elapsed().as_secs_f64();
        let at_ms = retro_fleet_worker::unix_ms();
        self.metrics.registry_workers.set(workers.len() as i64);
        let m = &self.metrics;

        let mut inner = self.inner.lock().expect("sampler lock");
        let mut accs: BTreeMap<String, Acc> = BTreeMap::new();
        let present: Vec<(String, String)> =
            consumers.iter().map(|c| (subjects::request_stream(c.p).to_string(), c.info.name.clone())).collect();
        for gone in inner.consumers.iter().filter(|c| !present.contains(c)) {
            let labels = [gone.0.as_str(), gone.1.as_str()];
            for g in [&m.lag, &m.pending, &m.ack_pending, &m.redelivered] {
                let _ = g.remove_label_values(&labels);
            }
        }
        inner.seen.retain(|(p, c), _| present.iter().any(|(s, n)| s == subjects::request_stream(*p) && n == c));
        inner.consumers = present;
        for Consumer { p, model, info, oldest_ms } in consumers {
            let stream = subjects::request_stream(p);
            let labels = [stream, info.name.as_str()];
            let ack_pending = info.num_ack_pending as u64;
            let lag = info.num_pending + ack_pending;
            m.lag.with_label_values(&labels).set(lag as i64);
            m.pending.with_label_values(&labels).set(info.num_pending as i64);
            m.ack_pending.with_label_values(&labels).set(ack_pending as i64);
            m.redelivered.with_label_values(&labels).set(info.num_redelivered as i64);
            let acc = accs.entry(model.clone()).or_default();
            if info.paused {
                // an operator paused this class: its queue is nobody's work
                // until resumed, and its rates restart from then
                inner.seen.remove(&(p, info.name.clone()));
                continue;
            }
            let now =
                Seen { t, delivered: info.delivered.consumer_sequence, ack_pending, lag, pending: info.num_pending };
            acc.backlog[p.index()] += lag;
            let o = &mut acc.oldest_ms[p.index()];
            *o = (*o).into_iter().chain(oldest_ms).min();
            if let Some(prev) = inner.seen.insert((p, info.name.clone()), now) {
                let dt = t - prev.t;
                // a recreated consumer restarts its sequence: no rate this time
                if dt > 0.0 && now.delivered >= prev.delivered {
                    let delivered = (now.delivered - prev.delivered) as f64;
                    let completions = (delivered - (now.ack_pending as f64 - prev.ack_pending as f64)).max(0.0);
                    let arrivals = (now.lag as f64 - prev.lag as f64 + completions).max(0.0);
                    acc.completions += completions / dt;
                    acc.arrivals += arrivals / dt;
                    acc.saturated |= prev.pending > 0 && now.pending > 0;
                }
            }
        }

        // a model whose consumers are all gone: forget it and drop its series
        let gone: Vec<String> = inner.models.keys().filter(|k| !accs.contains_key(*k)).cloned().collect();
        for model in gone {
            inner.models.remove(&model);
            inner.seen.retain(|(_, c), _| subjects::parse_consumer(c).is_none_or(|(m, _)| m != model));
            for g in [&m.recommended, &m.desired, &m.workers] {
                let _ = g.remove_label_values(&[&model]);
            }
            for g in [&m.arrival, &m.completion, &m.service, &m.drain, &m.lag_slope, &m.latency] {
                let _ = g.remove_label_values(&[&model]);
            }
            for p in Priority::ALL {
                let _ = m.backlog.remove_label_values(&[&model, p.as_str()]);
                let _ = m.oldest_wait.remove_label_values(&[&model, p.as_str()]);
            }
            for kind in WARNINGS {
                let _ = m.warning.remove_label_values(&[&model, kind]);
            }
            for signal in ["lag_growth", "latency"] {
                let _ = m.anomalies.remove_label_values(&[&model, signal]);
            }
        }

        let window = self.cfg.window_secs.max(1) as f64;
        let mut reports = Vec::new();
        for (model, acc) in accs {
            let live: Vec<&WorkerInfo> =
                workers.iter().filter(|w| !w.draining && w.models.iter().any(|x| *x == model)).collect();
            let n = live.len() as u32;
            let service_rate = (acc.saturated && n > 0 && acc.completions > 0.0).then(|| acc.completions / n as f64);
            let sample = Sample {
                t,
                backlog: acc.backlog,
                arrival_rate: acc.arrivals,
                completion_rate: acc.completions,
                workers: n,
                service_rate,
                load_secs: live.iter().filter_map(|w| w.per_model.get(&model)?.load_ms).max().map(|ms| ms as f64 / 1e3),
            };
            let track = inner.models.entry(model.clone()).or_default();
            let rec = recommend(&self.cfg, &mut track.rec, &sample);
            let backlog = sample.total_backlog() as f64;

            // trends and anomalies
            let mut warnings = Vec::new();
            let growth = track.lag.back().map(|&(t0, b0)| (backlog - b0) / (t - t0).max(1e-3));
            track.lag.push_back((t, backlog));
            trim(&mut track.lag, t - window);
            let lag_slope = if track.lag.len() >= 3 { slope(track.lag.make_contiguous()) } else { None };
            if let Some(g) = growth {
                let hist: Vec<f64> = track.growth.iter().map(|p| p.1).collect();
                if robust_z(&hist, g).is_some_and(|z| z > self.cfg.anomaly_z) {
                    warnings.push("lag_anomaly");
                    m.anomalies.with_label_values(&[&model, "lag_growth"]).inc();
                }
                track.growth.push_back((t, g));
                trim(&mut track.growth, t - window);
            }
            let lats: Vec<f64> =
                live.iter().filter_map(|w| w.per_model.get(&model).and_then(|l| l.latency_ms)).collect();
            let latency_ms = (!lats.is_empty()).then(|| lats.iter().sum::<f64>() / lats.len() as f64);
            if let Some(l) = latency_ms {
                let hist: Vec<f64> = track.latency.iter().map(|p| p.1).collect();
                if robust_z(&hist, l).is_some_and(|z| z > self.cfg.anomaly_z) {
                    warnings.push("latency_anomaly");
                    m.anomalies.with_label_values(&[&model, "latency"]).inc();
                }
                track.latency.push_back((t, l));
            }
            trim(&mut track.latency, t - window);
            let latency_slope = if track.latency.len() >= 3 { slope(track.latency.make_contiguous()) } else { None };
            if backlog > 0.0 && lag_slope.is_some_and(|s| s > 0.0) && acc.arrivals >= acc.completions {
                warnings.push("lag_growing");
            }
            if backlog > 0.0 && n == 0 {
                warnings.push("no_workers_with_backlog");
            }
            let net = acc.completions - acc.arrivals;
            let drain_secs = if backlog == 0.0 {
                Some(0.0)
            } else if net > 0.0 {
                Some(backlog / net)
            } else {
                None
            };
            if !warnings.is_empty() {
                tracing::warn!(%model, ?warnings, backlog, workers = n, "scaler warnings");
            }
            if rec.reason != Reason::Stable {
                tracing::info!(%model, replicas = rec.replicas, reason = ?rec.reason, backlog, arrival = acc.arrivals, workers = n, "recommendation changed");
            }

            m.recommended.with_label_values(&[&model]).set(rec.replicas as i64);
            m.desired.with_label_values(&[&model]).set(rec.desired as i64);
            let oldest_wait_ms = acc.oldest_ms.map(|o| o.map_or(0, |o| at_ms.saturating_sub(o)));
            for p in Priority::ALL {
                m.backlog.with_label_values(&[&model, p.as_str()]).set(acc.backlog[p.index()] as i64);
                m.oldest_wait.with_label_values(&[&model, p.as_str()]).set(oldest_wait_ms[p.index()] as f64 / 1e3);
            }
            m.arrival.with_label_values(&[&model]).set(acc.arrivals);
            m.completion.with_label_values(&[&model]).set(acc.completions);
            m.service.with_label_values(&[&model]).set(rec.service_rate);
            m.drain.with_label_values(&[&model]).set(drain_secs.unwrap_or(f64::INFINITY));
            m.workers.with_label_values(&[&model]).set(n as i64);
            m.lag_slope.with_label_values(&[&model]).set(lag_slope.unwrap_or(0.0));
            if let Some(l) = latency_ms {
                m.latency.with_label_values(&[&model]).set(l / 1e3);
            }
            for kind in WARNINGS {
                m.warning.with_label_values(&[&model, kind]).set(warnings.contains(&kind) as i64);
            }
            let reason = serde_json::to_value(rec.reason).ok().and_then(|v| v.as_str().map(str::to_string));
            reports.push(ModelScaling {
                v: retro_fleet_schemas::SCHEMA_VERSION,
                model,
                at_ms,
                replicas: rec.replicas,
                desired: rec.desired,
                reason: reason.unwrap_or_default(),
                workers: n,
                backlog: PerPriority { high: acc.backlog[0], normal: acc.backlog[1], low: acc.backlog[2] },
                oldest_wait_ms: PerPriority {
                    high: oldest_wait_ms[0],
                    normal: oldest_wait_ms[1],
                    low: oldest_wait_ms[2],
                },
                weighted_backlog: rec.weighted_backlog,
                arrival_rate: acc.arrivals,
                completion_rate: acc.completions,
                service_rate: rec.service_rate,
                drain_secs,
                drain_secs_at_recommended: rec.drain_secs_at_recommended,
                lag_slope,
                latency_ms,
                latency_slope,
                warnings: warnings.into_iter().map(str::to_string).collect(),
            });
        }
        drop(inner);
        *self.latest.write().expect("snapshot lock") =
            Snapshot { at_ms, interval_ms: self.cfg.interval_ms, models: reports.clone() };
        Ok(reports)
    }
}
