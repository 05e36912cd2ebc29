//! Whether a request fits in the model's context: prompt tokens plus the
//! tokens it may generate, checked before the request reaches the engine.
//! A request past the context would run the engine off the end of its
//! position tables; it gets a final `context_length_exceeded` instead.
//!
//! Counting a prompt's tokens is a round trip to the engine's tokenizer, so
//! it is done only when a cheap upper bound says the request might not fit:
//! the tokenizers mistral.rs loads never make more tokens than bytes, and
//! the chat template adds at most [`TEMPLATE_TOKENS`] plus
//! [`MESSAGE_TOKENS`] per message.

use either::Either;
use mistralrs::{Model, TextMessageRole, TextMessages};
use retro_fleet_schemas::ErrorCode;

use super::request::Prompt;
use crate::backend::BackendError;

/// Tokens a chat template may add around the messages.
const TEMPLATE_TOKENS: usize = 256;
/// Tokens a chat template may add around each message (role, separators).
const MESSAGE_TOKENS: usize = 16;

/// The context a request may use.
pub(super) struct Context {
    /// The model's context length in tokens, when known.
    pub tokens: Option<usize>,
    /// `max_tokens` of requests that set none.
    pub default_max_tokens: u32,
}

impl Context {
    /// The `max_tokens` to run `prompt` with: what the request asked for,
    /// or the default capped to what the context leaves. An error when the
    /// prompt and the asked tokens do not fit.
    pub(super) async fn budget(
        &self,
        model: &Model,
        prompt: &Prompt<'_>,
        asked: Option<u32>,
    ) -> Result<u32, BackendError> {
        let want = asked.unwrap_or(self.default_max_tokens);
        let Some(context) = self.tokens else { return Ok(want) };
        if upper_bound(prompt) + want as usize <= context {
            return Ok(want);
        }
        let prompt_tokens = count(model, prompt).await?;
        match asked {
            Some(asked) if prompt_tokens + asked as usize > context => Err(exceeded(format!(
                "This model's maximum context length is {context} tokens. However, you requested {} tokens \
                 ({prompt_tokens} in the messages, {asked} in the completion). Please reduce the length of the \
                 messages or completion.",
                prompt_tokens + asked as usize
            ))),
            None if prompt_tokens >= context => Err(exceeded(format!(
                "This model's maximum context length is {context} tokens. However, your messages resulted in \
                 {prompt_tokens} tokens, which leaves none for the completion. Please reduce the length of the \
                 messages."
            ))),
            Some(asked) => Ok(asked),
            None => Ok(want.min((context - prompt_tokens) as u32)),
        }
    }
}

fn exceeded(message: String) -> BackendError {
    BackendError { code: ErrorCode::ContextLengthExceeded, message, retryable: false }
}

/// At least as many tokens as `prompt` makes.
fn upper_bound(prompt: &Prompt<'_>) -> usize {
    match prompt {
        Prompt::Chat(messages) => {
            let bytes: usize = messages.iter().map(|(role, content)| role.len() + content.len()).sum();
            bytes + TEMPLATE_TOKENS + MESSAGE_TOKENS * messages.len()
        }
        Prompt::Completion(text) => text.len() + TEMPLATE_TOKENS,
        Prompt::Tokens(tokens) => tokens.len(),
    }
}

/// The tokens `prompt` makes, as the engine will see it.
async fn count(model: &Model, prompt: &Prompt<'_>) -> Result<usize, BackendError> {
    let text = match prompt {
        Prompt::Chat(messages) => {
            let mut tm = TextMessages::new();
            for (role, content) in messages.iter() {
                tm = tm.add_message(TextMessageRole::Custom(role.clone()), content);
            }
            Either::Left(tm)
        }
        Prompt::Completion(text) => Either::Right(text.to_string()),
        Prompt::Tokens(tokens) => return Ok(tokens.len()),
    };
    let chat = text.is_left();
    let tokens = model.tokenize(text, None, true, chat, None).await.map_err(|e| {
        tracing::warn!(error = %e, "counting the prompt's tokens failed");
        BackendError {
            code: ErrorCode::BackendError,
            message: "the model's tokenizer could not count the prompt's tokens".into(),
            retryable: true,
        }
    })?;
    Ok(tokens.len())
}
