//! What every backend is: the [`Backend`] trait, what it produces and how
//! it fails. Apart from the backends and the builder in `backend`, so that
//! the backends, pools and breakers depend on it and not on each other.

use futures::future::BoxFuture;
use retro_fleet_schemas::{ErrorCode, InferRequest, Usage};
use tokio::sync::mpsc;

/// What a backend produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Output text.
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Token counts.
    pub usage: Usage,
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

/// Sends streamed text deltas, in order, while a backend generates.
pub type DeltaSender = mpsc::UnboundedSender<String>;

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

    /// Runs `req`. When `deltas` is given, sends output pieces as they are
    /// generated; their concatenation equals the returned text.
    fn generate<'a>(&'a self, req: &'a InferRequest, deltas: Option<DeltaSender>) -> Generating<'a>;
}
