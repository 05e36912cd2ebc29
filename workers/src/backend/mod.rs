//! Backends run a request and return text. The worker owns one per model.
//!
//! - [`echo`]: returns the input, for tests and overhead benchmarks.
//! - [`synthetic`]: sleeps a fixed latency, for scaling benchmarks.
//! - `mistral`: real text models through mistral.rs (feature `mistralrs`).
//! - [`pool`]: several instances of one model, least busy first.
//! - [`cohort`]: lets requests into a mistral.rs engine together, so it
//!   batches them.

pub mod cohort;
pub mod echo;
#[cfg(feature = "mistralrs")]
pub mod mistral;
pub mod pool;
pub mod synthetic;

use std::sync::Arc;

use futures::future::BoxFuture;
use retro_fleet_schemas::{ErrorCode, InferRequest, Usage};
use tokio::sync::mpsc;

use crate::config::ModelConfig;

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
    fn generate<'a>(
        &'a self,
        req: &'a InferRequest,
        deltas: Option<DeltaSender>,
    ) -> BoxFuture<'a, Result<Generation, BackendError>>;
}

/// Builds (loads) the backend of a configured model, each instance behind
/// its own circuit breaker on `breakers`.
pub async fn build(
    name: &str,
    cfg: &ModelConfig,
    breakers: &crate::breaker::Board,
    budget: &Arc<pool::Budget>,
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
        ModelConfig::Mistralrs {
            path,
            gguf_file,
            isq,
            max_num_seqs,
            admission,
            gather_ms,
            default_max_tokens,
            instances,
            warm_instances,
            grow_at,
            idle_unload_secs,
            balance,
            revision,
            adapters,
        } => {
            let spec = mistral::MistralSpec {
                path: path.clone(),
                gguf_file: gguf_file.clone(),
                isq: isq.clone(),
                max_num_seqs: *max_num_seqs,
                admission: *admission,
                gather: std::time::Duration::from_millis(*gather_ms),
                default_max_tokens: *default_max_tokens,
                revision: revision.clone(),
            };
            let pooling = mistral::Pooling {
                max: *instances,
                warm: *warm_instances,
                grow_at: grow_at.unwrap_or(*max_num_seqs),
                idle_unload: (*idle_unload_secs > 0).then(|| std::time::Duration::from_secs(*idle_unload_secs)),
                balance: *balance,
                budget: budget.clone(),
            };
            let base = mistral::load_instances(name, &spec, &pooling, breakers).await?;
            if adapters.is_empty() {
                base
            } else {
                Arc::new(mistral::with_adapters(name, &spec, base, adapters, &pooling, breakers).await?)
            }
        }
        #[cfg(not(feature = "mistralrs"))]
        ModelConfig::Mistralrs { .. } => {
            return Err(BackendError {
                code: ErrorCode::Internal,
                message: format!("model `{name}` needs mistral.rs, but this build has the `mistralrs` feature off"),
                retryable: false,
            })
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

    fn generate<'a>(
        &'a self,
        _req: &'a InferRequest,
        _deltas: Option<DeltaSender>,
    ) -> BoxFuture<'a, Result<Generation, BackendError>> {
        let e = BackendError { code: ErrorCode::BackendError, message: self.message.clone(), retryable: false };
        Box::pin(async move { Err(e) })
    }
}

/// Applies `max_tokens` and stop sequences to whitespace-separated words, as
/// the test backends count tokens; returns the text and its finish reason.
pub(crate) fn limit_words<'w>(
    words: impl IntoIterator<Item = &'w str>,
    max_tokens: Option<u32>,
    stop: &[String],
) -> (String, String) {
    let mut text = String::new();
    let mut finish = "stop";
    for (i, w) in words.into_iter().enumerate() {
        if max_tokens.is_some_and(|m| i as u32 >= m) {
            finish = "length";
            break;
        }
        if i > 0 {
            text.push(' ');
        }
        text.push_str(w);
    }
    if let Some(pos) = stop.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min() {
        text.truncate(pos);
        finish = "stop";
    }
    (text, finish.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_words_honours_max_tokens_and_stop() {
        let w = ["a", "b", "c", "d"];
        let w = || w.iter().copied();
        assert_eq!(limit_words(w(), None, &[]), ("a b c d".into(), "stop".into()));
        assert_eq!(limit_words(w(), Some(2), &[]), ("a b".into(), "length".into()));
        assert_eq!(limit_words(w(), None, &["c".into()]), ("a b ".into(), "stop".into()));
        assert_eq!(limit_words(w(), Some(0), &[]), ("".into(), "length".into()));
    }
}
