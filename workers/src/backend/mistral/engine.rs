//! A loaded mistral.rs model as a [`Backend`]: a fleet request becomes the
//! engine's parameters and prompt, enters through the cohort gate, and runs.

use std::sync::Arc;

use mistralrs::Model;
use retro_fleet_schemas::{InferRequest, Input, Usage};

use super::request::{Params, Prompt};
use super::stream;
use crate::backend::cohort::Gate;
use crate::backend::{Backend, DeltaSender, Generating, Generation};

/// A loaded mistral.rs model.
pub struct Mistral {
    pub(super) model: Model,
    /// Cohort admission (none: continuous).
    pub(super) gate: Option<Arc<Gate>>,
    pub(super) revision: String,
    pub(super) default_max_tokens: u32,
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
