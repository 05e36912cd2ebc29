//! The store behind [`ResultCache`]: foyer's hybrid cache (memory over
//! disk) with its metrics and directory lock, the per-model generations,
//! the semantic index, and the identical requests in flight in this worker
//! ([`Flight`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use foyer::{
    BlockEngineConfig, DeviceBuilder, Event, EventListener, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCachePolicy, PsyncIoEngineConfig, Source,
};
use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use retro_fleet_schemas::cache_key::{Generations, Key};
use retro_fleet_schemas::CacheTier;
use tokio::sync::watch;

use super::answer::{Answer, Hit};
use super::config::CacheConfig;
pub use super::error::CacheError;
use super::semantic::Probe;
use super::similar::{Neighbour, Similar};
use super::sync;
use crate::metrics::registered;

/// Cache metrics.
#[derive(Clone)]
struct CacheMetrics {
    lookups: IntCounterVec,
    inserts: IntCounterVec,
    evictions: IntCounter,
    corrupt: IntCounter,
    bytes: IntGaugeVec,
    capacity: IntGaugeVec,
    claims: IntCounterVec,
}

impl CacheMetrics {
    fn new(registry: &Registry) -> prometheus::Result<Self> {
        let counter = |n: &str, h: &str, l: &[&str]| registered(registry, IntCounterVec::new(Opts::new(n, h), l)?);
        let gauge = |n: &str, h: &str, l: &[&str]| registered(registry, IntGaugeVec::new(Opts::new(n, h), l)?);
        Ok(CacheMetrics {
            lookups: counter(
                "fleet_cache_lookups_total",
                "Cache lookups by result: memory, disk, semantic, coalesced, miss, bypass or uncacheable",
                &["model", "result"],
            )?,
            inserts: counter("fleet_cache_inserts_total", "Answers stored", &["model"])?,
            evictions: registered(
                registry,
                IntCounter::new("fleet_cache_evictions_total", "Answers evicted from the memory tier")?,
            )?,
            corrupt: registered(
                registry,
                IntCounter::new("fleet_cache_corrupt_total", "Stored answers that did not decode (dropped)")?,
            )?,
            bytes: gauge("fleet_cache_bytes", "Bytes used, by tier", &["tier"])?,
            capacity: gauge("fleet_cache_capacity_bytes", "Byte budget, by tier", &["tier"])?,
            claims: counter(
                "fleet_cache_claim_waits_total",
                "Waits on another worker's claimed answer, by outcome",
                &["outcome"],
            )?,
        })
    }
}

struct Evictions(IntCounter);

impl EventListener for Evictions {
    type Key = u128;
    type Value = Bytes;
    fn on_leave(&self, reason: Event, _key: &u128, _value: &Bytes) {
        if matches!(reason, Event::Evict) {
            self.0.inc();
        }
    }
}

/// An exclusive lock on the disk tier's directory, held while the cache is open.
struct DirLock(#[allow(dead_code)] std::fs::File);

impl DirLock {
    fn take(dir: &Path) -> std::io::Result<DirLock> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir)?;
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("LOCK"))?;
        // SAFETY: flock on a file descriptor we own; the lock ends when the file closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirLock(f))
    }
}

/// Marks a directory as holding a disk tier of this layout; a mismatch means
/// the files are not ours to read and they are discarded.
const MANIFEST: &str = "retro-fleet-cache.json";
const BLOCK_SIZE: usize = 1 << 20;

fn manifest(disk_bytes: usize) -> String {
    format!("{{\"format\":1,\"block_size\":{BLOCK_SIZE},\"capacity\":{disk_bytes}}}")
}

/// Identical requests in flight: the first computes, the others wait for it.
type Flights = Mutex<HashMap<Key, watch::Receiver<Option<Arc<Answer>>>>>;

/// The result cache of one worker.
pub struct ResultCache {
    store: HybridCache<u128, Bytes>,
    cfg: CacheConfig,
    disk: Option<PathBuf>,
    generations: Arc<Generations>,
    flights: Flights,
    /// The semantic cache, when a model takes part.
    similar: Option<Similar>,
    metrics: CacheMetrics,
    claims: Option<sync::Claims>,
    _lock: Option<DirLock>,
}

