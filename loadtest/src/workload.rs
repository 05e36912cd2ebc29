//! What each request asks: a prompt of a given size, and optionally greedy
//! sampling (so the fleet may cache it) and a share of repeated prompts.
//!
//! With `repeat` r and `distinct` k, request i asks one of k popular prompts
//! with probability r (chosen by a hash of i, so every round and every target
//! gets the same sequence), and a prompt never asked before otherwise.

use retro_fleet_schemas::{CacheMode, Constraint, SamplingParams};

/// The request mix.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Bytes of prompt text.
    pub prompt_bytes: usize,
    /// Temperature 0 (reproducible, cacheable).
    pub greedy: bool,
    /// Share of requests that repeat a popular prompt (0..1).
    pub repeat: f64,
    /// Number of popular prompts.
    pub distinct: usize,
    /// `max_tokens` of every request (None: the model's default).
    pub max_tokens: Option<u32>,
    /// Ask for streamed tokens (time to first token is measured).
    pub stream: bool,
    /// A JSON Schema every answer must fit (constrained decoding).
    pub json_schema: Option<serde_json::Value>,
    /// Texts per request to an embeddings API (`--api embeddings`).
    pub embed_batch: usize,
    /// Cache mode of every request. With `semantic`, a fresh prompt is
    /// made-up words drawn by its number rather than a shared filler, so
    /// fresh prompts are unlike each other and miss the semantic cache too.
    pub cache: CacheMode,
}

/// Syllables the words of fresh semantic-mode prompts are made of.
const SYLLABLES: &[&str] = &[
    "ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "ve", "da", "gu", "fi", "ho", "ja", "ze", "wu", "bo", "ce", "xi",
    "qua", "pre", "stro", "lin", "dor", "mek", "vas", "tul", "ber", "nox", "gar", "fen", "sil",
];

/// A prompt of made-up words drawn by `h`, about `bytes` long: two such
/// prompts share almost no word or trigram, so no embedder finds them alike.
fn made_up(mut h: u64, bytes: usize) -> String {
    let mut p = String::new();
    while p.len() < bytes {
        for _ in 0..2 + h % 2 {
            h = mix(h);
            p.push_str(SYLLABLES[(h % SYLLABLES.len() as u64) as usize]);
        }
        p.push(' ');
    }
    p.truncate(bytes.max(1));
    p
}

fn mix(mut x: u64) -> u64 {
    // splitmix64
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Workload {
    /// The texts to embed of request `i`: its prompt, each marked with the
    /// request and its place, so no text repeats (nothing is cached).
    pub fn texts(&self, run: &str, i: usize) -> Vec<String> {
        let p = self.prompt(run, i);
        (0..self.embed_batch.max(1)).map(|k| format!("{run}-{i}-{k} {p}")).collect()
    }

    /// The prompt of request `i` of a run tagged `run`.
    pub fn prompt(&self, run: &str, i: usize) -> String {
        let h = mix(i as u64);
        let head = if self.repeat > 0.0 && (h >> 11) as f64 / (1u64 << 53) as f64 <= self.repeat {
            format!("popular question {} ", (h % self.distinct.max(1) as u64))
        } else if self.cache == CacheMode::Semantic {
            return format!("{run}-{i} {}", made_up(h ^ 0x5EED, self.prompt_bytes));
        } else if self.repeat > 0.0 || self.greedy {
            format!("fresh question {run}-{i} ")
        } else {
            String::new()
        };
        let filler = "lorem ipsum dolor sit amet ";
        let mut p = head;
        p.extend(filler.chars().cycle().take(self.prompt_bytes.saturating_sub(p.len())));
        p
    }

    /// Sampling parameters of every request.
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.greedy.then_some(0.0),
            max_tokens: self.max_tokens,
            constraint: self.json_schema.clone().map(|schema| Constraint::JsonSchema { schema }),
            ..Default::default()
        }
    }

    /// Whether request `i` asks a popular (repeated) prompt.
    #[cfg(test)]
    pub fn repeats(&self, i: usize) -> bool {
        self.prompt("", i).starts_with("popular")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Workload {
        fn for_tests() -> Workload {
            Workload {
                prompt_bytes: 64,
                greedy: true,
                repeat: 0.7,
                distinct: 50,
                max_tokens: None,
                stream: false,
                json_schema: None,
                embed_batch: 1,
                cache: CacheMode::Use,
            }
        }
    }

    #[test]
    fn the_mix_has_the_asked_share_of_repeats() {
        let w = Workload::for_tests();
        let n = 20_000;
        let repeats = (0..n).filter(|i| w.repeats(*i)).count() as f64 / n as f64;
        assert!((repeats - 0.7).abs() < 0.02, "{repeats}");
        assert_eq!(w.prompt("a", 5).len(), 64);
        assert_eq!(w.prompt("a", 5), w.prompt("a", 5));
        let fresh: Vec<usize> = (0..n).filter(|i| !w.repeats(*i)).take(2).collect();
        assert_ne!(w.prompt("a", fresh[0]), w.prompt("a", fresh[1]));
    }

    #[test]
    fn fresh_semantic_prompts_are_unlike_each_other() {
        use retro_fleet_worker::embed::{lexical, similarity};
        let w = Workload { cache: CacheMode::Semantic, repeat: 0.0, ..Workload::for_tests() };
        let (a, b) = (w.prompt("r", 1), w.prompt("r", 2));
        assert_ne!(a, b);
        let s = similarity(&lexical::embed(&a), &lexical::embed(&b));
        assert!(s < 0.5, "{a:?} and {b:?} are {s} alike");
    }
}
