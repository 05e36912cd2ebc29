//! The ingress's memory of recent answers: the first cache level a
//! synchronous call meets, before any queue.
//!
//! A worker that answers a cacheable request (its own cache holds the
//! answer) says until when in `Fleet-Cache-Expires` on the reply. The
//! ingress keeps that answer in memory for the same time (at most
//! `max_ttl_secs`) and serves an identical request from it directly,
//! marked `cache: "ingress"`. Everything the worker's cache decides stays
//! the worker's: what is cacheable, TTLs, bypass. What the ingress keys on
//! is the same exact key the workers use:
//! tenant, model, model revision, cache generation, adapter, sampling
//! parameters and input.
//!
//! - Generations come from KV `fleet_models` (followed live), so a purge or
//!   a new model revision published there reaches the ingress as it reaches
//!   the workers.
//! - The revision is the one in the latest result for the model: an answer
//!   from a worker with other model files makes older answers unreachable.
//! - Only requests whose id the ingress chose are answered here. A caller
//!   that picks its own id gets the fleet's stored result for that id.
//! - Answers served here go through no queue, so they are not stored in
//!   `FLEET_RESULTS`; the caller has the answer in the response.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use retro_fleet_schemas::{CacheMode, CacheTier, InferResult, Output, Status, Timings, Usage};
use retro_fleet_worker::cache::key::{exact, Scope};
use retro_fleet_worker::cache::sync::Generations;
use serde::{Deserialize, Serialize};

use super::native::Prepared;

/// `[ingress.cache]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnswerCacheConfig {
    /// Serve repeated cacheable requests from the ingress's memory.
    pub enabled: bool,
    /// Memory budget in bytes (least recently used answers leave first).
    pub memory_bytes: usize,
    /// Longest an answer is kept here, whatever the worker allows.
    pub max_ttl_secs: u64,
}

impl Default for AnswerCacheConfig {
    fn default() -> Self {
        AnswerCacheConfig { enabled: true, memory_bytes: 64 << 20, max_ttl_secs: 300 }
    }
}

/// An answer as a worker sent it.
struct Entry {
    expires_ms: u64,
    model_revision: Option<String>,
    output: Output,
    usage: Usage,
    worker: String,
}

/// The ingress's answers, by exact key.
pub struct AnswerCache {
    cfg: AnswerCacheConfig,
    entries: foyer::Cache<u128, Arc<Entry>>,
    generations: RwLock<HashMap<String, String>>,
    revisions: RwLock<HashMap<String, String>>,
    /// `fleet_ingress_cache_total{model,result}`: `hit`, `miss`, `stored`.
    counts: IntCounterVec,
    /// `fleet_ingress_cache_bytes`.
    bytes: IntGauge,
}

impl AnswerCache {
    /// An empty cache; registers its metrics.
    pub fn new(cfg: AnswerCacheConfig, registry: &Registry) -> prometheus::Result<AnswerCache> {
        let counts = IntCounterVec::new(
            Opts::new("fleet_ingress_cache_total", "Lookups and stores of the ingress's answer cache"),
            &["model", "result"],
        )?;
        let bytes = IntGauge::new("fleet_ingress_cache_bytes", "Bytes held by the ingress's answer cache")?;
        registry.register(Box::new(counts.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        let entries = foyer::CacheBuilder::new(cfg.memory_bytes.max(1 << 16))
            .with_weighter(|_: &u128, e: &Arc<Entry>| {
                256 + e.output.text.len() + e.model_revision.as_ref().map_or(0, String::len) + e.worker.len()
            })
            .build();
        Ok(AnswerCache { cfg, entries, generations: Default::default(), revisions: Default::default(), counts, bytes })
    }

    /// Whether `p` may be answered from here at all.
    pub fn serves(&self, p: &Prepared) -> bool {
        self.cfg.enabled && !p.caller_id && !p.req.stream && matches!(p.req.cache, CacheMode::Use | CacheMode::Semantic)
    }

    fn key(&self, p: &Prepared, revision: &str) -> u128 {
        let generations = self.generations.read().expect("generations lock");
        let scope = Scope {
            tenant: &p.tenant,
            model: &p.req.model,
            revision,
            generation: generations.get(&p.req.model).map_or("", String::as_str),
            adapter: p.req.adapter.as_deref(),
        };
        exact(&scope, &p.req.params, &p.req.input).0
    }

    /// The answer for `p` if one is here and still valid.
    pub fn get(&self, p: &Prepared, now_ms: u64) -> Option<InferResult> {
        let revision = self.revisions.read().expect("revisions lock").get(&p.req.model).cloned();
        let hit = revision
            .and_then(|r| self.entries.get(&self.key(p, &r)))
            .map(|e| e.value().clone())
            .filter(|e| e.expires_ms > now_ms);
        self.counts.with_label_values(&[p.req.model.as_str(), if hit.is_some() { "hit" } else { "miss" }]).inc();
        let e = hit?;
        Some(InferResult {
            v: retro_fleet_schemas::SCHEMA_VERSION,
            id: p.req.id.clone(),
            model: p.req.model.clone(),
            model_revision: e.model_revision.clone(),
            adapter: p.req.adapter.clone(),
            status: Status::Ok,
            output: Some(e.output.clone()),
            usage: Some(e.usage.clone()),
            cache: CacheTier::Ingress,
            cache_similarity: None,
            timings: Timings::default(),
            worker: e.worker.clone(),
            error: None,
        })
    }

    /// Keeps `result`, the answer to `p`, until `expires_ms` (from the
    /// worker's `Fleet-Cache-Expires`; nothing is kept without it).
    pub fn put(&self, p: &Prepared, result: &InferResult, expires_ms: Option<u64>, now_ms: u64) {
        let (Some(expires_ms), Some(output), Some(usage)) = (expires_ms, &result.output, &result.usage) else {
            return;
        };
        if !self.cfg.enabled || p.req.stream || result.status != Status::Ok || result.error.is_some() {
            return;
        }
        let expires_ms = expires_ms.min(now_ms.saturating_add(self.cfg.max_ttl_secs.saturating_mul(1000)));
        if expires_ms <= now_ms {
            return;
        }
        let revision = result.model_revision.clone().unwrap_or_default();
        {
            let mut revisions = self.revisions.write().expect("revisions lock");
            if revisions.get(&p.req.model) != Some(&revision) {
                tracing::debug!(model = %p.req.model, %revision, "model revision seen in a result");
                revisions.insert(p.req.model.clone(), revision.clone());
            }
        }
        let entry = Entry {
            expires_ms,
            model_revision: result.model_revision.clone(),
            output: output.clone(),
            usage: usage.clone(),
            worker: result.worker.clone(),
        };
        self.entries.insert(self.key(p, &revision), Arc::new(entry));
        self.counts.with_label_values(&[p.req.model.as_str(), "stored"]).inc();
        self.bytes.set(self.entries.usage() as i64);
    }
}

impl Generations for AnswerCache {
    fn set_generation(&self, model: &str, generation: &str) {
        let mut g = self.generations.write().expect("generations lock");
        if g.get(model).map(String::as_str) != Some(generation) {
            tracing::info!(model, generation, "cache generation changed; the ingress forgets the model's answers");
            g.insert(model.to_string(), generation.to_string());
        }
    }
}
