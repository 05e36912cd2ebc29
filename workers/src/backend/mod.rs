//! Backends run a request and return text. The worker owns one per model.
//!
//! - [`echo`]: returns the input, for tests and overhead benchmarks.
//! - [`synthetic`]: sleeps a fixed latency, for scaling benchmarks.
//! - `mistral`: real text models through mistral.rs (feature `mistralrs`).
//! - `embedding`: sentence-embedding models run with candle (feature `mistralrs`).
//! - [`pool`]: several instances of one model, least busy first, under the
//!   worker's memory budget ([`pool::Budget`]).
//! - [`cohort`]: lets requests into a mistral.rs engine together, so it
//!   batches them.
//! - `words`: the word-counted output of the test backends.
//! - `interface`: the [`Backend`] trait, [`Generation`] and [`BackendError`].

pub mod cohort;
pub mod echo;
#[cfg(feature = "mistralrs")]
pub mod embedding;
mod interface;
#[cfg(feature = "mistralrs")]
pub mod mistral;
pub mod pool;
pub mod synthetic;
mod words;

use std::sync::Arc;

use retro_fleet_schemas::{ErrorCode, InferRequest};

use crate::config::ModelConfig;

pub use interface::{Attempt, Backend, BackendError, Checkpoint, Checkpointing, DeltaSender, Generating, Generation};

/// Builds (loads) the backend of a configured model, each instance behind
/// its own circuit breaker on `breakers`, loading on the caller's runtime.
pub async fn build(
    name: &str,
    cfg: &ModelConfig,
    breakers: &crate::breaker::Board,
    budget: &Arc<pool::Budget>,
) -> Result<Arc<dyn Backend>, BackendError> {
    build_on(name, cfg, breakers, budget, &pool::LoadOn::Caller).await
}

/// [`build`], with model instances loaded where `load_on` says.
pub async fn build_on(
    name: &str,
    cfg: &ModelConfig,
    breakers: &crate::breaker::Board,
    budget: &Arc<pool::Budget>,
    load_on: &pool::LoadOn,
) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(match cfg {
        ModelConfig::Echo { revision } => breakers.guard(name, 0, Arc::new(echo::Echo::new(revision.clone()))),
        ModelConfig::Synthetic { latency_ms, output_tokens, concurrency, revision, fail_rate } => breakers.guard(
            name,
            0,
            Arc::new(
                synthetic::Synthetic::new(
                    std::time::Duration::from_millis(*latency_ms),
                    *output_tokens,
                    *concurrency,
                    revision.clone(),
                )
                .with_fail_rate(*fail_rate),
            ),
        ),
        #[cfg(feature = "mistralrs")]
        ModelConfig::Mistralrs { adapters, .. } => {
            let shared = mistral::Shared { budget, breakers, load_on };
            let base = mistral::pool(name, cfg, &shared).await?;
            if adapters.is_empty() {
                base
            } else {
                Arc::new(mistral::with_adapters(name, cfg, base, &shared).await?)
            }
        }
        #[cfg(feature = "mistralrs")]
        ModelConfig::Embedding { path, revision } => {
            breakers.guard(name, 0, Arc::new(embedding::Embedding::load(name, path, revision.clone())?))
        }
        #[cfg(not(feature = "mistralrs"))]
        ModelConfig::Mistralrs { .. } | ModelConfig::Embedding { .. } => {
            let _ = load_on;
            return Err(BackendError {
                code: ErrorCode::Internal,
                message: format!("model `{name}` needs mistral.rs, but this build has the `mistralrs` feature off"),
                retryable: false,
            });
        }
    })
}

/// A model that failed to load: every request gets a clear, final error
/// (the worker keeps serving its other models).
pub struct Unavailable {
    message: String,
}

impl Unavailable {
    /// Stands in for model `name`, which failed with `why`.
    pub fn new(name: &str, why: &str) -> Self {
        Unavailable { message: format!("model `{name}` could not be loaded on this worker: {why}") }
    }
}

impl Backend for Unavailable {
    fn revision(&self) -> Option<String> {
        None
    }

    fn generate<'a>(&'a self, _req: &'a InferRequest, _attempt: Attempt) -> Generating<'a> {
        let e = BackendError { code: ErrorCode::BackendError, message: self.message.clone(), retryable: false };
        Box::pin(async move { Err(e) })
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// A completion request for unit tests.
    pub fn request(id: &str) -> retro_fleet_schemas::InferRequest {
        retro_fleet_schemas::InferRequest {
            v: 1,
            id: id.into(),
            model: "m".into(),
            adapter: None,
            input: retro_fleet_schemas::Input::Completion { prompt: "x".into() },
            params: Default::default(),
            stream: false,
            cache: Default::default(),
            tenant: None,
            metadata: Default::default(),
        }
    }
}
