//! Streamed token deltas.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A piece of streamed output, published to the request's `Fleet-Reply`
/// subject with header `Fleet-Kind: chunk`. The chunk with `done: true` is
/// the last one, and the final [`crate::InferResult`] follows it.
///
/// `offset` is where `delta` starts in the answer's text (in bytes). When a
/// worker dies mid-generation, the attempt that takes over starts again
/// with a chunk at offset 0 that repeats what was streamed, then goes on:
/// a reader keeps the text it has and appends only `delta`'s bytes past
/// its own length (see [`StreamChunk::extend`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StreamChunk {
    /// Schema version of this message.
    #[serde(default = "crate::version::default_version")]
    pub v: u32,
    /// Request id.
    pub id: String,
    /// Position of this chunk among its attempt's chunks, from 0.
    pub seq: u64,
    /// Byte offset of `delta` in the answer's text.
    #[serde(default)]
    pub offset: u64,
    /// New text.
    pub delta: String,
    /// Last chunk of the stream.
    pub done: bool,
}

/// Why a chunk cannot extend the text read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Splice {
    /// The chunk starts past the end of the text read: a chunk was missed.
    Gap,
    /// The chunk repeats the text read with different bytes: another
    /// generation than the one streamed so far.
    Diverged,
}

impl StreamChunk {
    /// What this chunk adds to `text`, the answer read so far: the bytes of
    /// `delta` past `text`'s end (empty when it only repeats `text`).
    pub fn extend<'a>(&'a self, text: &str) -> Result<&'a str, Splice> {
        let (have, at) = (text.len(), self.offset as usize);
        if at > have {
            return Err(Splice::Gap);
        }
        let overlap = (have - at).min(self.delta.len());
        match (self.delta.get(..overlap), self.delta.get(overlap..), text.get(at..at + overlap)) {
            (Some(repeat), Some(new), Some(read)) if read == repeat => Ok(new),
            _ => Err(Splice::Diverged),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(offset: u64, delta: &str) -> StreamChunk {
        StreamChunk { v: 1, id: "r".into(), seq: 0, offset, delta: delta.into(), done: false }
    }

    #[test]
    fn a_chunk_adds_only_what_extends_the_text() {
        assert_eq!(chunk(0, "Hello").extend(""), Ok("Hello"));
        assert_eq!(chunk(5, " world").extend("Hello"), Ok(" world"));
        // a takeover repeats the start, then goes on
        assert_eq!(chunk(0, "Hello wor").extend("Hello"), Ok(" wor"));
        assert_eq!(chunk(0, "Hel").extend("Hello"), Ok(""));
        assert_eq!(chunk(7, "x").extend("Hello"), Err(Splice::Gap));
        assert_eq!(chunk(0, "Help me").extend("Hello"), Err(Splice::Diverged));
        // never splits a character
        assert_eq!(chunk(0, "é!").extend("\u{e9}"), Ok("!"));
        assert_eq!(chunk(1, "x").extend("\u{e9}"), Err(Splice::Diverged));
    }
}
