//! Problems opening the cache.

use crate::embed::EmbedError;

/// Problems opening the cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Metrics could not be registered.
    #[error("cache metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The memory tier could not be built.
    #[error("cache: {0}")]
    Build(String),
    /// The semantic cache's embedder could not be loaded.
    #[error(transparent)]
    Embedder(#[from] EmbedError),
    /// A setting is out of range.
    #[error("worker.cache: {0}")]
    Config(String),
}
