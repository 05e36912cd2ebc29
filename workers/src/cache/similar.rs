//! The semantic side of a worker's cache: embeds prompts, finds the
//! nearest cached one, decides whether it answers, checks a sample of
//! candidates against the model ([`calibrate`](super::calibrate)), and
//! takes feedback about answers it gave.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use retro_fleet_schemas::cache_key::Key;
use retro_fleet_schemas::{Output, Verdict};
use serde::{Deserialize, Serialize};

use super::calibrate::{Calibration, Learning};
use super::config::CacheConfig;
use super::error::CacheError;
use super::semantic::{negations, Build, Index, Probe, Saved};
use crate::embed::EmbedderConfig;
use crate::embed::{self, Embedder};
use crate::metrics::registered;

/// What the nearest cached prompt is to a lookup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Neighbour {
    /// Its answer is served.
    Hit {
        /// Where the answer is stored.
        entry: Key,
        /// How similar the prompts are.
        similarity: f64,
    },
    /// The request is computed, and its answer compared with this entry's
    /// ([`Similar::check`]): a sampled candidate.
    Check {
        /// Where the compared answer is stored.
        entry: Key,
        /// How similar the prompts are.
        similarity: f64,
    },
    /// No answer close enough.
    Miss,
}

/// The saved index's file, beside the disk tier.
const SAVED: &str = "semantic-index.msgpack";

/// The index as saved: who embedded it, and its entries.
#[derive(Serialize, Deserialize)]
struct SavedIndex {
    format: u32,
    /// [`Similar::embedders`] of the worker that saved it.
    embedders: String,
    entries: Vec<Saved>,
}

struct Metrics {
    embed_seconds: HistogramVec,
    checks: IntCounterVec,
    feedback: IntCounterVec,
}

/// How one model's prompts are compared.
struct Comparer {
    embedder: Arc<dyn Embedder>,
    /// Least similarity for a hit while nothing is learned.
    threshold: f64,
    /// Least similarity of a candidate.
    floor: f64,
}

/// The semantic cache of one worker.
pub struct Similar {
    index: Arc<Mutex<Index>>,
    /// For models without their own (`semantic_embedder`).
    default: Comparer,
    /// Models with their own embedder (`semantic_embedders`).
    models: HashMap<String, Comparer>,
    verify: f64,
    bound: Option<f64>,
    calibrations: Mutex<HashMap<String, Calibration>>,
    metrics: Metrics,
}

impl Similar {
    /// The semantic cache `cfg` describes; `None` when no model takes part.
    pub fn open(cfg: &CacheConfig, registry: &Registry) -> Result<Option<Similar>, CacheError> {
        if cfg.semantic_models.is_empty() {
            return Ok(None);
        }
        // one embedder per distinct setting, however many models share it
        let mut loaded: Vec<(EmbedderConfig, Arc<dyn Embedder>)> = Vec::new();
        let mut comparer = |e: &EmbedderConfig| -> Result<Comparer, CacheError> {
            let embedder = match loaded.iter().find(|(c, _)| c == e) {
                Some((_, x)) => x.clone(),
                None => {
                    let x = embed::load(e)?;
                    loaded.push((e.clone(), x.clone()));
                    x
                }
            };
            let threshold = cfg.semantic_threshold.unwrap_or(embedder.default_threshold());
            Ok(Comparer { embedder, threshold, floor: cfg.semantic_verify_floor.unwrap_or(threshold - 0.1) })
        };
        let default = comparer(&cfg.semantic_embedder)?;
        let mut models = HashMap::new();
        for (model, e) in &cfg.semantic_embedders {
            if !cfg.semantic_models.iter().any(|m| m == model || m == "*") {
                return Err(CacheError::Config(format!(
                    "semantic_embedders names `{model}`, which is not in semantic_models: add it there too"
                )));
            }
            models.insert(model.clone(), comparer(e)?);
        }
        let verify = cfg.semantic_verify_fraction;
        if !(0.0..=1.0).contains(&verify) {
            return Err(CacheError::Config(format!("semantic_verify_fraction is {verify}: give a share from 0 to 1")));
        }
        let bound = match cfg.semantic_error_bound {
            None => None,
            Some(b) if !(b > 0.0 && b < 1.0) => {
                return Err(CacheError::Config(format!("semantic_error_bound is {b}: give a share such as 0.02")))
            }
            Some(_) if verify == 0.0 => {
                return Err(CacheError::Config(
                    "semantic_error_bound learns from checked answers: also set semantic_verify_fraction \
                     (e.g. 0.05, the share of candidates computed again and compared)"
                        .into(),
                ))
            }
            Some(bound) => Some(bound),
        };
        let counter = |n: &str, h: &str, l: &[&str]| registered(registry, IntCounterVec::new(Opts::new(n, h), l)?);
        let metrics = Metrics {
            embed_seconds: registered(
                registry,
                HistogramVec::new(
                    HistogramOpts::new("fleet_cache_embed_seconds", "Time to embed a prompt for the semantic cache")
                        .buckets(vec![1e-5, 1e-4, 1e-3, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0]),
                    &["embedder"],
                )?,
            )?,
            checks: counter(
                "fleet_cache_semantic_checks_total",
                "Semantic candidates computed again and compared with the cached answer, by outcome",
                &["model", "outcome"],
            )?,
            feedback: counter(
                "fleet_cache_feedback_total",
                "Verdicts on semantic answers sent to /v1/cache/feedback, by verdict",
                &["model", "verdict"],
            )?,
        };
        Ok(Some(Similar {
            index: Arc::new(Mutex::new(Index::new(cfg.semantic_max_entries))),
            default,
            models,
            verify,
            bound,
            calibrations: Mutex::default(),
            metrics,
        }))
    }

