//! What every embedder offers.

use std::path::PathBuf;

/// Turns texts into unit vectors of [`Embedder::dim`] numbers.
pub trait Embedder: Send + Sync {
    /// A short name, for logs and the `embedder` metric label.
    fn name(&self) -> &str;
    /// Numbers per vector.
    fn dim(&self) -> usize;
    /// One unit vector per text, in order (all zeros for a text with
    /// nothing to embed), all texts in one batch.
    fn embed(&self, texts: &[&str]) -> Result<Embedded, EmbedError>;
    /// The least similarity at which two prompts count as the same
    /// question, measured on the labelled set in `loadtest/fixtures`
    /// (docs/CACHE.md): a config's `semantic_threshold` overrides it.
    fn default_threshold(&self) -> f64;
}

/// Texts embedded.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// One vector per text, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the texts held, as the embedder counts them (what a caller is billed).
    pub tokens: usize,
}

/// Problems loading or running an embedder.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model directory could not be read.
    #[error(
        "sentence embedder at {}: {message} (point `semantic_embedder.path` at a sentence-transformers \
         directory with config.json, model.safetensors and tokenizer.json, or use `semantic_embedder = \"lexical\"`)",
        path.display()
    )]
    Load {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Embedding failed.
    #[error("embedding failed: {0}")]
    Run(String),
}

/// Cosine similarity of two unit vectors. Summed in eight lanes, so the
/// compiler turns it into vector instructions (a bucket scan and the HNSW
/// graph both spend their time here).
pub fn similarity(a: &[f32], b: &[f32]) -> f64 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut lanes = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    (lanes.iter().sum::<f32>() + tail) as f64
}