impl ResultCache {
    /// Opens the cache. A disk tier that cannot be read is discarded with a
    /// warning and rebuilt; if even that fails, the worker runs memory-only.
    pub async fn open(cfg: &CacheConfig, data_dir: &Path, registry: &Registry) -> Result<ResultCache, CacheError> {
        let metrics = CacheMetrics::new(registry)?;
        let similar = Similar::open(cfg, registry)?;
        let dir = cfg.dir.clone().unwrap_or_else(|| data_dir.join("cache"));
        let mut lock = None;
        if cfg.disk_bytes > 0 {
            match DirLock::take(&dir) {
                Ok(l) => lock = Some(l),
                Err(e) => tracing::warn!(
                    dir = %dir.display(), error = %e,
                    "cache directory is in use by another process or not writable; running the cache memory-only \
                     (give each worker its own `worker.cache.dir`)"
                ),
            }
        }
        let mut store = None;
        if lock.is_some() {
            store = match Self::build(cfg, Some(&dir), &metrics).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "disk cache unreadable; discarding it");
                    discard(&dir);
                    Self::build(cfg, Some(&dir), &metrics)
                        .await
                        .map_err(|e| tracing::warn!(error = %e, "disk cache still unusable; running memory-only"))
                        .ok()
                }
            };
        }
        let disk = store.as_ref().map(|_| dir.clone());
        if let (Some(similar), Some(dir)) = (&similar, &disk) {
            similar.load(dir, crate::clock::unix_ms());
        }
        let store = match store {
            Some(s) => s,
            None => Self::build(cfg, None, &metrics).await.map_err(|e| CacheError::Build(e.to_string()))?,
        };
        metrics.capacity.with_label_values(&["memory"]).set(cfg.memory_bytes as i64);
        metrics.capacity.with_label_values(&["disk"]).set(if disk.is_some() { cfg.disk_bytes as i64 } else { 0 });
        tracing::info!(
            memory_bytes = cfg.memory_bytes,
            disk = %disk.as_ref().map(|d| d.display().to_string()).unwrap_or_else(|| "off".into()),
            disk_bytes = cfg.disk_bytes,
            "result cache open"
        );
        Ok(ResultCache {
            store,
            cfg: cfg.clone(),
            disk,
            generations: Arc::default(),
            flights: Mutex::new(HashMap::new()),
            similar,
            metrics,
            claims: None,
            _lock: lock,
        })
    }

    async fn build(
        cfg: &CacheConfig,
        dir: Option<&Path>,
        metrics: &CacheMetrics,
    ) -> Result<HybridCache<u128, Bytes>, Box<dyn std::error::Error + Send + Sync>> {
        let builder = HybridCacheBuilder::new()
            .with_name("fleet-results")
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            .with_flush_on_close(true)
            .with_event_listener(Arc::new(Evictions(metrics.evictions.clone())))
            .memory(cfg.memory_bytes.max(1 << 16))
            .with_weighter(|_k: &u128, v: &Bytes| 16 + v.len())
            .storage();
        let Some(dir) = dir else {
            return Ok(builder.build().await?);
        };
        std::fs::create_dir_all(dir)?;
        let path = dir.join(MANIFEST);
        let want = manifest(cfg.disk_bytes);
        match std::fs::read_to_string(&path) {
            Ok(have) if have == want => {}
            Ok(_) => return Err("the cache manifest does not match this layout or budget".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::fs::read_dir(dir)?.flatten().any(|e| e.file_name() != "LOCK") {
                    return Err("files without a cache manifest".into());
                }
                std::fs::write(&path, &want)?;
            }
            Err(e) => return Err(e.into()),
        }
        let device =
            FsDeviceBuilder::new(dir.join("blocks")).with_capacity(cfg.disk_bytes.max(4 * BLOCK_SIZE)).build()?;
        Ok(builder
            .with_io_engine_config(PsyncIoEngineConfig::new())
            .with_engine_config(BlockEngineConfig::new(device).with_block_size(BLOCK_SIZE))
            .build()
            .await?)
    }

    /// Settings.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Whether a disk tier is open.
    pub fn has_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// Enables cross-worker coalescing through KV claims.
    pub fn with_claims(mut self, claims: sync::Claims) -> Self {
        self.claims = Some(claims);
        self
    }

    /// Cross-worker claims, when enabled.
    pub fn claims(&self) -> Option<&sync::Claims> {
        self.claims.as_ref()
    }

    /// The models' cache generations (followed from KV `fleet_models`).
    pub fn generations(&self) -> &Arc<Generations> {
        &self.generations
    }

    /// Whether `model` takes part in the semantic cache.
    pub fn semantic_enabled(&self, model: &str) -> bool {
        self.cfg.semantic_models.iter().any(|m| m == model || m == "*")
    }

    /// Counts a lookup outcome.
    pub fn count(&self, model: &str, result: &str) {
        self.metrics.lookups.with_label_values(&[model, result]).inc();
    }

    /// Requests answered from the cache, and requests it could not answer,
    /// since start (bypassed and uncacheable requests are neither). A
    /// coalesced answer was first counted a miss: it moves to the hits.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        let (mut hits, mut misses, mut coalesced) = (0u64, 0u64, 0u64);
        for family in self.metrics.lookups.collect() {
            for m in family.get_metric() {
                let n = m.get_counter().get_value() as u64;
                match m.get_label().iter().find(|l| l.name() == "result").map_or("", |l| l.value()) {
                    "miss" => misses += n,
                    "coalesced" => coalesced += n,
                    "bypass" | "uncacheable" => {}
                    _ => hits += n,
                }
            }
        }
        (hits + coalesced, misses.saturating_sub(coalesced))
    }

    /// Counts a wait on another worker's claim.
    pub fn count_claim(&self, outcome: &str) {
        self.metrics.claims.with_label_values(&[outcome]).inc();
    }

    /// The unexpired answer stored under `key`, and its tier.
    pub async fn get(&self, key: Key, now_ms: u64) -> Option<Hit> {
        let entry = match self.store.get(&key.0).await {
            Ok(Some(e)) => e,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(error = %e, "cache read failed; treating as a miss");
                return None;
            }
        };
        let tier = if entry.source() == Source::Disk { CacheTier::Disk } else { CacheTier::Memory };
        let Some(answer) = Answer::decode(entry.value()) else {
            self.metrics.corrupt.inc();
            self.store.remove(&key.0);
            return None;
        };
        if answer.expires_ms <= now_ms {
            self.store.remove(&key.0);
            return None;
        }
        Some(Hit { answer, tier, similarity: None, entry: None })
    }

    /// The semantic cache, when a model takes part.
    pub fn similar(&self) -> Option<&Similar> {
        self.similar.as_ref()
    }

    /// What the nearest prompt in `bucket` offers `probe`: an answer to
    /// serve (`Hit`) or to check the computed one against (`Check`).
    pub async fn get_similar(&self, model: &str, bucket: u128, probe: &Probe, now_ms: u64) -> Option<(Neighbour, Hit)> {
        let near = self.similar.as_ref()?.nearest(model, bucket, probe, now_ms);
        let (Neighbour::Hit { entry, similarity } | Neighbour::Check { entry, similarity }) = near else { return None };
        let mut hit = self.get(entry, now_ms).await?;
        hit.tier = CacheTier::Semantic;
        hit.similarity = Some(similarity);
        hit.entry = Some(entry);
        Some((near, hit))
    }

    /// Stores `answer` under `key` (and in the semantic index when given its bucket and prompt).
    pub fn put(&self, model: &str, key: Key, answer: &Answer, semantic: Option<(u128, Probe)>) {
        self.store.insert(key.0, answer.encode());
        if let (Some((bucket, probe)), Some(similar)) = (semantic, &self.similar) {
            similar.insert(bucket, probe, key, answer.expires_ms);
        }
        self.metrics.inserts.with_label_values(&[model]).inc();
        self.metrics.bytes.with_label_values(&["memory"]).set(self.store.memory().usage() as i64);
    }

    /// Joins the computation of `key`: the first caller leads (computes and
    /// calls [`Leader::finish`]); later callers follow and wait for its answer.
    pub fn join(self: &Arc<Self>, key: Key) -> Flight {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(rx) = flights.get(&key) {
            return Flight::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key, rx);
        Flight::Leader(Leader { cache: self.clone(), key, tx: Some(tx) })
    }

    /// Flushes and closes the cache (the disk tier keeps what was written).
    pub async fn close(&self) {
        if let (Some(similar), Some(dir)) = (&self.similar, &self.disk) {
            similar.save(dir);
        }
        if let Err(e) = self.store.close().await {
            tracing::warn!(error = %e, "closing the cache failed");
        }
    }
}

