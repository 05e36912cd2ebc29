//! What every backend is: the [`Backend`] trait, what it produces and how
//! it fails. Apart from the backends and the builder in `backend`, so that
//! the backends, pools and breakers depend on it and not on each other.

use futures::future::BoxFuture;
use retro_fleet_schemas::{ErrorCode, InferRequest, TokenLogprob, ToolCall, Usage};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// What a backend produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Output text.
    pub text: String,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: String,
    /// The tool calls the model made.
    pub tool_calls: Vec<ToolCall>,
    /// Each token's log probability, when the request asked.
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// One vector per text of an `embed` input (an embedding model's answer).
    pub embeddings: Vec<Vec<f32>>,
    /// Token counts.
    pub usage: Usage,
    /// Tokens this attempt computed: fewer than the completion's when it
    /// resumed an earlier attempt's checkpoint.
    pub computed_tokens: u32,
    /// When this attempt's first token was there (none: it computed none).
    pub first_token: Option<std::time::Instant>,
}

/// A backend failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// Stable code for the result.
    pub code: ErrorCode,
    /// What happened.
    pub message: String,
    /// Whether another attempt (maybe on another worker) may succeed.
    pub retryable: bool,
}

impl BackendError {
    /// The final answer of a backend without a real sampler (`kind`: echo,
    /// synthetic) to a request that sets a field only a sampler honours
    /// (see [`retro_fleet_schemas::SamplingParams::beyond_basic`]): an
    /// `unsupported` error naming the field, rather than an answer that
    /// silently ignores it.
    pub fn refuses_beyond_basic(req: &InferRequest, kind: &str) -> Result<(), BackendError> {
        let Some(f) = req.params.beyond_basic() else { return Ok(()) };
        Err(BackendError {
            code: ErrorCode::Unsupported,
            message: format!(
                "model `{}` cannot honour `{}` (OpenAI `{}`): its {kind} backend runs no model; \
                 send the request without it, or to a mistralrs model",
                req.model, f.native, f.openai
            ),
            retryable: false,
        })
    }
}

impl BackendError {
    /// The answer of a text model to texts to embed: `unsupported`, naming
    /// the kind of model that embeds.
    pub fn refuses_embed(req: &InferRequest) -> Result<(), BackendError> {
        match req.input.is_embed() {
            true => Err(BackendError::embeds_nothing(&req.model)),
            false => Ok(()),
        }
    }

    /// Text model `model` was sent texts to embed.
    pub fn embeds_nothing(model: &str) -> BackendError {
        BackendError {
            code: ErrorCode::Unsupported,
            message: format!(
                "model `{model}` generates text and embeds nothing: send texts to embed to a model with \
                 `backend = \"embedding\"`"
            ),
            retryable: false,
        }
    }
}

/// Sends streamed text deltas, in order, while a backend generates.
pub type DeltaSender = mpsc::UnboundedSender<String>;

/// The tokens a generation has produced so far, enough for another attempt
/// (on any worker holding the same model revision) to go on from there
/// instead of starting again. Kept in KV `fleet_checkpoints`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Revision of the model that produced the tokens.
    pub revision: String,
    /// The prompt's token ids, as the engine saw them.
    pub prompt: Vec<u32>,
    /// The generated token ids.
    pub generated: Vec<u32>,
    /// The answer's text so far: exactly the text of `generated`.
    pub text: String,
    /// The sampler's state after the last generated token.
    pub rng: u64,
    /// The tokens the whole generation may produce (`max_tokens` as run).
    pub max_tokens: u32,
}

/// Where a generation sends its latest [`Checkpoint`] while it runs, and
/// how often.
#[derive(Debug)]
pub struct Checkpointing {
    /// Holds the latest checkpoint (a slow writer skips older ones).
    pub tx: tokio::sync::watch::Sender<Option<Checkpoint>>,
    /// At most one checkpoint per this long.
    pub every: std::time::Duration,
}

/// How to run one attempt of a request, beyond the request itself.
#[derive(Debug, Default)]
pub struct Attempt {
    /// Where to send streamed text, when the caller streams.
    pub deltas: Option<DeltaSender>,
    /// Where an earlier attempt got to (a backend that cannot resume ignores it).
    pub resume: Option<Checkpoint>,
    /// Where to send checkpoints while generating (none: do not checkpoint).
    pub checkpoints: Option<Checkpointing>,
}

impl Attempt {
    /// A first attempt streaming to `deltas` when given.
    pub fn streaming(deltas: Option<DeltaSender>) -> Attempt {
        Attempt { deltas, ..Default::default() }
    }
}

/// A generation under way (what [`Backend::generate`] returns).
pub type Generating<'a> = BoxFuture<'a, Result<Generation, BackendError>>;

/// A model implementation.
pub trait Backend: Send + Sync + 'static {
    /// Revision of the model (part of results and cache keys).
    fn revision(&self) -> Option<String>;

    /// LoRA adapters a request may name (none by default).
    fn adapters(&self) -> Vec<String> {
        Vec::new()
    }

    /// Whether a call now would be admitted (false while a circuit breaker
    /// is open); a pool prefers available instances.
    fn available(&self) -> bool {
        true
    }

    /// Runs `req`. When `attempt.deltas` is given, sends output pieces as
    /// they are generated; their concatenation equals the returned text (a
    /// resumed attempt sends the resumed text first, then the rest).
    fn generate<'a>(&'a self, req: &'a InferRequest, attempt: Attempt) -> Generating<'a>;
}
