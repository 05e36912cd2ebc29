//! Running one request on the engine in streaming mode (the only abortable
//! one: dropping the receiver cancels the sequence), forwarding text as it
//! arrives and cutting it at stop strings.

use mistralrs::{CalledFunction, Model, Response};
use retro_fleet_schemas::{ErrorCode, TokenLogprob};
use tokio::sync::mpsc;

use super::request::{self, Meter, Params, Prompt};
use crate::backend::{BackendError, Checkpoint, Checkpointing, DeltaSender};

/// A failure of the model (worth another attempt).
pub(super) fn backend_err(message: impl Into<String>) -> BackendError {
    BackendError { code: ErrorCode::BackendError, message: message.into(), retryable: true }
}

/// What the engine produced for one request.
pub(super) struct Output {
    pub text: String,
    pub finish_reason: String,
    /// Calls the engine read in the model's own tool-call format (a
    /// request whose tool choice is `auto`).
    pub calls: Vec<CalledFunction>,
    /// Each token's log probability, when the request asked.
    pub logprobs: Option<Vec<TokenLogprob>>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Tokens this attempt computed (fewer than `completion_tokens` when it
    /// resumed an earlier attempt).
    pub computed_tokens: usize,
    /// When the engine sent this attempt's first new token.
    pub first_token: Option<std::time::Instant>,
}

/// One attempt at a request, beyond its prompt and parameters.
pub(super) struct Run<'a> {
    /// Where to send streamed text.
    pub deltas: Option<DeltaSender>,
    /// Where an earlier attempt got to.
    pub resume: Option<&'a Checkpoint>,
    /// Where to send checkpoints, and how often.
    pub checkpoints: Option<Checkpointing>,
    /// The model's revision (recorded in checkpoints).
    pub revision: &'a str,
    /// Each token's bytes, when known (for log probabilities).
    pub vocab: Option<&'a [Vec<u8>]>,
}

/// Runs one request, forwarding text to `deltas` as it arrives and cutting
/// it at stop strings; a resumed one starts with the earlier text and goes
/// on from its tokens.
pub(super) async fn generate(
    model: &Model,
    prompt: Prompt<'_>,
    p: &Params<'_>,
    run: Run<'_>,
) -> Result<Output, BackendError> {
    if p.max_tokens == Some(0) {
        // max_len=Some(0) would still produce 1 token
        return Ok(Output {
            text: String::new(),
            finish_reason: "length".into(),
            calls: Vec::new(),
            logprobs: p.asked.logprobs.then(Vec::new),
            prompt_tokens: 0,
            completion_tokens: 0,
            computed_tokens: 0,
            first_token: None,
        });
    }
    let stops: Vec<String> = p.asked.stop.iter().filter(|s| !s.is_empty()).cloned().collect();
    let run_vocab = run.vocab;
    let (tx, mut rx) = mpsc::channel::<Response>(1);
    let runner = model.inner();
    let from = run.resume.map(|c| request::From { prompt: &c.prompt, generated: &c.generated, rng: c.rng });
    let record = run.checkpoints.is_some();
    let (req, meter) = request::build(prompt, p, &stops, runner.next_request_id(), tx, record, from);
    let sender = runner.get_sender(None).map_err(|e| {
        tracing::warn!(error = %e, "no mistral.rs engine to send the request to");
        backend_err("the model's engine is not running")
    })?;
    sender.send(req).await.map_err(|_| backend_err("the model's engine stopped"))?;

    let mut text = Text::new(stops, run.deltas.as_ref());
    let mut marks = Marks::new(run.checkpoints, run.revision, p.max_tokens.unwrap_or(0));
    // the first piece of a resumed stream is the earlier attempt's last
    // token again (trimmed by the engine): the earlier text stands for it
    let mut skip = match run.resume {
        Some(c) => {
            text.push(&c.text);
            marks.tokens = c.generated.len();
            1
        }
        None => 0,
    };
    let mut calls = Vec::new();
    let mut first_token = None;
    let finish_reason = loop {
        // the engine drops the sender only when its thread dies (mistral.rs
        // reboots it on the next request): a cut-off answer is an error,
        // worth another attempt, never a result
        let Some(resp) = rx.recv().await else {
            // another attempt goes on from the last checkpoint; chunks carry
            // their offset and the ingress forwards only what is new
            return Err(backend_err("the model's engine stopped before the answer was complete"));
        };
        let (piece, fr, mut called) = match piece(resp) {
            Ok(p) => p,
            Err(Failure::Invalid(e)) => return Err(e),
            Err(Failure::Model(detail)) => {
                // the same request would fail the same way on any instance
                tracing::warn!(error = %detail, "the model failed on the request");
                if p.asked.answer_constraint().is_some() {
                    // most likely the grammar library's limits: the caller's
                    // constraint, not the model's health (the breaker does
                    // not count it)
                    return Err(BackendError {
                        code: ErrorCode::InvalidRequest,
                        message:
                            "decoding under `params.constraint` (OpenAI `response_format`) failed part way; \
                                  a simpler grammar or schema may work, and the log has the detail under the request id"
                                .into(),
                        retryable: false,
                    });
                }
                let message = "the model failed while generating; its log has the detail under the request id";
                return Err(BackendError { retryable: false, ..backend_err(message) });
            }
        };
        calls.append(&mut called);
        if skip > 0 {
            skip -= 1;
        } else {
            first_token.get_or_insert_with(std::time::Instant::now);
            text.push(&piece);
            if fr.is_none() && !text.stopped {
                marks.token(&piece, &text.text, &meter);
            }
        }
        if let Some(fr) = fr {
            break if text.stopped { "stop".to_string() } else { fr };
        }
    };
    let (prompt_tokens, completion_tokens, computed_tokens) = meter.tokens(p.max_tokens);
    let text = text.finish();
    let logprobs = match meter.likelihoods(computed_tokens) {
        Some(picks) => Some(super::logprobs::of(model, run_vocab, picks, text.len()).await?),
        None => None,
    };
    Ok(Output { text, finish_reason, calls, logprobs, prompt_tokens, completion_tokens, computed_tokens, first_token })
}

