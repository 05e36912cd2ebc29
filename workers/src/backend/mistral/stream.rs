//! Running one request on the engine in streaming mode (the only abortable
//! one: dropping the receiver cancels the sequence), forwarding text as it
//! arrives and cutting it at stop strings.

use mistralrs::{Model, Response};
use retro_fleet_schemas::ErrorCode;
use tokio::sync::mpsc;

use super::request::{self, Params, Prompt};
use crate::backend::{BackendError, DeltaSender};

/// A failure of the model (worth another attempt).
pub(super) fn backend_err(message: impl Into<String>) -> BackendError {
    BackendError { code: ErrorCode::BackendError, message: message.into(), retryable: true }
}

/// What the engine produced for one request.
pub(super) struct Output {
    pub text: String,
    pub finish_reason: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Runs one request, forwarding text to `deltas` as it arrives and cutting
/// it at stop strings.
pub(super) async fn generate(
    model: &Model,
    prompt: Prompt<'_>,
    p: &Params,
    deltas: Option<DeltaSender>,
) -> Result<Output, BackendError> {
    if p.max_tokens == Some(0) {
        // max_len=Some(0) would still produce 1 token
        return Ok(Output {
            text: String::new(),
            finish_reason: "length".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
        });
    }
    let stops: Vec<String> = p.stop.iter().filter(|s| !s.is_empty()).cloned().collect();
    let (tx, mut rx) = mpsc::channel::<Response>(1);
    let runner = model.inner();
    let (req, meter) = request::build(prompt, p, &stops, runner.next_request_id(), tx);
    let sender = runner.get_sender(None).map_err(|e| backend_err(format!("mistral.rs engine: {e}")))?;
    sender.send(req).await.map_err(|_| backend_err("mistral.rs engine stopped"))?;

    let mut text = Text::new(stops, deltas.as_ref());
    // A failure after text reached a streaming caller is final: another
    // attempt would stream from the start again onto the same reply subject,
    // and the caller would see the text twice.
    let failed = |message: String, emitted: usize| BackendError {
        retryable: deltas.is_none() || emitted == 0,
        ..backend_err(message)
    };
    let finish_reason = loop {
        // the engine drops the sender only when its thread dies (mistral.rs
        // reboots it on the next request): a cut-off answer is an error,
        // worth another attempt, never a result
        let Some(resp) = rx.recv().await else {
            return Err(failed("the mistral.rs engine stopped before the answer was complete".into(), text.emitted));
        };
        let (piece, fr) = match piece(resp) {
            Ok(p) => p,
            Err(Failure::Invalid(e)) => return Err(e),
            Err(Failure::Model(message)) => return Err(failed(message, text.emitted)),
        };
        text.push(&piece);
        if let Some(fr) = fr {
            break if text.stopped { "stop".to_string() } else { fr };
        }
    };
    let (prompt_tokens, completion_tokens) = meter.tokens();
    Ok(Output { text: text.finish(), finish_reason, prompt_tokens, completion_tokens })
}

/// Why a response ended a request.
enum Failure {
    /// The request is invalid: final.
    Invalid(BackendError),
    /// The model failed.
    Model(String),
}

/// The text of one streamed response and its finish reason, if last.
fn piece(resp: Response) -> Result<(String, Option<String>), Failure> {
    Ok(match resp {
        // chat streaming chunk
        Response::Chunk(c) => {
            let ch = c.choices.into_iter().next();
            (ch.as_ref().and_then(|c| c.delta.content.clone()).unwrap_or_default(), ch.and_then(|c| c.finish_reason))
        }
        // completion streaming chunk
        Response::CompletionChunk(c) => {
            let ch = c.choices.into_iter().next();
            (ch.as_ref().map(|c| c.text.clone()).unwrap_or_default(), ch.and_then(|c| c.finish_reason))
        }
        Response::ValidationError(e) => {
            let e = BackendError { code: ErrorCode::InvalidRequest, message: format!("{e}"), retryable: false };
            return Err(Failure::Invalid(e));
        }
        Response::InternalError(e) => return Err(Failure::Model(format!("mistral.rs: {e}"))),
        Response::ModelError(m, _) | Response::CompletionModelError(m, _) => {
            return Err(Failure::Model(format!("mistral.rs model error: {m}")))
        }
        _ => return Err(Failure::Model("unexpected mistral.rs response".into())),
    })
}

/// The answer's text as it streams in. In streaming mode the engine sends
/// the stop string (and one more token) before it notices it: a possible
/// prefix of a stop string is held back, and the text is cut here.
struct Text<'d> {
    text: String,
    /// Bytes of `text` sent to `deltas`.
    emitted: usize,
    stopped: bool,
    stops: Vec<String>,
    max_stop: usize,
    deltas: Option<&'d DeltaSender>,
}

impl<'d> Text<'d> {
    fn new(stops: Vec<String>, deltas: Option<&'d DeltaSender>) -> Self {
        let max_stop = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        Text { text: String::new(), emitted: 0, stopped: false, stops, max_stop, deltas }
    }

    /// Adds a piece (ignored after a stop string), sending what can no
    /// longer be cut.
    fn push(&mut self, piece: &str) {
        if self.stopped {
            return;
        }
        let text = &mut self.text;
        let from = text.len().saturating_sub(self.max_stop.saturating_sub(1));
        text.push_str(piece);
        let from = (0..=from).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        if let Some(pos) = self.stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| i + from)).min() {
            text.truncate(pos);
            self.stopped = true;
        }
        let safe = if self.stopped { text.len() } else { safe_prefix_len(text, &self.stops) };
        if safe > self.emitted {
            if let Some(d) = self.deltas {
                let _ = d.send(text[self.emitted..safe].to_string());
            }
            self.emitted = safe;
        }
    }

    /// The whole text, its held-back end sent.
    fn finish(self) -> String {
        if self.emitted < self.text.len() {
            if let Some(d) = self.deltas {
                let _ = d.send(self.text[self.emitted..].to_string());
            }
        }
        self.text
    }
}

/// Longest prefix of `text` that cannot be the start of a stop string.
fn safe_prefix_len(text: &str, stops: &[String]) -> usize {
    let mut safe = text.len();
    for s in stops {
        for k in (1..s.len()).rev() {
            if text.len() >= k
                && text.is_char_boundary(text.len() - k)
                && s.is_char_boundary(k)
                && text.ends_with(&s[..k])
            {
                safe = safe.min(text.len() - k);
                break;
            }
        }
    }
    safe
}

#[cfg(test)]
mod tests {
    use super::safe_prefix_len;

    #[test]
    fn holds_back_a_possible_stop_prefix() {
        let stops = vec!["END".to_string()];
        assert_eq!(safe_prefix_len("hello E", &stops), 6);
        assert_eq!(safe_prefix_len("hello EN", &stops), 6);
        assert_eq!(safe_prefix_len("hello", &stops), 5);
    }
}
