//! The result of a request, and errors with stable codes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The one visible result of a request: published to `FLEET_RESULTS` under
/// `fleet.res.<tenant>.<id>` and, when the request had a `Fleet-Reply`, there too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InferResult {
    /// Schema version of this message.
    #[serde(default = "crate::version::default_version")]
    pub v: u32,
    /// Request id.
    pub id: String,
    /// Model asked for.
    pub model: String,
    /// Revision of the model that answered (hash of its files, or configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_revision: Option<String>,
    /// Adapter that ran, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// `ok` or `error`.
    pub status: Status,
    /// Generated output when `status` is `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Output>,
    /// Token counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Which cache tier answered; `none` when the model computed it.
    #[serde(default)]
    pub cache: CacheTier,
    /// Cosine similarity of the cached prompt when `cache` is `semantic`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_similarity: Option<f64>,
    /// The cache entry whose answer a `semantic` result is: name it (with
    /// the request id) in `POST /v1/cache/feedback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_entry: Option<String>,
    /// Where the time went.
    #[serde(default)]
    pub timings: Timings,
    /// Worker that produced the result.
    #[serde(default)]
    pub worker: String,
    /// Error details when `status` is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl InferResult {
    /// An error result for request `id`.
    pub fn error(id: impl Into<String>, model: impl Into<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        InferResult {
            v: crate::version::SCHEMA_VERSION,
            id: id.into(),
            model: model.into(),
            model_revision: None,
            adapter: None,
            status: Status::Error,
            output: None,
            usage: None,
            cache: CacheTier::None,
            cache_similarity: None,
            cache_entry: None,
            timings: Timings::default(),
            worker: String::new(),
            error: Some(ErrorBody { code, message: message.into(), retryable: code.retryable() }),
        }
    }
}

/// Outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Output is present.
    Ok,
    /// `error` is present.
    Error,
}

/// Generated text, and the tool calls the model made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Output {
    /// The text: empty when the whole answer is tool calls.
    pub text: String,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: String,
    /// The calls the model made (see `params.tools`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<crate::tools::ToolCall>,
    /// Each generated token with its log probability, when the request
    /// asked for them (`params.logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// One unit vector per text of an `embed` input, in order (its answer
    /// has no text).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<Vec<f32>>,
}

/// A generated token and how likely it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenLogprob {
    /// The token's text (a lone token may hold part of a character: see `bytes`).
    pub token: String,
    /// Natural log of its probability, after penalties and logit bias, at
    /// temperature 1; -9999 for a token with none.
    pub logprob: f64,
    /// The token's bytes.
    pub bytes: Vec<u8>,
    /// The likeliest tokens at its position, likeliest first
    /// (`params.top_logprobs` of them).
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// One of the likeliest tokens at a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f64,
    /// The token's bytes.
    pub bytes: Vec<u8>,
}

impl Output {
    /// A text answer.
    pub fn text(text: impl Into<String>, finish_reason: impl Into<String>) -> Self {
        Output {
            text: text.into(),
            finish_reason: finish_reason.into(),
            tool_calls: Vec::new(),
            logprobs: None,
            embeddings: Vec::new(),
        }
    }

    /// This answer given to request `id` (a cached one, made for another
    /// request): its calls named after `id`, so two answers from one cache
    /// entry never share a call id.
    pub fn for_request(mut self, id: &str) -> Output {
        for (i, c) in self.tool_calls.iter_mut().enumerate() {
            c.id = crate::tools::call_of(id, i, "", String::new()).id;
        }
        self
    }

    /// Bytes the answer holds: its text, its calls' and its log
    /// probabilities' (each entry's texts and bytes, plus 16 for the number).
    pub fn len(&self) -> usize {
        let entry = |token: &str, bytes: &[u8]| token.len() + bytes.len() + 16;
        let logprobs: usize = self
            .logprobs
            .iter()
            .flatten()
            .map(|l| {
                entry(&l.token, &l.bytes) + l.top_logprobs.iter().map(|t| entry(&t.token, &t.bytes)).sum::<usize>()
            })
            .sum();
        self.text.len() + self.tool_calls.iter().map(crate::ToolCall::len).sum::<usize>() + logprobs
    }

    /// Whether the answer holds no text and no calls.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Token counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Sum of both.
    pub total_tokens: u32,
}

/// Cache tier that answered a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CacheTier {
    /// Not from a cache: the model computed it.
    #[default]
    None,
    /// In-memory tier.
    Memory,
    /// Disk tier.
    Disk,
    /// Semantic (nearest-neighbour) match.
    Semantic,
    /// Shared the model call of an identical request in flight at the same time.
    Coalesced,
    /// Answered by the HTTP ingress from its own memory of recent answers,
    /// without a queue (so not stored in `FLEET_RESULTS`).
    Ingress,
}

impl CacheTier {
    /// The tier as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheTier::None => "none",
            CacheTier::Memory => "memory",
            CacheTier::Disk => "disk",
            CacheTier::Semantic => "semantic",
            CacheTier::Coalesced => "coalesced",
            CacheTier::Ingress => "ingress",
        }
    }
}

/// Milliseconds spent in each phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Timings {
    /// From publish to the worker picking it up.
    pub queued_ms: f64,
    /// Backend time.
    pub compute_ms: f64,
    /// From publish to result.
    pub total_ms: f64,
}

/// An error with a stable code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable code.
    pub code: ErrorCode,
    /// What went wrong and what to do, for people.
    pub message: String,
    /// Whether sending the same request again may succeed.
    pub retryable: bool,
}

/// Stable error codes. They appear in results, HTTP error bodies and metric
/// labels; a code is never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The bytes are not a request (bad MessagePack/JSON, wrong shape, missing fields).
    DecodeError,
    /// A field value is not acceptable.
    InvalidRequest,
    /// The request asks for something its model's backend cannot do
    /// (constrained decoding from the echo model, say); the message names
    /// the field. Not retryable: send it to another model or without it.
    Unsupported,
    /// The input is over the configured size limit.
    PromptTooLarge,
    /// Prompt tokens plus `max_tokens` do not fit in the model's context.
    ContextLengthExceeded,
    /// No model of that name is configured in the fleet.
    UnknownModel,
    /// The request's deadline passed before it could run.
    DeadlineExceeded,
    /// The caller cancelled the request.
    Cancelled,
    /// The queue is full; retry later.
    Overloaded,
    /// The model failed while generating.
    BackendError,
    /// No result arrived within the wait; fetch it later by id.
    Timeout,
    /// No such result (or not yet).
    NotFound,
    /// Anything else.
    Internal,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::DecodeError => "decode_error",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::PromptTooLarge => "prompt_too_large",
            ErrorCode::ContextLengthExceeded => "context_length_exceeded",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::BackendError => "backend_error",
            ErrorCode::Timeout => "timeout",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether the same request may succeed if sent again.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::Overloaded | ErrorCode::BackendError | ErrorCode::Timeout | ErrorCode::Internal)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_tier_reads_as_it_is_written() {
        use CacheTier::*;
        for t in [None, Memory, Disk, Semantic, Coalesced, Ingress] {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }
}
