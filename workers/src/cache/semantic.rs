//! Semantic cache index: nearest neighbour over prompt embeddings.
//!
//! A prompt is held as a [`Probe`]: its embedding (from the worker's
//! [`crate::embed::Embedder`]) and how many negations it holds. Embeddings
//! of "Is NATS fast?" and "Is NATS not fast?" are close under any embedder
//! this project runs, while their answers are opposite: a hit needs equal
//! negation counts as well as a similarity above the threshold.
//!
//! Entries live in buckets whose key already fixes tenant, model, revision,
//! adapter, parameters and earlier turns (see [`retro_fleet_schemas::cache_key::semantic`]); the
//! index only ever compares prompts inside one bucket. A bucket is scanned
//! until it holds [`ANN_FROM`] prompts; from then on an HNSW graph
//! ([`super::ann`]) finds the nearest candidates, and exact similarities
//! decide among them.

use std::collections::{HashMap, VecDeque};

use retro_fleet_schemas::cache_key::Key;
use serde::{Deserialize, Serialize};

use super::ann::{Ann, ANN_FROM};
use crate::embed::similarity;

/// Words that turn a question around. A word ending in `n't` counts too.
const NEGATIONS: &[&str] = &[
    "not", "no", "never", "none", "nothing", "nobody", "nowhere", "neither", "nor", "without", "cannot", "dont",
    "doesnt", "didnt", "isnt", "arent", "wasnt", "werent", "cant", "couldnt", "wont", "wouldnt", "shouldnt", "hasnt",
    "havent", "hadnt",
];

/// How many negations `text` holds.
pub fn negations(text: &str) -> u8 {
    let lower = text.to_lowercase().replace('\u{2019}', "'");
    let n = lower
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| w.ends_with("n't") || NEGATIONS.contains(&w.trim_matches('\'')))
        .count();
    n.min(u8::MAX as usize) as u8
}

/// A prompt as the index compares it.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Its unit-length embedding.
    pub vector: Vec<f32>,
    /// Its negation count ([`negations`]).
    pub negations: u8,
}

impl Probe {
    /// The probe of `text`, embedded as `vector`.
    pub fn new(text: &str, vector: Vec<f32>) -> Probe {
        Probe { vector, negations: negations(text) }
    }
}

struct Entry {
    probe: Probe,
    key: Key,
    expires_ms: u64,
    /// The entry answers only prompts more similar than this: the
    /// similarity of the closest neighbour it answered wrongly.
    veto: f64,
}

/// An entry as saved across a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    bucket: u128,
    key: u128,
    vector: Vec<f32>,
    negations: u8,
    expires_ms: u64,
    veto: f64,
}

impl Saved {
    /// Unix ms after which the entry's answer is not served.
    pub fn expires_ms(&self) -> u64 {
        self.expires_ms
    }

    /// Whether every number of its vector is finite (a damaged file's may not be).
    pub fn is_finite(&self) -> bool {
        self.vector.iter().all(|x| x.is_finite())
    }
}

/// Nearest candidates a graph search returns, before exact similarities decide.
const ANN_CANDIDATES: usize = 8;

/// One bucket's prompts: slots (emptied when a prompt leaves, compacted
/// when half are empty) and, from [`ANN_FROM`] prompts, a graph over them.
/// Graphs are built off the index's lock ([`Index::builds`]); until one is
/// in, the bucket is scanned.
#[derive(Default)]
struct Bucket {
    slots: Vec<Option<Entry>>,
    live: usize,
    ann: Option<Ann>,
    /// A graph is being built for it.
    building: bool,
    /// Compactions so far: a graph built before the last one names old slots.
    epoch: u64,
}

/// A graph to build for one bucket, from a snapshot of its prompts.
pub struct Build {
    bucket: u128,
    epoch: u64,
    /// Slots at the snapshot: later ones are added when the graph is installed.
    upto: usize,
    points: Vec<(usize, Vec<f32>)>,
}

/// A graph built, to install with [`Index::install`].
pub struct Built {
    bucket: u128,
    epoch: u64,
    upto: usize,
    ann: Ann,
}

impl Build {
    /// Builds the graph (hundreds of ms for thousands of prompts: run it off async threads).
    pub fn run(self) -> Built {
        let ann = Ann::new(self.upto);
        for (slot, v) in &self.points {
            ann.insert(v, *slot);
        }
        Built { bucket: self.bucket, epoch: self.epoch, upto: self.upto, ann }
    }
}

impl Bucket {
    /// Adds `e`; its slot.
    fn push(&mut self, e: Entry) -> usize {
        let slot = self.slots.len();
        if let Some(ann) = &self.ann {
            ann.insert(&e.probe.vector, slot);
        }
        self.slots.push(Some(e));
        self.live += 1;
        slot
    }

