//! Registry heartbeats: every `heartbeat_ms` the worker writes a
//! [`WorkerInfo`] under its id to the KV bucket `fleet_workers`, whose max
//! age is the TTL. While draining it says so; once drained it deletes its
//! key, so the scaler and `retro-fleet workers` stop counting it at once.
//!
//! The figures come from the worker's own metrics (requests finished, backend
//! time), read as deltas between heartbeats, so the hot path pays nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use retro_fleet_schemas::registry::kv_key;
use retro_fleet_schemas::{subjects, ModelLoad, Totals, WorkerInfo};
use tokio_util::sync::CancellationToken;

use crate::clock::unix_ms;
use crate::process::Shared;

/// Builds heartbeats from successive metric readings.
struct Beat {
    started_ms: u64,
    last: BTreeMap<String, (u64, f64, u64)>,
    at: Instant,
}

impl Beat {
    fn next(&mut self, sh: &Shared, draining: bool) -> WorkerInfo {
        let now = sh.metrics.per_model_totals();
        let dt = self.at.elapsed().as_secs_f64().max(1e-3);
        let mut per_model = BTreeMap::new();
        let models: Vec<String> = {
            let mut m: Vec<String> = sh.backends.keys().cloned().collect();
            m.sort();
            m
        };
        let (mut done, mut secs, mut count, mut completed) = (0u64, 0.0, 0u64, 0u64);
        for model in &models {
            let cur = now.get(model).copied().unwrap_or_default();
            let prev = self.last.get(model).copied().unwrap_or_default();
            let d_done = cur.0.saturating_sub(prev.0);
            let d_secs = (cur.1 - prev.1).max(0.0);
            let d_count = cur.2.saturating_sub(prev.2);
            done += d_done;
            secs += d_secs;
            count += d_count;
            completed += cur.0;
            per_model.insert(
                model.clone(),
                ModelLoad {
                    completed: cur.0,
                    throughput: d_done as f64 / dt,
                    latency_ms: (d_count > 0).then(|| d_secs / d_count as f64 * 1e3),
                    load_ms: sh.load_ms.get(model).copied(),
                },
            );
        }
        self.last = now;
        self.at = Instant::now();
        let (failed, latency_counts) = sh.metrics.failed_and_latency();
        let (cache_hits, cache_misses) = sh.cache.as_ref().map_or((0, 0), |c| c.hits_and_misses());
        let totals = Totals {
            failed,
            cache_hits,
            cache_misses,
            latency_counts,
            latency_bounds_s: crate::metrics::LATENCY_BUCKETS.to_vec(),
        };
        WorkerInfo {
            v: retro_fleet_schemas::SCHEMA_VERSION,
            id: sh.worker_id.clone(),
            models,
            capacity: sh.cfg.max_inflight as u32,
            inflight: sh.metrics.inflight.get().max(0) as u32,
            completed,
            throughput: done as f64 / dt,
            latency_ms: (count > 0).then(|| secs / count as f64 * 1e3),
            per_model,
            draining,
            started_ms: self.started_ms,
            updated_ms: unix_ms(),
            totals,
        }
    }
}

async fn bucket(sh: &Shared) -> Option<kv::Store> {
    match sh.js.get_key_value(subjects::WORKERS_BUCKET).await {
        Ok(kv) => Some(kv),
        Err(e) => {
            tracing::warn!(error = %e, "worker registry bucket unavailable (run `retro-fleet topology apply`); retrying");
            None
        }
    }
}

/// Heartbeats every `every` until `stop` fires, then deletes this worker's
/// key (a bounded [`crate::shutdown::final_op`]: with NATS gone the key
/// expires by itself). After `shutdown` fires (and before `stop`), and while an operator
/// has drained the worker, heartbeats say `draining`.
pub async fn run(sh: Arc<Shared>, every: Duration, shutdown: CancellationToken, stop: CancellationToken) {
    let key = kv_key(&sh.worker_id);
    let mut beat = Beat { started_ms: unix_ms(), last: sh.metrics.per_model_totals(), at: Instant::now() };
    let mut store = None;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = false;
    let mut quiet = sh.quiet.subscribe();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.cancelled(), if !stopping => stopping = true,
            // an operator's drain or resume shows at once
            Ok(()) = quiet.changed() => {}
            _ = stop.cancelled() => break,
        }
        if store.is_none() {
            tokio::select! {
                s = bucket(&sh) => store = s,
                _ = stop.cancelled() => break,
            }
        }
        let Some(kv) = &store else { continue };
        let info = beat.next(&sh, stopping || *quiet.borrow_and_update());
        let value = Bytes::from(serde_json::to_vec(&info).expect("worker info is JSON"));
        // a put waiting on a lost connection must not hold up the shutdown
        tokio::select! {
            r = kv.put(&key, value) => if let Err(e) = r {
                tracing::debug!(error = %e, "heartbeat failed");
            },
            _ = stop.cancelled() => break,
        }
    }
    let client = sh.client.clone();
    let remove = async move {
        let store = match store {
            Some(kv) => Some(kv),
            None => bucket(&sh).await,
        };
        match store {
            Some(kv) => kv.delete(&key).await.map_err(|e| e.to_string()),
            None => Err("no registry bucket".into()),
        }
    };
    match crate::shutdown::final_op(&client, "registry delete", remove).await {
        Some(Ok(())) => {}
        Some(Err(e)) => tracing::debug!(error = %e, "removing the registry entry failed; it expires by itself"),
        None => tracing::info!("registry entry left to expire by itself (NATS gone or not answering)"),
    }
}
