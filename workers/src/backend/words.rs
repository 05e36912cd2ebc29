//! Output made of whitespace-separated words, as the test backends (echo,
//! synthetic) produce it and count its tokens.

use retro_fleet_schemas::{InferRequest, Usage};

use super::{DeltaSender, Generation};

/// The answer of a test backend whose output is `words`: limited by the
/// request's `max_tokens` and stop sequences, streamed word by word to
/// `deltas`, prompt tokens estimated at four bytes each. Completion tokens
/// are `completion_tokens`, or else the words of the text.
pub(crate) fn answer<'w>(
    req: &InferRequest,
    words: impl IntoIterator<Item = &'w str>,
    completion_tokens: Option<u32>,
    deltas: Option<DeltaSender>,
) -> Generation {
    let (text, finish_reason) = limit_words(words, req.params.max_tokens, &req.params.stop);
    if let Some(tx) = deltas {
        send_words(&tx, &text);
    }
    let prompt_tokens = req.input.text_len().div_ceil(4) as u32;
    let completion_tokens = completion_tokens.unwrap_or_else(|| text.split_whitespace().count() as u32);
    Generation {
        text,
        finish_reason,
        tool_calls: Vec::new(),
        logprobs: None,
        embeddings: Vec::new(),
        usage: Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens },
        computed_tokens: completion_tokens,
        // a test backend has the whole text at once
        first_token: (completion_tokens > 0).then(std::time::Instant::now),
    }
}

/// Applies `max_tokens` and stop sequences to whitespace-separated words, as
/// the test backends count tokens; returns the text and its finish reason.
fn limit_words<'w>(
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

/// Streams `text` word by word (with the separating spaces) so the deltas
/// concatenate to exactly `text`.
fn send_words(tx: &DeltaSender, text: &str) {
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
    fn limit_words_honours_max_tokens_and_stop() {
        let w = ["a", "b", "c", "d"];
        let w = || w.iter().copied();
        assert_eq!(limit_words(w(), None, &[]), ("a b c d".into(), "stop".into()));
        assert_eq!(limit_words(w(), Some(2), &[]), ("a b".into(), "length".into()));
        assert_eq!(limit_words(w(), None, &["c".into()]), ("a b ".into(), "stop".into()));
        assert_eq!(limit_words(w(), Some(0), &[]), ("".into(), "length".into()));
    }

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