/// Checkpoints of a generation: which token the text has reached, and
/// when the last checkpoint was sent.
///
/// The engine sends one streamed piece per token, except that a token
/// ending inside a multi-byte character sends nothing and the next piece
/// carries both; such a piece always holds a non-ASCII character. So the
/// count of pieces is the count of tokens while every piece is ASCII, and
/// checkpoints stop at the first piece that is not (a later attempt then
/// resumes from the last exact one).
struct Marks<'a> {
    to: Option<Checkpointing>,
    revision: &'a str,
    max_tokens: u32,
    /// Generated tokens whose text is in the text so far.
    tokens: usize,
    last: std::time::Instant,
}

impl<'a> Marks<'a> {
    fn new(to: Option<Checkpointing>, revision: &'a str, max_tokens: u32) -> Self {
        Marks { to, revision, max_tokens, tokens: 0, last: std::time::Instant::now() }
    }

    /// One more token's `piece` reached `text`.
    fn token(&mut self, piece: &str, text: &str, meter: &Meter) {
        let Some(to) = &self.to else { return };
        if !piece.is_ascii() {
            tracing::debug!("non-ASCII text: no more checkpoints for this generation");
            self.to = None;
            return;
        }
        self.tokens += 1;
        if self.last.elapsed() < to.every {
            return;
        }
        if let Some((prompt, generated, rng)) = meter.recorded(self.tokens) {
            let c = Checkpoint {
                revision: self.revision.to_string(),
                prompt,
                generated,
                text: text.to_string(),
                rng,
                max_tokens: self.max_tokens,
            };
            to.tx.send_replace(Some(c));
            self.last = std::time::Instant::now();
        }
    }
}

/// Why a response ended a request.
enum Failure {
    /// The request is invalid: final.
    Invalid(BackendError),
    /// The model failed on this request (the engine's own words, for the log).
    Model(String),
}

/// The text of one streamed response, its finish reason if last, and the
/// tool calls the engine read.
fn piece(resp: Response) -> Result<(String, Option<String>, Vec<CalledFunction>), Failure> {
    Ok(match resp {
        // chat streaming chunk
        Response::Chunk(c) => match c.choices.into_iter().next() {
            Some(ch) => {
                let calls = ch.delta.tool_calls.unwrap_or_default().into_iter().map(|c| c.function).collect();
                (ch.delta.content.unwrap_or_default(), ch.finish_reason, calls)
            }
            None => (String::new(), None, Vec::new()),
        },
        // completion streaming chunk
        Response::CompletionChunk(c) => {
            let ch = c.choices.into_iter().next();
            (ch.as_ref().map(|c| c.text.clone()).unwrap_or_default(), ch.and_then(|c| c.finish_reason), Vec::new())
        }
        // the engine's text (backtraces, file paths) goes to the log, with
        // the request id of the span; the caller gets a sentence
        Response::ValidationError(e) => {
            tracing::warn!(error = %e, "the model refused the request");
            // the grammar library's reason is about the caller's constraint
            let e = e.to_string();
            let message = match e.strip_prefix("Invalid grammar. ") {
                Some(why) => format!(
                    "`params.constraint` (OpenAI `response_format`) cannot be used: {}",
                    why.lines().next().unwrap_or_default().chars().take(300).collect::<String>()
                ),
                None => "the model refused the request as given; its log has the reason under the request id".into(),
            };
            return Err(Failure::Invalid(BackendError { code: ErrorCode::InvalidRequest, message, retryable: false }));
        }
        Response::InternalError(e) => return Err(Failure::Model(format!("{e}"))),
        Response::ModelError(m, _) | Response::CompletionModelError(m, _) => return Err(Failure::Model(m)),
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
