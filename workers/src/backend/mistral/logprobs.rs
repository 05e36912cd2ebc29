//! Log probabilities for a result: the meter's note of each pick, with
//! each token's text from the engine's tokenizer, up to where the answer's
//! text ends (a stop string cuts it short of the tokens generated).

use std::collections::HashMap;

use mistralrs::Model;
use retro_fleet_schemas::{TokenLogprob, TopLogprob};

use super::request::Likelihood;
use crate::backend::BackendError;

/// The picks, as many as make `text_len` bytes of text, in the result's shape.
pub(super) async fn of(
    model: &Model,
    picks: Vec<Likelihood>,
    text_len: usize,
) -> Result<Vec<TokenLogprob>, BackendError> {
    let mut ids: Vec<u32> =
        picks.iter().flat_map(|l| std::iter::once(l.token).chain(l.top.iter().map(|t| t.0))).collect();
    ids.sort_unstable();
    ids.dedup();
    let decoded = futures::future::join_all(ids.iter().map(|&id| model.detokenize(vec![id], false))).await;
    let mut texts = HashMap::with_capacity(ids.len());
    for (id, text) in ids.into_iter().zip(decoded) {
        let text = text.map_err(|e| {
            tracing::warn!(error = %e, "decoding a token for its log probability failed");
            BackendError {
                code: retro_fleet_schemas::ErrorCode::BackendError,
                message: "the model's tokenizer could not decode the tokens for their log probabilities".into(),
                retryable: true,
            }
        })?;
        texts.insert(id, text);
    }
    let text = |id: u32| texts.get(&id).cloned().unwrap_or_default();
    let mut out = Vec::with_capacity(picks.len());
    let mut len = 0;
    for l in picks {
        if len >= text_len {
            break;
        }
        let token = text(l.token);
        len += token.len();
        let top_logprobs = l
            .top
            .iter()
            .map(|&(id, lp)| {
                let token = text(id);
                TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob: lp as f64 }
            })
            .collect();
        out.push(TokenLogprob { bytes: token.as_bytes().to_vec(), token, logprob: l.logprob as f64, top_logprobs });
    }
    Ok(out)
}
