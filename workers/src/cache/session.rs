//! One request's part in the cache, start to end: look the answer up, join
//! an identical request in flight in this worker, claim the key across
//! workers, then keep the answer computed (or give the claim up).
//!
//! The order matters and lives here once: a lookup first; followers of an
//! in-process leader next (they never claim); then a cross-worker claim, so
//! that only one request per worker ever asks the fleet.

use std::sync::Arc;

use retro_fleet_schemas::cache_key::{self, Key, Scope};
use retro_fleet_schemas::{CacheMode, CacheTier, InferRequest, Output, Usage};
use tokio::sync::watch;

use super::answer::Answer;
use super::semantic::Probe;
use super::similar::Neighbour;
use super::store::{Flight, Leader, ResultCache};
use super::sync::Claim;

/// An answer found without computing it.
#[derive(Debug, Clone)]
pub struct Found {
    /// The answer.
    pub answer: Answer,
    /// Where it came from: a tier, or `coalesced` (another request's computation).
    pub tier: CacheTier,
    /// Similarity of the cached prompt (semantic hits).
    pub similarity: Option<f64>,
    /// Where a semantic hit's answer is stored.
    pub entry: Option<Key>,
}

/// The longest an answer is kept, whatever a request asks for (a year):
/// longer lifetimes are cut to it (`Fleet-Cache-Ttl`, `X-Cache-Ttl`).
pub const MAX_TTL_SECS: u64 = 365 * 24 * 3600;

/// A request's part in the cache.
pub struct Session {
    cache: Arc<ResultCache>,
    model: String,
    key: Key,
    /// Semantic bucket and compared text, when the model takes part in the semantic cache.
    semantic: Option<(u128, String)>,
    /// The compared text embedded, once: for the lookup, then for the index.
    probe: Option<Probe>,
    /// A similar prompt's answer to compare the computed one with (a sampled check).
    check: Option<(Key, f64, Answer)>,
    mode: CacheMode,
    ttl_ms: u64,
    leader: Option<Leader>,
    claimed: bool,
}

impl Session {
    /// The cache's part in `req` of `tenant`, answered by a model at
    /// `revision`; `ttl_secs` is the request's own answer lifetime. `None`
    /// when the request is bypassed or not reproducible (each counted).
    pub fn open(
        cache: &Arc<ResultCache>,
        req: &InferRequest,
        tenant: &str,
        revision: &str,
        ttl_secs: Option<u64>,
    ) -> Option<Session> {
        if req.cache == CacheMode::Bypass {
            cache.count(&req.model, "bypass");
            return None;
        }
        if cache.config().deterministic_only && !cache_key::reproducible(&req.input, &req.params) {
            cache.count(&req.model, "uncacheable");
            return None;
        }
        let generation = cache.generations().get(&req.model);
        let scope =
            Scope { tenant, model: &req.model, revision, generation: &generation, adapter: req.adapter.as_deref() };
        let semantic = match cache.semantic_enabled(&req.model) {
            true => cache_key::semantic(&scope, &req.params, &req.input),
            false => None,
        };
        Some(Session {
            cache: cache.clone(),
            model: req.model.clone(),
            key: cache_key::exact(&scope, &req.params, &req.input),
            semantic,
            probe: None,
            check: None,
            mode: req.cache,
            ttl_ms: ttl_secs.unwrap_or(cache.config().ttl_secs).min(MAX_TTL_SECS).saturating_mul(1000),
            leader: None,
            claimed: false,
        })
    }

    /// Whether a stored answer may be served (`use`, `semantic`), or only replaced (`refresh`).
    fn reads(&self) -> bool {
        self.mode != CacheMode::Refresh
    }

    /// A stored answer: exact first, then (mode `semantic`) the nearest
    /// similar prompt's, unless it was drawn to be checked: then this
    /// request computes, and [`Session::keep`] compares.
    pub async fn lookup(&mut self, now_ms: u64) -> Option<Found> {
        if !self.reads() {
            return None;
        }
        let mut hit = self.cache.get(self.key, now_ms).await;
        if hit.is_none() && self.mode == CacheMode::Semantic {
            if let Some((bucket, probe)) = self.indexed().await {
                hit = match self.cache.get_similar(&self.model, bucket, &probe, now_ms).await {
                    Some((Neighbour::Check { entry, similarity }, h)) => {
                        self.check = Some((entry, similarity, h.answer));
                        None
                    }
                    found => found.map(|(_, h)| h),
                };
            }
        }
        let label = match hit.as_ref().map(|h| h.tier) {
            Some(CacheTier::Memory) => "memory",
            Some(CacheTier::Disk) => "disk",
            Some(CacheTier::Semantic) => "semantic",
            _ => "miss",
        };
        self.cache.count(&self.model, label);
        hit.map(|h| Found { answer: h.answer, tier: h.tier, similarity: h.similarity, entry: h.entry })
    }