fn discard(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name() == "LOCK" {
            continue;
        }
        let p = entry.path();
        let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
    }
}

/// One's part in an in-flight computation.
pub enum Flight {
    /// Compute, then [`Leader::finish`].
    Leader(Leader),
    /// Wait for the leader: `Some` answer, or `None` if it failed (then join again).
    Follower(watch::Receiver<Option<Arc<Answer>>>),
}

/// The request computing an answer others may wait for.
pub struct Leader {
    cache: Arc<ResultCache>,
    key: Key,
    tx: Option<watch::Sender<Option<Arc<Answer>>>>,
}

impl Leader {
    /// Hands the answer (or `None` on failure) to the followers.
    pub fn finish(mut self, answer: Option<Answer>) {
        self.cache.flights.lock().expect("flights lock").remove(&self.key);
        if let (Some(tx), Some(a)) = (self.tx.take(), answer) {
            let _ = tx.send(Some(Arc::new(a)));
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if self.tx.is_some() {
            // failed or cancelled: followers see the channel close and retry
            self.cache.flights.lock().expect("flights lock").remove(&self.key);
        }
    }
}

/// Waits for a leader's answer; `None` when it gave up.
pub async fn follow(mut rx: watch::Receiver<Option<Arc<Answer>>>) -> Option<Arc<Answer>> {
    rx.wait_for(Option::is_some).await.ok().and_then(|v| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use retro_fleet_schemas::{Output, Usage};

    fn answer(text: &str, expires_ms: u64) -> Answer {
        Answer { output: Output::text(text, "stop"), usage: Usage::default(), expires_ms }
    }

    fn cfg() -> CacheConfig {
        CacheConfig { memory_bytes: 1 << 20, disk_bytes: 16 << 20, ..Default::default() }
    }

    #[tokio::test]
    async fn memory_hit_then_disk_after_reopen_then_promoted() {
        let dir = tempfile::tempdir().unwrap();
        let c = ResultCache::open(&cfg(), dir.path(), &Registry::new()).await.unwrap();
        assert!(c.has_disk());
        assert!(c.get(Key(1), 0).await.is_none());
        c.put("m", Key(1), &answer("one", u64::MAX), None);
        let hit = c.get(Key(1), 0).await.unwrap();
        assert_eq!((hit.tier, hit.answer.output.text.as_str()), (CacheTier::Memory, "one"));
        c.close().await;
        drop(c);

        let c = ResultCache::open(&cfg(), dir.path(), &Registry::new()).await.unwrap();
        let hit = c.get(Key(1), 0).await.expect("the disk tier survives a restart");
        assert_eq!((hit.tier, hit.answer.output.text.as_str()), (CacheTier::Disk, "one"));
        assert_eq!(c.get(Key(1), 0).await.unwrap().tier, CacheTier::Memory, "a disk hit is promoted");
    }

    #[tokio::test]
    async fn the_semantic_index_survives_a_restart_with_the_disk_tier() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CacheConfig { semantic_models: vec!["m".into()], semantic_threshold: Some(0.5), ..cfg() };
        let c = ResultCache::open(&cfg, dir.path(), &Registry::new()).await.unwrap();
        let probe = |_: &ResultCache, t: &str| Probe::new(t, crate::embed::lexical::embed(t));
        c.put("m", Key(1), &answer("Paris", u64::MAX), Some((9, probe(&c, "What is the capital of France?"))));
        c.put("m", Key(2), &answer("gone", 1), Some((9, probe(&c, "What is the capital of Spain?"))));
        let near = probe(&c, "what is the capital city of france");
        let vetoed = probe(&c, "tell me the capital of france");
        assert!(c.get_similar("m", 9, &vetoed, 0).await.is_some(), "similar enough at 0.5");
        assert!(c.similar().unwrap().feedback("m", Key(1), 0.8, retro_fleet_schemas::Verdict::Wrong));
        c.close().await;
        drop(c);

        let c = ResultCache::open(&cfg, dir.path(), &Registry::new()).await.unwrap();
        let (_, hit) = c.get_similar("m", 9, &near, 0).await.expect("the index survives with the disk tier");
        assert_eq!((hit.entry, hit.answer.output.text.as_str()), (Some(Key(1)), "Paris"));
        assert!(c.get_similar("m", 9, &vetoed, 0).await.is_none(), "and so do its vetoes");
        assert!(
            !c.similar().unwrap().feedback("m", Key(2), 0.5, retro_fleet_schemas::Verdict::Wrong),
            "expired: not loaded"
        );
        c.close().await;
        drop(c);

        // memory-only: nothing to survive with
        let c = ResultCache::open(&CacheConfig { disk_bytes: 0, ..cfg }, dir.path(), &Registry::new()).await.unwrap();
        assert!(c.get_similar("m", 9, &near, 0).await.is_none());
    }

    #[tokio::test]
    async fn expired_answers_are_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let c = ResultCache::open(&cfg(), dir.path(), &Registry::new()).await.unwrap();
        c.put("m", Key(2), &answer("two", 1_000), None);
        assert!(c.get(Key(2), 999).await.is_some());
        assert!(c.get(Key(2), 1_000).await.is_none());
        assert!(c.get(Key(2), 5_000).await.is_none());
    }

