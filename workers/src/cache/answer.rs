//! What the cache holds: an [`Answer`] (stored as MessagePack in memory, on
//! disk and in cross-worker claims) and the [`Hit`] a lookup returns.

use bytes::Bytes;
use retro_fleet_schemas::cache_key::Key;
use retro_fleet_schemas::{CacheTier, Output, Usage};
use serde::{Deserialize, Serialize};

/// A cached answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The output.
    pub output: Output,
    /// Token counts of the computation that produced it.
    pub usage: Usage,
    /// Unix ms after which it must not be served.
    pub expires_ms: u64,
}

impl Answer {
    pub(super) fn encode(&self) -> Bytes {
        Bytes::from(rmp_serde::to_vec_named(self).expect("an answer always encodes"))
    }

    pub(super) fn decode(b: &[u8]) -> Option<Answer> {
        rmp_serde::from_slice(b).ok()
    }
}

/// A hit: the answer, which tier had it, and the similarity for semantic hits.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The answer.
    pub answer: Answer,
    /// Tier that answered.
    pub tier: CacheTier,
    /// Similarity of the cached prompt (semantic hits).
    pub similarity: Option<f64>,
    /// Where the answer of a semantic hit is stored (the entry feedback is about).
    pub entry: Option<Key>,
}
