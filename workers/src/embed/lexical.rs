//! The lexical embedder: deliberately simple and documented, so its
//! behaviour is predictable. Text is lowercased and split into alphanumeric
//! words; every word and every character trigram of ` word ` is hashed
//! (FNV-1a) into one of [`DIM`] signed buckets (words weigh 1, trigrams 0.5),
//! and the vector is L2-normalised. Rephrasings that share most words and
//! word stems score high; different questions low; a rephrasing in other
//! words is never found.

use super::embedder::{EmbedError, Embedded, Embedder};

/// Embedding dimensions.
pub const DIM: usize = 512;

/// The lexical embedder.
pub struct Lexical;

impl Embedder for Lexical {
    fn name(&self) -> &str {
        "lexical"
    }

    fn dim(&self) -> usize {
        DIM
    }

    fn embed(&self, texts: &[&str]) -> Result<Embedded, EmbedError> {
        let tokens = texts.iter().map(|t| words(t).count()).sum();
        Ok(Embedded { vectors: texts.iter().map(|t| embed(t)).collect(), tokens })
    }

    fn default_threshold(&self) -> f64 {
        0.95
    }
}

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

/// The alphanumeric words of `text`.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty())
}

/// The lexical embedding of `text` (unit length, or all zeros for text without words).
pub fn embed(text: &str) -> Vec<f32> {
    let mut v = vec![0.0f32; DIM];
    for word in words(&text.to_lowercase()) {
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

#[cfg(test)]
mod tests {
    use super::super::similarity;
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
}
