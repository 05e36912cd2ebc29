//! The echo backend: the output is the input.

use retro_fleet_schemas::{InferRequest, Input};

use super::{words, Attempt, Backend, BackendError, Generating};

/// Returns the prompt (or the last chat message), word-limited by
/// `max_tokens` and cut at stop sequences.
pub struct Echo {
    revision: Option<String>,
}

impl Echo {
    /// An echo backend reporting `revision`.
    pub fn new(revision: Option<String>) -> Self {
        Echo { revision }
    }
}

impl Backend for Echo {
    fn revision(&self) -> Option<String> {
        self.revision.clone()
    }

    fn generate<'a>(&'a self, req: &'a InferRequest, attempt: Attempt) -> Generating<'a> {
        Box::pin(async move {
            BackendError::refuses_embed(req)?;
            BackendError::refuses_beyond_basic(req, "echo")?;
            Ok(words::answer(req, last_text(&req.input).split_whitespace(), None, attempt.deltas))
        })
    }
}

/// The prompt, or the last chat message.
fn last_text(input: &Input) -> &str {
    match input {
        Input::Completion { prompt } => prompt.as_str(),
        Input::Chat { messages } => messages.last().map(|m| m.content.as_str()).unwrap_or(""),
        Input::Embed { .. } => "",
    }
}
