//! The ingress's memory of recent answers: the first cache level a
//! synchronous call meets, before any queue.
//!
//! A worker that answers a cacheable request (its own cache holds the
//! answer) puts its cache key and expiry on the reply (`Fleet-Cache-Key`,
//! `Fleet-Cache-Expires`). The ingress keeps that answer in memory for the
//! same time (at most `max_ttl_secs`) and serves an identical request from
//! it directly, marked `cache: "ingress"`. Everything the worker's cache
//! decides stays the worker's: what is cacheable, TTLs, bypass. The ingress
//! keys on the same exact key the workers use: tenant, model, model
//! revision, cache generation, adapter, sampling parameters and input.
//!
//! - Generations come from KV `fleet_models` (followed live), so a purge
//!   reaches the ingress as it reaches the workers.
//! - An answer is kept only if the key the ingress computes for it (its
//!   current generation, the result's revision) is the worker's key: an
//!   answer made under a generation the ingress no longer has (a purge
//!   while it was in flight, or a worker that has not seen the purge yet)
//!   is not kept.
//! - Lookups use the revision in the latest result for the model, so an
//!   answer from a worker with other model files makes older answers
//!   unreachable. An ingress that only answers from memory learns of new
//!   model files when its answers expire (`max_ttl_secs`), or at once with
//!   `retro-fleet cache purge`.
//! - Only requests whose id the ingress chose are answered here. A caller
//!   that picks its own id gets the fleet's stored result for that id.
//! - Answers served here go through no queue, so they are not stored in
//!   `FLEET_RESULTS`; the caller has the answer in the response.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use retro_fleet_schemas::cache_key::{exact, Generations, Scope};
use retro_fleet_schemas::{CacheMode, CacheTier, InferResult, Output, Status, Timings, Usage};
use retro_fleet_worker::metrics::registered;
use serde::{Deserialize, Serialize};

use super::replies::Cacheable;
use super::submit::validate::Prepared;

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
        AnswerCacheConfig { enabled: true, memory_bytes: 64 << 20, max_ttl_secs: 60 }
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
    generations: Arc<Generations>,
    revisions: RwLock<HashMap<String, String>>,
    /// `fleet_ingress_cache_total{model,result}`: `hit`, `miss`, `stored`,
    /// `other_key` (an answer made under another generation, not kept).
    counts: IntCounterVec,
    /// `fleet_ingress_cache_bytes`.
    bytes: IntGauge,
}

impl AnswerCache {
    /// An empty cache; registers its metrics.
    pub fn new(cfg: AnswerCacheConfig, registry: &Registry) -> prometheus::Result<AnswerCache> {
        let counts = registered(
            registry,
            IntCounterVec::new(
                Opts::new("fleet_ingress_cache_total", "Lookups and stores of the ingress's answer cache"),
                &["model", "result"],
            )?,
        )?;
        let bytes = registered(
            registry,
            IntGauge::new("fleet_ingress_cache_bytes", "Bytes held by the ingress's answer cache")?,
        )?;
        let entries = foyer::CacheBuilder::new(cfg.memory_bytes.max(1 << 16))
            .with_weighter(|_: &u128, e: &Arc<Entry>| {
                256 + e.output.len() + e.model_revision.as_ref().map_or(0, String::len) + e.worker.len()
            })
            .build();
        Ok(AnswerCache { cfg, entries, generations: Default::default(), revisions: Default::default(), counts, bytes })
    }

    /// Whether `p` may be answered from here at all.
    pub fn serves(&self, p: &Prepared) -> bool {
        self.cfg.enabled && !p.caller_id && !p.req.stream && matches!(p.req.cache, CacheMode::Use | CacheMode::Semantic)
    }

    /// The models' cache generations (followed from KV `fleet_models`).
    pub fn generations(&self) -> &Arc<Generations> {
        &self.generations
    }

    fn key(&self, p: &Prepared, revision: &str) -> u128 {
        self.generations.with(&p.req.model, |generation| Self::key_with(generation, p, revision))
    }

    fn key_with(generation: &str, p: &Prepared, revision: &str) -> u128 {
        let scope =
            Scope { tenant: &p.tenant, model: &p.req.model, revision, generation, adapter: p.req.adapter.as_deref() };
        exact(&scope, &p.req.params, &p.req.input).0
    }

    /// The answer for `p` if one is here and still valid.
    pub fn get(&self, p: &Prepared, now_ms: u64) -> Option<InferResult> {
        let revision = self.revisions.read().expect("revisions lock").get(&p.req.model).cloned();
        let hit = revision.map(|r| self.key(p, &r)).and_then(|key| {
            let entry = self.entries.get(&key)?.value().clone();
            if entry.expires_ms <= now_ms {
                self.entries.remove(&key);
                return None;
            }
            Some(entry)
        });
        self.counts.with_label_values(&[p.req.model.as_str(), if hit.is_some() { "hit" } else { "miss" }]).inc();
        let e = hit?;
        Some(InferResult {
            v: retro_fleet_schemas::SCHEMA_VERSION,
            id: p.req.id.clone(),
            model: p.req.model.clone(),
            model_revision: e.model_revision.clone(),
            adapter: p.req.adapter.clone(),
            status: Status::Ok,
            output: Some(e.output.clone().for_request(&p.req.id)),
            usage: Some(e.usage.clone()),
            cache: CacheTier::Ingress,
            cache_similarity: None,
            cache_entry: None,
            timings: Timings::default(),
            worker: e.worker.clone(),
            error: None,
        })
    }