    /// A graph to build, when the bucket needs one and none is under way.
    fn build(&mut self, bucket: u128) -> Option<Build> {
        if self.ann.is_some() || self.building || self.live < ANN_FROM {
            return None;
        }
        self.building = true;
        let points = self.slots.iter().enumerate().filter_map(|(i, e)| Some((i, e.as_ref()?.probe.vector.clone())));
        Some(Build { bucket, epoch: self.epoch, upto: self.slots.len(), points: points.collect() })
    }

    fn remove(&mut self, slot: usize) {
        if self.slots.get_mut(slot).and_then(Option::take).is_some() {
            self.live -= 1;
        }
    }

    /// When half the slots are empty: the live entries packed, the graph
    /// rebuilt (or dropped below [`ANN_FROM`]); the keys that moved, with their new slots.
    fn compact(&mut self) -> Vec<(Key, usize)> {
        if self.slots.len() < 2 * self.live + 64 {
            return Vec::new();
        }
        self.slots.retain(Option::is_some);
        // the graph names old slots: scan until a new one is built
        self.ann = None;
        self.epoch += 1;
        self.slots.iter().enumerate().filter_map(|(i, e)| e.as_ref().map(|e| (e.key, i))).collect()
    }

    fn get_mut(&mut self, slot: usize) -> Option<&mut Entry> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// The closest usable prompt at least `least` similar to `probe` and above its entry's veto.
    fn nearest(&self, probe: &Probe, least: f64, now_ms: u64) -> Option<(Key, f64)> {
        let usable = |e: &Entry| e.expires_ms > now_ms && e.probe.negations == probe.negations;
        let scored = |e: &Entry| (e.key, similarity(&probe.vector, &e.probe.vector), e.veto);
        let near: Vec<(Key, f64, f64)> = match &self.ann {
            Some(ann) => {
                let keep = |slot: usize| self.slots[slot].as_ref().is_some_and(usable);
                let found = ann.search(&probe.vector, ANN_CANDIDATES, &keep);
                found.into_iter().filter_map(|slot| self.slots[slot].as_ref()).map(scored).collect()
            }
            None => self.slots.iter().flatten().filter(|e| usable(e)).map(scored).collect(),
        };
        near.into_iter()
            .filter(|(_, s, veto)| *s >= least && *s > *veto)
            .map(|(k, s, _)| (k, s))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

/// Buckets of embedded prompts, bounded in total entries (oldest go first).
#[derive(Default)]
pub struct Index {
    buckets: HashMap<u128, Bucket>,
    order: VecDeque<(u128, Key)>,
    /// The bucket and slot of each entry.
    homes: HashMap<Key, (u128, usize)>,
    max_entries: usize,
}

impl Index {
    /// An index holding at most `max_entries` prompts.
    pub fn new(max_entries: usize) -> Index {
        Index { max_entries, ..Default::default() }
    }

    fn entry_mut(&mut self, key: Key) -> Option<&mut Entry> {
        let (bucket, slot) = *self.homes.get(&key)?;
        self.buckets.get_mut(&bucket)?.get_mut(slot)
    }

    /// Remembers that the answer to the prompt `probe` in `bucket` is stored under `key`.
    pub fn insert(&mut self, bucket: u128, probe: Probe, key: Key, expires_ms: u64) {
        if self.max_entries == 0 {
            return;
        }
        if let Some(e) = self.entry_mut(key) {
            // a new answer under the same key: the old one's verdicts are not its own
            e.expires_ms = expires_ms;
            e.veto = f64::NEG_INFINITY;
            return;
        }
        let slot =
            self.buckets.entry(bucket).or_default().push(Entry { probe, key, expires_ms, veto: f64::NEG_INFINITY });
        self.homes.insert(key, (bucket, slot));
        self.order.push_back((bucket, key));
        while self.order.len() > self.max_entries {
            let Some((b, k)) = self.order.pop_front() else { break };
            self.remove(b, k);
        }
    }

    fn remove(&mut self, bucket: u128, key: Key) {
        let Some((_, slot)) = self.homes.remove(&key) else { return };
        let Some(b) = self.buckets.get_mut(&bucket) else { return };
        b.remove(slot);
        if b.live == 0 {
            self.buckets.remove(&bucket);
            return;
        }
        for (k, slot) in b.compact() {
            self.homes.insert(k, (bucket, slot));
        }
    }

    /// The closest unexpired prompt in `bucket` with similarity at least
    /// `least`, as many negations as `probe`, and above its entry's veto
    /// (from [`ANN_FROM`] prompts in the bucket, the closest a graph search finds).
    pub fn nearest(&self, bucket: u128, probe: &Probe, least: f64, now_ms: u64) -> Option<(Key, f64)> {
        self.buckets.get(&bucket)?.nearest(probe, least, now_ms)
    }

    /// The entry stored under `key` answered a prompt `similarity` similar
    /// wrongly: from now on it answers only prompts more similar than that.
    /// False when the index does not hold it.
    pub fn veto(&mut self, key: Key, similarity: f64) -> bool {
        let Some(e) = self.entry_mut(key) else { return false };
        e.veto = e.veto.max(similarity);
        true
    }

    /// Whether the index holds the entry stored under `key`.
    pub fn holds(&self, key: Key) -> bool {
        self.homes.contains_key(&key)
    }

    /// Graphs to build: buckets that reached [`ANN_FROM`] prompts, or were
    /// compacted, without one. Build each off the lock ([`Build::run`]) and
    /// [`Index::install`] it.
    pub fn builds(&mut self) -> Vec<Build> {
        self.buckets.iter_mut().filter_map(|(b, bucket)| bucket.build(*b)).collect()
    }

    /// Installs a graph built from a snapshot, adding the prompts that came
    /// since; dropped when the bucket was compacted (or emptied) meanwhile.
    pub fn install(&mut self, built: Built) {
        let Some(b) = self.buckets.get_mut(&built.bucket) else { return };
        b.building = false;
        if b.epoch != built.epoch {
            return;
        }
        for (slot, e) in b.slots.iter().enumerate().skip(built.upto) {
            if let Some(e) = e {
                built.ann.insert(&e.probe.vector, slot);
            }
        }
        b.ann = Some(built.ann);
    }

    /// Builds every graph due, here and now (tests, tools).
    pub fn build_now(&mut self) {
        for b in self.builds() {
            self.install(b.run());
        }
    }

    /// Every entry as saved across a restart, oldest first.
    pub fn saved(&self) -> Vec<Saved> {
        let entry = |b: &u128, k: &Key| {
            let (_, slot) = self.homes.get(k)?;
            self.buckets.get(b)?.slots.get(*slot)?.as_ref().map(|e| Saved {
                bucket: *b,
                key: k.0,
                vector: e.probe.vector.clone(),
                negations: e.probe.negations,
                expires_ms: e.expires_ms,
                veto: e.veto,
            })
        };
        self.order.iter().filter_map(|(b, k)| entry(b, k)).collect()
    }

    /// Takes back an entry [`Index::saved`] gave.
    pub fn restore(&mut self, s: Saved) {
        let key = Key(s.key);
        self.insert(s.bucket, Probe { vector: s.vector, negations: s.negations }, key, s.expires_ms);
        if let Some(e) = self.entry_mut(key) {
            e.veto = s.veto;
        }
    }

    /// Prompts held.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::lexical::embed;

    fn probe(text: &str) -> Probe {
        Probe::new(text, embed(text))
    }

    #[test]
    fn nearest_respects_threshold_bucket_and_expiry() {
        let mut idx = Index::new(10);
        idx.insert(1, probe("What is the capital of France?"), Key(7), 1_000);
        assert_eq!(idx.nearest(1, &probe("what is the capital of france"), 0.9, 0).map(|h| h.0), Some(Key(7)));
        assert!(idx.nearest(1, &probe("what is the capital of spain"), 0.95, 0).is_none(), "below threshold");
        assert!(idx.nearest(2, &probe("What is the capital of France?"), 0.5, 0).is_none(), "other bucket");
        assert!(idx.nearest(1, &probe("What is the capital of France?"), 0.5, 1_000).is_none(), "expired");
    }

    #[test]
    fn a_negated_question_never_answers_the_plain_one() {
        let mut idx = Index::new(10);
        idx.insert(1, probe("Is NATS fast?"), Key(1), u64::MAX);
        assert!(idx.nearest(1, &probe("Is NATS not fast?"), 0.5, 0).is_none());
        idx.insert(1, probe("Is NATS not fast?"), Key(2), u64::MAX);
        assert_eq!(idx.nearest(1, &probe("Isn't NATS fast?"), 0.5, 0).map(|h| h.0), Some(Key(2)));
    }

    #[test]
    fn negations_are_counted() {
        assert_eq!(negations("Is NATS fast?"), 0);
        assert_eq!(negations("Is NATS not fast?"), 1);
        assert_eq!(negations("Why doesn\u{2019}t it start, and why can't I see nothing?"), 3);
        assert_eq!(negations("Is the notion of nothing known?"), 1, "words that merely start like one do not count");
    }

    #[test]
    fn oldest_entries_leave_first() {
        let mut idx = Index::new(2);
        idx.insert(1, probe("one"), Key(1), u64::MAX);
        idx.insert(1, probe("two"), Key(2), u64::MAX);
        idx.insert(2, probe("three"), Key(3), u64::MAX);
        assert_eq!(idx.len(), 2);
        assert!(idx.nearest(1, &probe("one"), 0.99, 0).is_none());
        assert_eq!(idx.nearest(2, &probe("three"), 0.99, 0).map(|h| h.0), Some(Key(3)));
        assert!(!idx.holds(Key(1)) && idx.holds(Key(3)));
    }

    #[test]
    fn a_vetoed_entry_answers_only_closer_prompts() {
        let mut idx = Index::new(10);
        idx.insert(1, probe("What is the capital of France?"), Key(1), u64::MAX);
        let near = probe("what is the capital city of france");
        let (_, s) = idx.nearest(1, &near, 0.5, 0).expect("a neighbour");
        assert!(idx.veto(Key(1), s));
        assert!(idx.nearest(1, &near, 0.5, 0).is_none(), "the vetoed neighbour misses");
        assert!(idx.nearest(1, &probe("What is the capital of France?"), 0.5, 0).is_some(), "a closer one hits");
        assert!(!idx.veto(Key(9), 0.5), "an entry not held");
    }

    fn unit(v: Vec<f32>) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    fn random(rng: &mut fastrand::Rng) -> Vec<f32> {
        unit((0..64).map(|_| rng.f32() - 0.5).collect())
    }

    fn near(rng: &mut fastrand::Rng, v: &[f32]) -> Probe {
        Probe { vector: unit(v.iter().map(|x| x + 0.05 * (rng.f32() - 0.5)).collect()), negations: 0 }
    }

    #[test]
    fn a_large_bucket_is_searched_through_its_graph_with_the_same_rules() {
        let mut rng = fastrand::Rng::with_seed(1);
        let n = 2 * ANN_FROM;
        let mut idx = Index::new(n);
        let vs: Vec<Vec<f32>> = (0..n).map(|_| random(&mut rng)).collect();
        for (i, v) in vs.iter().enumerate() {
            idx.insert(1, Probe { vector: v.clone(), negations: 0 }, Key(i as u128), u64::MAX);
        }
        assert!(idx.buckets[&1].ann.is_none(), "graphs are built off the lock");
        idx.build_now();
        assert!(idx.buckets[&1].ann.is_some(), "a graph from ANN_FROM prompts");
        let mut found = 0;
        for i in (0..n).step_by(n / 100) {
            if idx.nearest(1, &near(&mut rng, &vs[i]), 0.9, 0).map(|h| h.0) == Some(Key(i as u128)) {
                found += 1;
            }
        }
        assert!(found >= 98, "the graph found {found} of 100 planted neighbours");
        let q = near(&mut rng, &vs[7]);
        let (_, s) = idx.nearest(1, &q, 0.9, 0).unwrap();
        assert!(idx.veto(Key(7), s));
        assert_ne!(idx.nearest(1, &q, 0.9, 0).map(|h| h.0), Some(Key(7)), "vetoed through the graph too");
        let negated = Probe { negations: 1, ..near(&mut rng, &vs[9]) };
        assert!(idx.nearest(1, &negated, 0.9, 0).is_none(), "negations through the graph too");
    }

    #[test]
    fn leaving_prompts_compact_a_large_bucket_and_keep_every_entry_reachable() {
        let mut rng = fastrand::Rng::with_seed(2);
        let max = ANN_FROM + 10;
        let mut idx = Index::new(max);
        let vs: Vec<Vec<f32>> = (0..3 * ANN_FROM).map(|_| random(&mut rng)).collect();
        for (i, v) in vs.iter().enumerate() {
            idx.insert(1, Probe { vector: v.clone(), negations: 0 }, Key(i as u128), u64::MAX);
        }
        assert_eq!(idx.len(), max);
        idx.build_now();
        let b = &idx.buckets[&1];
        assert!(b.ann.is_some());
        assert!(b.slots.len() < 2 * b.live + 64, "compacted: {} slots for {} prompts", b.slots.len(), b.live);
        assert!(!idx.holds(Key(0)));
        for i in [vs.len() - max, vs.len() - 1] {
            let k = Key(i as u128);
            assert_eq!(idx.nearest(1, &near(&mut rng, &vs[i]), 0.9, 0).map(|h| h.0), Some(k), "entry {i}");
            assert!(idx.veto(k, 0.5));
        }
    }
}
