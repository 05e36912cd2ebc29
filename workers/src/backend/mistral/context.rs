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
use mistralrs::{Model, Request};
use mistralrs_core::TokenizationRequest;
use retro_fleet_schemas::{ChatMessage, ErrorCode};

use super::request::{self, Prompt};
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
        Prompt::Chat(messages, tools) => {
            let bytes: usize = messages.iter().map(ChatMessage::text_len).sum();
            // a template writes each tool as JSON, about as long as ours
            let tools: usize = tools.iter().map(|t| serde_json::to_vec(t).map_or(0, |v| v.len())).sum();
            bytes + tools + TEMPLATE_TOKENS + MESSAGE_TOKENS * (messages.len() + tools.min(1) * 8)
        }
        Prompt::Completion(text) => text.len() + TEMPLATE_TOKENS,
        Prompt::Tokens(tokens) => tokens.len(),
    }
}

/// The tokens `prompt` makes, as the engine will see it: the same
/// messages (tool fields included) and tools it will render.
pub(super) async fn count(model: &Model, prompt: &Prompt<'_>) -> Result<usize, BackendError> {
    let (text, tools) = match prompt {
        Prompt::Chat(messages, tools) => (Either::Left(request::chat(messages)), request::engine_tools(tools)),
        Prompt::Completion(text) => (Either::Right(text.to_string()), None),
        Prompt::Tokens(tokens) => return Ok(tokens.len()),
    };
    let failed = |e: String| {
        tracing::warn!(error = %e, "counting the prompt's tokens failed");
        BackendError {
            code: ErrorCode::BackendError,
            message: "the model's tokenizer could not count the prompt's tokens".into(),
            retryable: true,
        }
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let add_generation_prompt = text.is_left();
    let req = Request::Tokenize(TokenizationRequest {
        text,
        tools,
        add_generation_prompt,
        add_special_tokens: true,
        enable_thinking: None,
        reasoning_effort: None,
        response: tx,
    });
    let sender = model.inner().get_sender(None).map_err(|e| failed(e.to_string()))?;
    sender.send(req).await.map_err(|e| failed(e.to_string()))?;
    match rx.recv().await {
        Some(Ok(tokens)) => Ok(tokens.len()),
        Some(Err(e)) => Err(failed(e.to_string())),
        None => Err(failed("the engine stopped".into())),
    }
}

/// Whether the model's chat template shows tools to the model: a
/// conversation with a tool makes more tokens than without.
pub(super) async fn shows_tools(model: &Model) -> bool {
    let messages = [ChatMessage::text("user", "hi")];
    let tool: retro_fleet_schemas::tools::Tool = serde_json::from_value(serde_json::json!(
        {"type": "function", "function": {"name": "probe", "parameters": {"type": "object"}}}
    ))
    .expect("a tool");
    let without = count(model, &Prompt::Chat(&messages, &[])).await;
    let with = count(model, &Prompt::Chat(&messages, std::slice::from_ref(&tool))).await;
    match (without, with) {
        (Ok(a), Ok(b)) => b > a,
        _ => false,
    }
}