    /// Keeps `result`, the answer to `p` that a worker marked `cacheable`,
    /// if the worker's key is the one the ingress computes for it now.
    pub fn put(&self, p: &Prepared, result: &InferResult, cacheable: Cacheable, now_ms: u64) {
        let (Some(output), Some(usage)) = (&result.output, &result.usage) else { return };
        if !self.cfg.enabled || p.req.stream || result.status != Status::Ok || result.error.is_some() {
            return;
        }
        let expires_ms = cacheable.expires_ms.min(now_ms.saturating_add(self.cfg.max_ttl_secs.saturating_mul(1000)));
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
        // while no purge can happen: a purge seen after the check makes
        // this entry unreachable, one seen before fails the check
        let kept = self.generations.with(&p.req.model, |generation| {
            let same = Self::key_with(generation, p, &revision) == cacheable.key;
            if same {
                self.entries.insert(cacheable.key, Arc::new(entry));
            }
            same
        });
        if !kept {
            self.counts.with_label_values(&[p.req.model.as_str(), "other_key"]).inc();
            return;
        }
        self.counts.with_label_values(&[p.req.model.as_str(), "stored"]).inc();
        self.bytes.set(self.entries.usage() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::auth::Principal;
    use retro_fleet_schemas::{InferRequest, Input, Priority, SamplingParams};

    fn prepared(tenant: &str, prompt: &str) -> Prepared {
        let req = InferRequest {
            v: 1,
            id: "id-1".into(),
            model: "echo".into(),
            adapter: None,
            input: Input::Completion { prompt: prompt.into() },
            params: SamplingParams { temperature: Some(0.0), ..Default::default() },
            stream: false,
            cache: CacheMode::Use,
            tenant: Some(tenant.into()),
            metadata: Default::default(),
        };
        let who = Principal::new("anonymous", tenant, Default::default());
        Prepared {
            req,
            priority: Priority::Normal,
            tenant: tenant.into(),
            timeout: std::time::Duration::from_secs(1),
            cache_ttl: None,
            result_ttl: None,
            traceparent: String::new(),
            who,
            caller_id: false,
            choices: 1,
            callback_url: None,
        }
    }

    fn answer(revision: &str) -> InferResult {
        let mut r = InferResult::error("id-1", "echo", retro_fleet_schemas::ErrorCode::Internal, "");
        r.status = Status::Ok;
        r.error = None;
        r.model_revision = Some(revision.into());
        r.output = Some(Output::text("hi", "stop"));
        r.usage = Some(Usage { prompt_tokens: 1, completion_tokens: 1, total_tokens: 2 });
        r
    }

    /// The key a worker at `generation` computes for `p`.
    fn worker_key(p: &Prepared, revision: &str, generation: &str) -> u128 {
        AnswerCache::key_with(generation, p, revision)
    }

    #[test]
    fn keeps_only_answers_under_its_own_generation_and_until_they_expire() {
        let cache = AnswerCache::new(AnswerCacheConfig::default(), &Registry::new()).unwrap();
        let p = prepared("acme", "q");
        cache.generations().set("echo", "g1");
        let now = 1_000_000;

        // a worker that has not seen the purge answers under g0: not kept
        let stale = Cacheable { key: worker_key(&p, "r1", "g0"), expires_ms: now + 10_000 };
        cache.put(&p, &answer("r1"), stale, now);
        assert!(cache.get(&p, now).is_none());

        // under g1: kept, served, per tenant
        let fresh = Cacheable { key: worker_key(&p, "r1", "g1"), expires_ms: now + 10_000 };
        cache.put(&p, &answer("r1"), fresh, now);
        let hit = cache.get(&p, now + 1).expect("kept");
        assert_eq!((hit.cache, hit.id.as_str()), (CacheTier::Ingress, "id-1"));
        assert!(cache.get(&prepared("globex", "q"), now + 1).is_none(), "never another tenant's");
        assert!(cache.get(&prepared("acme", "other"), now + 1).is_none());

        // expired: never served (the worker's expiry, or max_ttl_secs if sooner)
        assert!(cache.get(&p, now + 10_000).is_none());
        let long = Cacheable { key: fresh.key, expires_ms: now + 3_600_000 };
        cache.put(&p, &answer("r1"), long, now);
        assert!(cache.get(&p, now + 59_000).is_some());
        assert!(cache.get(&p, now + 60_000).is_none(), "max_ttl_secs caps the worker's expiry");

        // a purge (new generation) makes it unreachable
        cache.put(&p, &answer("r1"), long, now);
        cache.generations().set("echo", "g2");
        assert!(cache.get(&p, now + 1).is_none());

        // an answer from new model files makes the old revision's unreachable
        cache.put(&p, &answer("r1"), Cacheable { key: worker_key(&p, "r1", "g2"), expires_ms: now + 9_000 }, now);
        assert!(cache.get(&p, now + 1).is_some());
        let other = prepared("acme", "another question");
        cache.put(
            &other,
            &answer("r2"),
            Cacheable { key: worker_key(&other, "r2", "g2"), expires_ms: now + 9_000 },
            now,
        );
        assert!(cache.get(&p, now + 1).is_none(), "revision r1 is no longer the model's");
        assert!(cache.get(&other, now + 1).is_some());
    }
}
