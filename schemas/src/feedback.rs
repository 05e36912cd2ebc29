//! A verdict on an answer the semantic cache gave: sent by the ingress
//! (`POST /v1/cache/feedback`) to every worker on
//! [`crate::subjects::CACHE_FEEDBACK`]; the workers holding the entry
//! reply [`FeedbackAck`].

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Whether a semantic answer was right for the prompt it answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The cached answer was right for the new prompt.
    Correct,
    /// It was not: the entry must not answer that prompt again.
    Wrong,
}

impl Verdict {
    /// `correct` or `wrong`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Correct => "correct",
            Verdict::Wrong => "wrong",
        }
    }
}

/// A verdict on the semantic answer of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheFeedback {
    /// Schema version of this message.
    #[serde(default = "crate::version::default_version")]
    pub v: u32,
    /// Model of the request.
    pub model: String,
    /// The entry that answered (the result's `cache_entry`).
    pub entry: String,
    /// How similar the request's prompt was to the entry's (the result's `cache_similarity`).
    pub similarity: f64,
    /// The verdict.
    pub verdict: Verdict,
}

/// A worker's reply: it holds the entry, and applied the verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FeedbackAck {
    /// The worker.
    pub worker: String,
}