    /// Joins an identical request in flight in this worker: `None` when
    /// this one leads (it computes), or the leader's answer to wait for with
    /// [`super::store::follow`] (`None` there: the leader gave up; join again).
    pub fn join(&mut self) -> Option<watch::Receiver<Option<Arc<Answer>>>> {
        match self.cache.join(self.key) {
            Flight::Leader(l) => {
                self.leader = Some(l);
                None
            }
            Flight::Follower(rx) => Some(rx),
        }
    }

    /// An answer a leader in this worker shared.
    pub fn coalesced(&self, answer: &Answer) -> Found {
        self.cache.count(&self.model, "coalesced");
        Found { answer: answer.clone(), tier: CacheTier::Coalesced, similarity: None, entry: None }
    }

    /// Claims the key across workers: true when another worker computes it
    /// (wait with [`Session::wait_claim`]), false when this one does.
    pub async fn claim(&mut self) -> bool {
        let Some(claims) = self.cache.claims().filter(|_| self.reads()) else { return false };
        match claims.claim(self.key).await {
            Claim::Mine => {
                self.claimed = true;
                false
            }
            Claim::Theirs => true,
        }
    }

    /// The answer of the worker holding the claim; `None` when it gave up or
    /// took too long (then this request computes).
    pub async fn wait_claim(&self) -> Option<Answer> {
        let claims = self.cache.claims()?;
        let answer = claims.wait(self.key).await;
        if answer.is_none() {
            self.cache.count_claim("timeout");
        }
        answer
    }

    /// Takes another worker's answer as this worker's own: kept here and
    /// shared with this worker's followers.
    pub async fn adopt(&mut self, answer: Answer) -> Found {
        self.cache.count_claim("answered");
        let semantic = self.indexed().await;
        self.cache.put(&self.model, self.key, &answer, semantic);
        if let Some(l) = self.leader.take() {
            l.finish(Some(answer.clone()));
        }
        self.coalesced(&answer)
    }

    /// Keeps a computed answer (here, for a claim's waiters and for this
    /// worker's followers), and compares it with a checked similar
    /// prompt's; returns the key and expiry it is kept under.
    pub async fn keep(mut self, output: &Output, usage: &Usage, now_ms: u64) -> (Key, u64) {
        let answer =
            Answer { output: output.clone(), usage: usage.clone(), expires_ms: now_ms.saturating_add(self.ttl_ms) };
        let semantic = self.indexed().await;
        self.cache.put(&self.model, self.key, &answer, semantic);
        if self.claimed {
            if let Some(claims) = self.cache.claims() {
                claims.answer(self.key, &answer).await;
            }
        }
        let kept = (self.key, answer.expires_ms);
        if let Some(l) = self.leader.take() {
            l.finish(Some(answer));
        }
        // after the answer is shared: waiters here and elsewhere do not wait for the comparison
        if let (Some((entry, similarity, cached)), Some(similar)) = (self.check.take(), self.cache.similar()) {
            similar.check(&self.model, entry, similarity, &cached.output, output).await;
        }
        kept
    }

    /// Gives up without an answer: waiters elsewhere stop waiting for this
    /// worker's claim, followers here join again (the leader is dropped).
    pub async fn abandon(self) {
        if self.claimed {
            if let Some(claims) = self.cache.claims() {
                claims.release(self.key).await;
            }
        }
    }

    /// The key and expiry to record with a result answered by `found`, so
    /// replays of `FLEET_RESULTS` warm caches; none for a semantic hit,
    /// whose answer belongs to another prompt.
    pub fn recorded(&self, found: &Found) -> Option<(Key, u64)> {
        (found.tier != CacheTier::Semantic).then_some((self.key, found.answer.expires_ms))
    }

    /// The semantic bucket and the compared text's probe (embedded on first use).
    async fn indexed(&mut self) -> Option<(u128, Probe)> {
        let (bucket, text) = self.semantic.as_ref()?;
        if self.probe.is_none() {
            self.probe = self.cache.similar()?.probe(&self.model, text).await;
        }
        Some((*bucket, self.probe.clone()?))
    }
}
