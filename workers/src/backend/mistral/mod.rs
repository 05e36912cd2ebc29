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
//!   request: those requests fail retryably and are run again. An error the
//!   engine reports for a request (`narrow invalid args` past the end of
//!   the context, say) is the request's own: it is final, not retried.
//!
//! - `engine`: a loaded model as a backend.
//! - `context`: whether a request fits in the model's context.
//! - `load`: one instance from the model's configuration, and the pool of
//!   a model's instances.
//! - `adapters`: LoRA adapters, one pool per adapter.
//! - `request`: a mistral.rs request from a fleet request (prompt,
//!   sampling, the token meter and seeded sampler).
//! - `stream`: one request run in streaming mode, cut at stop strings.
//! - `logprobs`: each picked token's log probability, with its text.

mod adapters;
mod context;
mod engine;
mod load;
mod logprobs;
mod request;
mod stream;

pub use adapters::{with_adapters, Adapted};
pub use engine::Mistral;
pub use load::{files_revision, pool, Shared};
