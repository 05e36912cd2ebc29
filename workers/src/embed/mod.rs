//! Sentence embedders: text to unit vectors whose dot product says how
//! alike two texts are in meaning. The semantic cache compares prompts
//! with one.
//!
//! Two kinds sit behind one trait, [`Embedder`]:
//! - [`lexical`]: words and character trigrams hashed into 512 signed
//!   buckets. No model, no setup, microseconds per prompt; it finds only
//!   rephrasings that share words. The default.
//! - `bert`: a sentence-transformers BERT (all-MiniLM-L6-v2 and its kin)
//!   loaded from a local directory and run in process with candle, mean
//!   pooled and L2 normalised as sentence-transformers does. It finds
//!   rephrasings that share no word, at milliseconds per prompt on a CPU.
//!
//! Which one a worker runs is [`EmbedderConfig`] (`worker.cache.semantic_embedder`).
//!
//! # Layout
//! - [`embedder`]: the [`Embedder`] trait, [`EmbedError`] and [`similarity`].
//! - [`config`]: [`EmbedderConfig`] and [`load`].
//! - [`lexical`]: the hashed lexical embedder.
//! - `bert`: the BERT embedder (with the `mistralrs` feature, which brings candle).

#[cfg(feature = "mistralrs")]
mod bert;
pub mod config;
pub mod embedder;
pub mod lexical;

pub use config::{load, BertConfig, Builtin, EmbedderConfig};
pub use embedder::{similarity, EmbedError, Embedded, Embedder};
