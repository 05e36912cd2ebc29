//! The mistral.rs backend: text models from a local directory (safetensors
//! with `config.json`, tokenizer and chat template) or a GGUF file, on CPU
//! (or CUDA with the `cuda` feature).
//!
//! Facts of mistral.rs 0.8.1 this code relies on (read in its sources):
//! - A request is only abortable in streaming mode (dropping the receiver
//!   cancels the sequence at the next token), so every request streams
//!   internally; dropping the future returned by `generate` stops the model.
//! - There is no per-request seed (one RNG per engine, seeded with 0), so
//!   sampling with a temperature is done by a per-request logits processor
//!   with its own seeded RNG; the engine then takes the only token left.
//! - A `None` temperature means 1.0 inside the engine: greedy needs `Some(0.0)`.
//! - `max_len = Some(0)` still yields one token: 0 is answered here.
//! - Stop strings are noticed one token late in streaming mode, so text is
//!   held back and cut here.
//! - The engine's response channel has capacity 1 and a slow reader stalls
//!   the whole engine: responses are drained at once.
//! - An engine whose thread panicked (its KV cache does under mixed-length
//!   batches, see [`super::cohort`]) closes the response channels of the
//!   requests it held, and `get_sender` starts a new engine for the next
//!   request: those requests fail retryably and are run again (unless text
//!   already reached a streaming caller: then the failure is final).
//!
//! - `load`: one instance from the model's configuration, and the pool of
//!   a model's instances.
//! - `adapters`: LoRA adapters, one pool per adapter.
//! - `request`: a mistral.rs request from a fleet request (prompt,
//!   sampling, the token meter and seeded sampler).
//! - `stream`: one request run in streaming mode, cut at stop strings.

mod adapters;
mod load;
mod request;
mod stream;

use std::sync::Arc;

use mistralrs::Model;
use retro_fleet_schemas::{ErrorCode, InferRequest, Input, Usage};

use super::cohort::Gate;
use super::{Backend, BackendError, DeltaSender, Generating, Generation};
use request::{Params, Prompt};

pub use adapters::{with_adapters, Adapted};
pub use load::{files_revision, pool, Shared};

fn backend_err(message: impl Into<String>) -> BackendError {
    BackendError { code: ErrorCode::BackendError, message: message.into(), retryable: true }
}

/// A loaded mistral.rs model.
pub struct Mistral {
    model: Model,
    /// Cohort admission (none: continuous).
    gate: Option<Arc<Gate>>,
    revision: String,
    default_max_tokens: u32,
}

impl Backend for Mistral {
    fn revision(&self) -> Option<String> {
        Some(self.revision.clone())
    }

    fn generate<'a>(&'a self, req: &'a InferRequest, deltas: Option<DeltaSender>) -> Generating<'a> {
        Box::pin(async move {
            let p = &req.params;
            let params = Params {
                max_tokens: Some(p.max_tokens.unwrap_or(self.default_max_tokens)),
                temperature: p.temperature,
                top_p: p.top_p,
                top_k: p.top_k,
                seed: p.seed,
                stop: p.stop.clone(),
            };
            let chat: Vec<(String, String)>;
            let prompt = match &req.input {
                Input::Chat { messages } => {
                    chat = messages.iter().map(|m| (m.role.clone(), m.content.clone())).collect();
                    Prompt::Chat(&chat)
                }
                Input::Completion { prompt } => Prompt::Completion(prompt),
            };
            let _place = match &self.gate {
                Some(gate) => Some(gate.enter().await),
                None => None,
            };
            let out = stream::generate(&self.model, prompt, &params, deltas).await?;
            Ok(Generation {
                text: out.text,
                finish_reason: out.finish_reason,
                usage: Usage {
                    prompt_tokens: out.prompt_tokens as u32,
                    completion_tokens: out.completion_tokens as u32,
                    total_tokens: (out.prompt_tokens + out.completion_tokens) as u32,
                },
            })
        })
    }
}