    #[tokio::test]
    async fn a_corrupted_disk_tier_is_discarded_and_the_cache_still_works() {
        let dir = tempfile::tempdir().unwrap();
        let c = ResultCache::open(&cfg(), dir.path(), &Registry::new()).await.unwrap();
        c.put("m", Key(3), &answer("three", u64::MAX), None);
        c.close().await;
        drop(c);
        let cache_dir = dir.path().join("cache");
        std::fs::write(cache_dir.join(MANIFEST), "garbage").unwrap();
        for f in std::fs::read_dir(cache_dir.join("blocks")).unwrap().flatten() {
            std::fs::write(f.path(), vec![0xA5u8; 4096]).unwrap();
        }
        let c = ResultCache::open(&cfg(), dir.path(), &Registry::new()).await.unwrap();
        assert!(c.has_disk(), "rebuilt, not disabled");
        assert!(c.get(Key(3), 0).await.is_none());
        c.put("m", Key(4), &answer("four", u64::MAX), None);
        assert!(c.get(Key(4), 0).await.is_some());
    }

    #[tokio::test]
    async fn a_second_process_on_the_same_dir_runs_memory_only() {
        let dir = tempfile::tempdir().unwrap();
        let a = ResultCache::open(&cfg(), dir.path(), &Registry::new()).await.unwrap();
        let b = ResultCache::open(&cfg(), dir.path(), &Registry::new()).await.unwrap();
        assert!(a.has_disk());
        assert!(!b.has_disk());
    }

    #[tokio::test]
    async fn followers_get_the_leaders_answer_and_retry_when_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(ResultCache::open(&cfg(), dir.path(), &Registry::new()).await.unwrap());
        let Flight::Leader(lead) = c.join(Key(5)) else { panic!("first joiner leads") };
        let Flight::Follower(rx) = c.join(Key(5)) else { panic!("second joiner follows") };
        lead.finish(Some(answer("five", u64::MAX)));
        assert_eq!(follow(rx).await.unwrap().output.text, "five");

        let Flight::Leader(lead) = c.join(Key(6)) else { panic!() };
        let Flight::Follower(rx) = c.join(Key(6)) else { panic!() };
        drop(lead);
        assert!(follow(rx).await.is_none());
        assert!(matches!(c.join(Key(6)), Flight::Leader(_)), "after a failure the next joiner leads");
    }
}
