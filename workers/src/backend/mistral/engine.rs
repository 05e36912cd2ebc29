//! A loaded mistral.rs model as a [`Backend`]: a fleet request becomes the
//! engine's parameters and prompt, enters through the cohort gate, and runs.

use std::sync::Arc;

use mistralrs::Model;
use retro_fleet_schemas::tools::finish_with_calls;
use retro_fleet_schemas::{ErrorCode, InferRequest, Input, Usage};

use super::context::Context;
use super::request::{self, Params, Prompt};
use super::stream::{self, Run};
use crate::backend::cohort::Gate;
use crate::backend::{Attempt, Backend, BackendError, Checkpoint, Generating, Generation};

/// A loaded mistral.rs model.
pub struct Mistral {
    pub(super) model: Model,
    /// Cohort admission (none: continuous).
    pub(super) gate: Option<Arc<Gate>>,
    pub(super) revision: String,
    pub(super) default_max_tokens: u32,
    /// The model's context length in tokens, when known.
    pub(super) context: Option<usize>,
    /// Whether its chat template shows tools to the model.
    pub(super) tools: bool,
    /// Each token's bytes, when the model's directory has a `tokenizer.json`.
    pub(super) vocab: Option<Arc<Vec<Vec<u8>>>>,
}

impl Backend for Mistral {
    fn revision(&self) -> Option<String> {
        Some(self.revision.clone())
    }

    fn generate<'a>(&'a self, req: &'a InferRequest, attempt: Attempt) -> Generating<'a> {
        Box::pin(async move {
            let p = &req.params;
            let mut params =
                Params { asked: p, max_tokens: None, seed: p.seed.unwrap_or_else(|| request::seed_of(&req.id)) };
            if !p.tools.is_empty() && !self.tools {
                return Err(BackendError {
                    code: ErrorCode::Unsupported,
                    message: format!(
                        "model `{}` cannot honour `params.tools` (OpenAI `tools`): its chat template does not show \
                         tools to the model; send the request without them, or to a model whose template does",
                        req.model
                    ),
                    retryable: false,
                });
            }
            // A grammar's state is not in a checkpoint, nor the engine's
            // tool-call parsing, nor earlier tokens' log probabilities: such
            // a generation is neither checkpointed nor resumed. Run again,
            // it draws the same tokens (the same seed), so a stream goes on.
            // (a grammar comes from `constraint`, or from tools that force a call)
            let constrained = p.constraint.is_some() || !p.tools.is_empty() || p.logprobs;
            let resume = attempt.resume.filter(|c| !constrained && self.resumes(c, &req.id));
            let joined: Vec<u32>;
            let prompt = match (&resume, &req.input) {
                // the earlier prompt and tokens, but the last token: it is
                // produced again first (see `request::From`)
                (Some(c), _) => {
                    joined = c.prompt.iter().chain(&c.generated[..c.generated.len() - 1]).copied().collect();
                    params.max_tokens = Some(c.max_tokens - (c.generated.len() as u32 - 1));
                    Prompt::Tokens(&joined)
                }
                (None, Input::Chat { messages }) => Prompt::Chat(messages, &p.tools),
                (None, Input::Completion { prompt }) => Prompt::Completion(prompt),
                (None, Input::Embed { .. }) => return Err(BackendError::embeds_nothing(&req.model)),
            };
            if resume.is_none() {
                let context = Context { tokens: self.context, default_max_tokens: self.default_max_tokens };
                let budget = context.budget(&self.model, &prompt, p.max_tokens).await?;
                // a default budget may be more than one answer's log
                // probabilities can carry
                p.check_logprob_entries(budget).map_err(|e| BackendError {
                    code: e.code,
                    message: e.message,
                    retryable: false,
                })?;
                params.max_tokens = Some(budget);
            }
            let _place = match &self.gate {
                Some(gate) => Some(gate.enter().await),
                None => None,
            };
            let run = Run {
                deltas: attempt.deltas,
                resume: resume.as_ref(),
                checkpoints: attempt.checkpoints.filter(|_| !constrained),
                revision: &self.revision,
                vocab: self.vocab.as_deref().map(Vec::as_slice),
            };
            let out = stream::generate(&self.model, prompt, &params, run).await?;
            // calls the tool choice forced, else those the engine read
            let (text, finish_reason, tool_calls) = match p.tool_calls(&req.id, &out.text) {
                Some(calls) => (String::new(), finish_with_calls(p.tool_plan(), &out.finish_reason).to_string(), calls),
                None if !out.calls.is_empty() => {
                    // without parallel calls, the model's first call only
                    let most = if p.parallel_tool_calls == Some(false) { 1 } else { usize::MAX };
                    let calls =
                        out.calls.into_iter().take(most).enumerate().map(|(i, c)| request::tool_call(&req.id, c, i));
                    (out.text, finish_with_calls(p.tool_plan(), &out.finish_reason).to_string(), calls.collect())
                }
                None => (out.text, out.finish_reason, Vec::new()),
            };
            Ok(Generation {
                text,
                finish_reason,
                tool_calls,
                logprobs: out.logprobs,
                embeddings: Vec::new(),
                usage: Usage {
                    prompt_tokens: out.prompt_tokens as u32,
                    completion_tokens: out.completion_tokens as u32,
                    total_tokens: (out.prompt_tokens + out.completion_tokens) as u32,
                },
                computed_tokens: out.computed_tokens as u32,
                first_token: out.first_token,
            })
        })
    }
}

impl Mistral {
    /// Whether checkpoint `c` of request `id` can be resumed here: the same
    /// model revision, and tokens left to generate.
    fn resumes(&self, c: &Checkpoint, id: &str) -> bool {
        let n = c.generated.len();
        let ok = c.revision == self.revision && n > 0 && n < c.max_tokens as usize && !c.text.is_empty();
        if ok {
            tracing::info!(id, tokens = n, "resuming from a checkpoint");
        } else {
            tracing::info!(id, tokens = n, revision = %c.revision, "a checkpoint this instance cannot resume; starting again");
        }
        ok
    }
}
