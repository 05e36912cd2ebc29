//! The embedding backend: a sentence-transformers model (see
//! [`crate::embed`]) answering `embed` inputs with one unit vector per
//! text. All texts of a request are embedded as one batch; one batch runs
//! at a time (candle already spreads a batch over every core), the others
//! wait their turn here.

use std::path::Path;
use std::sync::Arc;

use retro_fleet_schemas::{ErrorCode, InferRequest, Input, Usage};
use tokio::sync::Semaphore;

use super::mistral::files_revision;
use super::{Attempt, Backend, BackendError, Generating, Generation};
use crate::embed::{self, BertConfig, Embedder, EmbedderConfig};

/// An embedding model.
pub struct Embedding {
    embedder: Arc<dyn Embedder>,
    revision: String,
    turn: Semaphore,
}

fn error(code: ErrorCode, message: String) -> BackendError {
    BackendError { code, message, retryable: false }
}

impl Embedding {
    /// Loads the model in `path` (`revision`: default, a hash of its files).
    pub fn load(name: &str, path: &Path, revision: Option<String>) -> Result<Embedding, BackendError> {
        let failed = |e: String| error(ErrorCode::Internal, format!("model `{name}`: {e}"));
        let embedder = embed::load(&EmbedderConfig::Bert(BertConfig { path: path.to_path_buf() }))
            .map_err(|e| failed(e.to_string()))?;
        let revision = match revision {
            Some(r) => r,
            None => files_revision(path).map_err(|e| failed(format!("hashing {}: {e}", path.display())))?,
        };
        Ok(Embedding { embedder, revision, turn: Semaphore::new(1) })
    }
}

impl Backend for Embedding {
    fn revision(&self) -> Option<String> {
        Some(self.revision.clone())
    }

    fn generate<'a>(&'a self, req: &'a InferRequest, _attempt: Attempt) -> Generating<'a> {
        Box::pin(async move {
            let Input::Embed { texts, dimensions } = &req.input else {
                return Err(error(
                    ErrorCode::Unsupported,
                    format!(
                        "model `{}` is an embedding model: it answers texts to embed (`POST /v1/embeddings`, \
                         or input type `embed`), not prompts",
                        req.model
                    ),
                ));
            };
            if texts.is_empty() {
                return Err(error(ErrorCode::InvalidRequest, "no texts to embed: send at least one".into()));
            }
            let dim = self.embedder.dim();
            if dimensions.is_some_and(|d| d as usize != dim) {
                return Err(error(
                    ErrorCode::Unsupported,
                    format!(
                        "model `{}` returns {dim} dimensions and cannot shorten them: send `dimensions` {dim} or none",
                        req.model
                    ),
                ));
            }
            let _turn = self.turn.acquire().await.expect("never closed");
            let (embedder, texts) = (self.embedder.clone(), texts.clone());
            let done = tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                embedder.embed(&refs)
            })
            .await
            .map_err(|e| error(ErrorCode::Internal, format!("the embedding task ended: {e}")))?;
            let embedded = done.map_err(|e| BackendError {
                code: ErrorCode::BackendError,
                message: e.to_string(),
                retryable: true,
            })?;
            let tokens = embedded.tokens as u32;
            Ok(Generation {
                text: String::new(),
                finish_reason: "stop".into(),
                tool_calls: Vec::new(),
                logprobs: None,
                embeddings: embedded.vectors,
                usage: Usage { prompt_tokens: tokens, completion_tokens: 0, total_tokens: tokens },
                computed_tokens: 0,
                first_token: None,
            })
        })
    }
}
