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
//! index only ever compares prompts inside one bucket.

use std::collections::{HashMap, VecDeque};

use retro_fleet_schemas::cache_key::Key;

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

/// Buckets of embedded prompts, bounded in total entries (oldest go first).
#[derive(Default)]
pub struct Index {
    buckets: HashMap<u128, Vec<Entry>>,
    order: VecDeque<(u128, Key)>,
    /// The bucket of each entry.
    homes: HashMap<Key, u128>,
    max_entries: usize,
}

impl Index {
    /// An index holding at most `max_entries` prompts.
    pub fn new(max_entries: usize) -> Index {
        Index { max_entries, ..Default::default() }
    }

    /// Remembers that the answer to the prompt `probe` in `bucket` is stored under `key`.
    pub fn insert(&mut self, bucket: u128, probe: Probe, key: Key, expires_ms: u64) {
        if self.max_entries == 0 {
            return;
        }
        let entries = self.buckets.entry(bucket).or_default();
        if let Some(e) = entries.iter_mut().find(|e| e.key == key) {
            e.expires_ms = expires_ms;
            return;
        }
        entries.push(Entry { probe, key, expires_ms, veto: f64::NEG_INFINITY });
        self.order.push_back((bucket, key));
        self.homes.insert(key, bucket);
        while self.order.len() > self.max_entries {
            let Some((b, k)) = self.order.pop_front() else { break };
            self.homes.remove(&k);
            if let Some(v) = self.buckets.get_mut(&b) {
                v.retain(|e| e.key != k);
                if v.is_empty() {
                    self.buckets.remove(&b);
                }
            }
        }
    }

    /// The closest unexpired prompt in `bucket` with similarity at least
    /// `least`, as many negations as `probe`, and above its entry's veto.
    pub fn nearest(&self, bucket: u128, probe: &Probe, least: f64, now_ms: u64) -> Option<(Key, f64)> {
        self.buckets
            .get(&bucket)?
            .iter()
            .filter(|e| e.expires_ms > now_ms && e.probe.negations == probe.negations)
            .map(|e| (e.key, similarity(&probe.vector, &e.probe.vector), e.veto))
            .filter(|(_, s, veto)| *s >= least && *s > *veto)
            .map(|(k, s, _)| (k, s))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// The entry stored under `key` answered a prompt `similarity` similar
    /// wrongly: from now on it answers only prompts more similar than that.
    /// False when the index does not hold it.
    pub fn veto(&mut self, key: Key, similarity: f64) -> bool {
        let Some(bucket) = self.homes.get(&key) else { return false };
        let Some(e) = self.buckets.get_mut(bucket).and_then(|v| v.iter_mut().find(|e| e.key == key)) else {
            return false;
        };
        e.veto = e.veto.max(similarity);
        true
    }

    /// Whether the index holds the entry stored under `key`.
    pub fn holds(&self, key: Key) -> bool {
        self.homes.contains_key(&key)
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
}