    /// How `model`'s prompts are compared.
    fn comparer(&self, model: &str) -> &Comparer {
        self.models.get(model).unwrap_or(&self.default)
    }

    /// How `model`'s threshold is learned, when it is.
    fn learning(&self, model: &str) -> Option<Learning> {
        let bound = self.bound?;
        Some(Learning { bound, floor: self.comparer(model).floor, verify: self.verify })
    }

    /// Embeds `texts` with `model`'s embedder off the async threads (a
    /// BERT takes milliseconds); `None` when it failed (logged).
    async fn embed(&self, model: &str, texts: Vec<String>) -> Option<Vec<Vec<f32>>> {
        let embedder = self.comparer(model).embedder.clone();
        let timer = self.metrics.embed_seconds.with_label_values(&[embedder.name()]).start_timer();
        let done = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            embedder.embed(&refs)
        })
        .await;
        timer.observe_duration();
        match done {
            Ok(Ok(e)) => Some(e.vectors),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "embedding failed; answering without the semantic cache");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "the embedding task ended; answering without the semantic cache");
                None
            }
        }
    }

    /// `text`, a prompt to `model`, as the index compares it.
    pub async fn probe(&self, model: &str, text: &str) -> Option<Probe> {
        let vector = self.embed(model, vec![text.to_owned()]).await?.pop()?;
        Some(Probe::new(text, vector))
    }

    /// The threshold a hit of `model` needs now: learned, or the static one.
    pub fn threshold(&self, model: &str) -> f64 {
        let fixed = self.comparer(model).threshold;
        match self.learning(model) {
            Some(l) => {
                self.calibrations.lock().expect("calibrations").get(model).map_or(fixed, |c| c.threshold(&l, fixed))
            }
            None => fixed,
        }
    }

    /// What the nearest prompt in `bucket` is to `probe`: a hit, a
    /// candidate to check, or nothing.
    pub fn nearest(&self, model: &str, bucket: u128, probe: &Probe, now_ms: u64) -> Neighbour {
        let threshold = self.threshold(model);
        let floor = self.comparer(model).floor;
        let least = if self.verify > 0.0 { threshold.min(floor) } else { threshold };
        let near = self.index.lock().expect("semantic lock").nearest(bucket, probe, least, now_ms);
        let candidate = near.filter(|(_, s)| *s >= floor);
        self.calibrate(model, |c| c.lookup(candidate.is_some()));
        match (near, candidate) {
            (_, Some((entry, similarity))) if self.verify > 0.0 && fastrand::f64() < self.verify => {
                Neighbour::Check { entry, similarity }
            }
            (Some((entry, similarity)), _) if similarity >= threshold => Neighbour::Hit { entry, similarity },
            _ => Neighbour::Miss,
        }
    }

    /// Updates what `model`'s lookups have shown, when its threshold is learned.
    fn calibrate(&self, model: &str, f: impl FnOnce(&mut Calibration)) {
        if self.bound.is_some() {
            f(self.calibrations.lock().expect("calibrations").entry(model.to_owned()).or_default());
        }
    }

    /// Indexes the prompt `probe` of `bucket`, answered under `key`.
    pub fn insert(&self, bucket: u128, probe: Probe, key: Key, expires_ms: u64) {
        let mut index = self.index.lock().expect("semantic lock");
        index.insert(bucket, probe, key, expires_ms);
        let builds = index.builds();
        drop(index);
        self.build(builds);
    }

    /// Builds graphs on the blocking threads, so lookups go on (scanning
    /// the bucket) meanwhile; here and now outside a runtime.
    fn build(&self, builds: Vec<Build>) {
        for b in builds {
            let index = self.index.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(async move {
                    match tokio::task::spawn_blocking(move || b.run()).await {
                        Ok(built) => index.lock().expect("semantic lock").install(built),
                        Err(e) => tracing::warn!(error = %e, "building a semantic graph failed; the bucket is scanned"),
                    }
                })),
                Err(_) => {
                    let built = b.run();
                    index.lock().expect("semantic lock").install(built);
                }
            }
        }
    }

    /// Compares the answer `computed` for a checked candidate with the
    /// `cached` answer of `entry` (`similarity` apart): equal texts, or
    /// texts the embedder puts at least the static threshold together,
    /// agree. A disagreement vetoes the entry for that neighbour; with a
    /// bound set, the outcome teaches `model`'s threshold.
    pub async fn check(&self, model: &str, entry: Key, similarity: f64, cached: &Output, computed: &Output) {
        let Some(agreed) = self.agree(model, cached, computed).await else { return };
        self.calibrate(model, |c| c.observe(similarity, agreed));
        if !agreed {
            self.index.lock().expect("semantic lock").veto(entry, similarity);
        }
        let outcome = if agreed { "agreed" } else { "disagreed" };
        self.metrics.checks.with_label_values(&[model, outcome]).inc();
        tracing::debug!(model, entry = %entry.hex(), similarity, outcome, "semantic candidate checked");
    }

    /// Whether two answers say the same; `None` when they could not be embedded.
    async fn agree(&self, model: &str, a: &Output, b: &Output) -> Option<bool> {
        let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        if a.tool_calls != b.tool_calls || negations(&a.text) != negations(&b.text) {
            // other calls, or "yes it is" against "no it is not": embeddings put those close
            return Some(false);
        }
        if norm(&a.text) == norm(&b.text) {
            return Some(true);
        }
        if a.text.trim().is_empty() || b.text.trim().is_empty() {
            return Some(false);
        }
        let v = self.embed(model, vec![a.text.clone(), b.text.clone()]).await?;
        Some(embed::similarity(&v[0], &v[1]) >= self.comparer(model).threshold)
    }

    /// A caller's verdict on the answer of `entry` to a prompt `similarity`
    /// similar: a wrong one vetoes the entry for it. True when this worker
    /// holds the entry.
    pub fn feedback(&self, model: &str, entry: Key, similarity: f64, verdict: Verdict) -> bool {
        let mut index = self.index.lock().expect("semantic lock");
        let held = match verdict {
            Verdict::Wrong => index.veto(entry, similarity),
            Verdict::Correct => index.holds(entry),
        };
        if held {
            self.metrics.feedback.with_label_values(&[model, verdict.as_str()]).inc();
        }
        held
    }

    /// Which embedder each model's prompts were embedded with.
    fn embedders(&self) -> String {
        let named = |c: &Comparer| format!("{}/{}", c.embedder.name(), c.embedder.dim());
        let mut models: Vec<String> = self.models.iter().map(|(m, c)| format!("{m}={}", named(c))).collect();
        models.sort();
        format!("*={};{}", named(&self.default), models.join(";"))
    }

    /// Saves the index beside the disk tier in `dir` (at close), so that a
    /// restarted worker finds similar prompts among the answers the disk
    /// tier kept. Written whole to a temporary file, then renamed.
    pub fn save(&self, dir: &Path) {
        let saved = SavedIndex {
            format: 1,
            embedders: self.embedders(),
            entries: self.index.lock().expect("semantic lock").saved(),
        };
        let n = saved.entries.len();
        let tmp = dir.join(format!("{SAVED}.tmp"));
        let written = rmp_serde::to_vec(&saved)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, dir.join(SAVED)));
        match written {
            Ok(()) => tracing::info!(prompts = n, "semantic index saved"),
            Err(e) => tracing::warn!(error = %e, "saving the semantic index failed; it starts empty next time"),
        }
    }

    /// Loads (and removes) an index [`Similar::save`] wrote, unless other
    /// embedders made it; expired prompts and vectors that are not finite
    /// stay out. The prompts loaded.
    pub fn load(&self, dir: &Path, now_ms: u64) -> usize {
        let Ok(bytes) = std::fs::read(dir.join(SAVED)) else { return 0 };
        // taken, not copied: after a crash the worker starts empty rather
        // than from an older snapshot missing later vetoes
        if let Err(e) = std::fs::remove_file(dir.join(SAVED)) {
            tracing::warn!(error = %e, "cannot remove the saved semantic index; starting it empty");
            return 0;
        }
        let saved: SavedIndex = match rmp_serde::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "the saved semantic index does not decode; starting it empty");
                return 0;
            }
        };
        if (saved.format, &saved.embedders) != (1, &self.embedders()) {
            tracing::info!(saved = %saved.embedders, "the saved semantic index is other embedders'; starting it empty");
            return 0;
        }
        let mut index = self.index.lock().expect("semantic lock");
        let mut n = 0;
        for e in saved.entries.into_iter().filter(|e| e.expires_ms() > now_ms && e.is_finite()) {
            index.restore(e);
            n += 1;
        }
        let builds = index.builds();
        drop(index);
        self.build(builds);
        tracing::info!(prompts = n, "semantic index loaded");
        n
    }

    /// Checks recorded for `model` (for tests and the admin view).
    pub fn observed(&self, model: &str) -> u64 {
        self.calibrations.lock().expect("calibrations").get(model).map_or(0, Calibration::observed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(f: impl FnOnce(&mut CacheConfig)) -> Result<Option<Similar>, CacheError> {
        let mut cfg = CacheConfig { semantic_models: vec!["m".into()], ..Default::default() };
        f(&mut cfg);
        Similar::open(&cfg, &Registry::new())
    }

    #[test]
    fn settings_out_of_range_are_refused_with_what_to_set() {
        let e = open(|c| c.semantic_error_bound = Some(0.02)).err().expect("refused").to_string();
        assert!(e.contains("semantic_verify_fraction"), "{e}");
        let e = open(|c| c.semantic_verify_fraction = 1.5).err().expect("refused").to_string();
        assert!(e.contains("from 0 to 1"), "{e}");
        let e = open(|c| {
            c.semantic_error_bound = Some(2.0);
            c.semantic_verify_fraction = 0.1;
        })
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("such as 0.02"), "{e}");
        let learning = open(|c| {
            c.semantic_error_bound = Some(0.02);
            c.semantic_verify_fraction = 0.1;
        })
        .unwrap()
        .expect("a semantic cache");
        assert_eq!(learning.threshold("m"), 0.95, "the lexical embedder's own until checks come in");
        assert!(open(|c| c.semantic_models.clear()).unwrap().is_none());
    }

    #[cfg(feature = "mistralrs")]
    #[tokio::test]
    async fn each_model_is_compared_with_its_own_embedder() {
        use crate::embed::BertConfig;
        let minilm = EmbedderConfig::Bert(BertConfig { path: retro_fleet_testkit::minilm_dir() });
        let s = open(|c| {
            c.semantic_models = vec!["chat".into(), "faq".into(), "docs".into()];
            c.semantic_embedders = [("faq".to_string(), minilm.clone()), ("docs".to_string(), minilm.clone())].into();
        })
        .unwrap()
        .unwrap();
        assert_eq!((s.threshold("chat"), s.threshold("faq")), (0.95, 0.975), "each embedder's own threshold");
        assert!(Arc::ptr_eq(&s.comparer("faq").embedder, &s.comparer("docs").embedder), "loaded once");
        let (chat, faq) =
            (s.probe("chat", "Is NATS fast?").await.unwrap(), s.probe("faq", "Is NATS fast?").await.unwrap());
        assert_eq!((chat.vector.len(), faq.vector.len()), (512, 384));
        assert_eq!(s.embedders(), "*=lexical/512;docs=all-MiniLM-L6-v2/384;faq=all-MiniLM-L6-v2/384");

        let e = open(|c| c.semantic_embedders = [("other".to_string(), minilm)].into()).err().unwrap().to_string();
        assert!(e.contains("not in semantic_models"), "{e}");
    }
}
