//! Semantic cache index: nearest neighbour over a lexical embedding.
//!
//! The embedding is deliberately simple and documented, so its behaviour is
//! predictable: text is lowercased and split into alphanumeric words; every
//! word and every character trigram of ` word ` is hashed (FNV-1a) into one
//! of [`DIM`] signed buckets (words weigh 1, trigrams 0.5), and the vector is
//! L2-normalized. Cosine similarity is then a dot product. Rephrasings that
//! share most words and word stems score high; different questions low.
//!
//! Entries live in buckets whose key already fixes tenant, model, revision,
//! adapter, parameters and earlier turns (see [`retro_fleet_schemas::cache_key::semantic`]); the
//! index only ever compares prompts inside one bucket.

use std::collections::{HashMap, VecDeque};

use retro_fleet_schemas::cache_key::Key;

/// Embedding dimensions.
pub const DIM: usize = 512;

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn add(v: &mut [f32], feature: &[u8], weight: f32) {
    let h = fnv1a(feature);
    let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
    v[(h % DIM as u64) as usize] += sign * weight;
}

/// The lexical embedding of `text` (unit length, or all zeros for text without words).
pub fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0.0f32; DIM];
    let lower = text.to_lowercase();
    for word in lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        add(&mut v, word.as_bytes(), 1.0);
        let padded: Vec<char> = format!(" {word} ").chars().collect();
        for tri in padded.windows(3) {
            let s: String = tri.iter().collect();
            add(&mut v, s.as_bytes(), 0.5);
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Cosine similarity of two unit vectors.
pub fn similarity(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x * y) as f64).sum()
}

struct Entry {
    embedding: Vec<f32>,
    key: Key,
    expires_ms: u64,
}

/// Buckets of embedded prompts, bounded in total entries (oldest go first).
#[derive(Default)]
pub struct Index {
    buckets: HashMap<u128, Vec<Entry>>,
    order: VecDeque<(u128, Key)>,
    max_entries: usize,
}

impl Index {
    /// An index holding at most `max_entries` prompts.
    pub fn new(max_entries: usize) -> Index {
        Index { max_entries, ..Default::default() }
    }

    /// Remembers that the answer to `text` in `bucket` is stored under `key`.
    pub fn insert(&mut self, bucket: u128, text: &str, key: Key, expires_ms: u64) {
        if self.max_entries == 0 {
            return;
        }
        let entries = self.buckets.entry(bucket).or_default();
        if let Some(e) = entries.iter_mut().find(|e| e.key == key) {
            e.expires_ms = expires_ms;
            return;
        }
        entries.push(Entry { embedding: embed(text), key, expires_ms });
        self.order.push_back((bucket, key));
        while self.order.len() > self.max_entries {
            let Some((b, k)) = self.order.pop_front() else { break };
            if let Some(v) = self.buckets.get_mut(&b) {
                v.retain(|e| e.key != k);
                if v.is_empty() {
                    self.buckets.remove(&b);
                }
            }
        }
    }

    /// The closest unexpired prompt in `bucket` with similarity at least `threshold`.
    pub fn nearest(&self, bucket: u128, text: &str, threshold: f64, now_ms: u64) -> Option<(Key, f64)> {
        let entries = self.buckets.get(&bucket)?;
        let q = embed(text);
        entries
            .iter()
            .filter(|e| e.expires_ms > now_ms)
            .map(|e| (e.key, similarity(&q, &e.embedding)))
            .filter(|(_, s)| *s >= threshold)
            .max_by(|a, b| a.1.total_cmp(&b.1))
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

    #[test]
    fn paraphrases_score_above_unrelated_questions() {
        let q = embed("What is the capital of France?");
        let para = similarity(&q, &embed("what's the capital of france"));
        let other = similarity(&q, &embed("How do I bake sourdough bread at home?"));
        assert!(para > 0.8, "paraphrase similarity {para}");
        assert!(other < 0.3, "unrelated similarity {other}");
        assert!((similarity(&q, &q) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn nearest_respects_threshold_bucket_and_expiry() {
        let mut idx = Index::new(10);
        idx.insert(1, "What is the capital of France?", Key(7), 1_000);
        assert_eq!(idx.nearest(1, "what is the capital of france", 0.9, 0).map(|h| h.0), Some(Key(7)));
        assert!(idx.nearest(1, "what is the capital of spain", 0.95, 0).is_none(), "below threshold");
        assert!(idx.nearest(2, "What is the capital of France?", 0.5, 0).is_none(), "other bucket");
        assert!(idx.nearest(1, "What is the capital of France?", 0.5, 1_000).is_none(), "expired");
    }

    #[test]
    fn oldest_entries_leave_first() {
        let mut idx = Index::new(2);
        idx.insert(1, "one", Key(1), u64::MAX);
        idx.insert(1, "two", Key(2), u64::MAX);
        idx.insert(2, "three", Key(3), u64::MAX);
        assert_eq!(idx.len(), 2);
        assert!(idx.nearest(1, "one", 0.99, 0).is_none());
        assert_eq!(idx.nearest(2, "three", 0.99, 0).map(|h| h.0), Some(Key(3)));
    }
}
