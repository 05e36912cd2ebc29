//! The echo backend: the output is the input.

use futures::future::BoxFuture;
use retro_fleet_schemas::{InferRequest, Input, Usage};

use super::{limit_words, Backend, BackendError, DeltaSender, Generation};

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

    fn generate<'a>(
        &'a self,
        req: &'a InferRequest,
        deltas: Option<DeltaSender>,
    ) -> BoxFuture<'a, Result<Generation, BackendError>> {
        Box::pin(async move {
            let source = match &req.input {
                Input::Completion { prompt } => prompt.as_str(),
                Input::Chat { messages } => messages.last().map(|m| m.content.as_str()).unwrap_or(""),
            };
            let (text, finish_reason) = limit_words(source.split_whitespace(), req.params.max_tokens, &req.params.stop);
            if let Some(tx) = deltas {
                send_words(&tx, &text);
            }
            let prompt_tokens = req.input.text_len().div_ceil(4) as u32;
            let completion_tokens = text.split_whitespace().count() as u32;
            Ok(Generation {
                text,
                finish_reason,
                usage: Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens },
            })
        })
    }
}

/// Streams `text` word by word (with the separating spaces) so the deltas
/// concatenate to exactly `text`.
pub(crate) fn send_words(tx: &DeltaSender, text: &str) {
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c == ' ' && i > start {
            let _ = tx.send(text[start..i].to_string());
            start = i;
        }
    }
    if start < text.len() {
        let _ = tx.send(text[start..].to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_concatenate_to_text() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        send_words(&tx, "hello big  world ");
        drop(tx);
        let mut all = String::new();
        while let Ok(d) = rx.try_recv() {
            all.push_str(&d);
        }
        assert_eq!(all, "hello big  world ");
    }
}
