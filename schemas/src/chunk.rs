//! Streamed token deltas.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A piece of streamed output, published to the request's `Fleet-Reply`
/// subject with header `Fleet-Kind: chunk`. `seq` starts at 0 and has no
/// gaps; the chunk with `done: true` is the last one, and the final
/// [`crate::InferResult`] follows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StreamChunk {
    /// Schema version of this message.
    #[serde(default = "crate::version::default_version")]
    pub v: u32,
    /// Request id.
    pub id: String,
    /// Position of this chunk, from 0.
    pub seq: u64,
    /// New text.
    pub delta: String,
    /// Last chunk of the stream.
    pub done: bool,
}
