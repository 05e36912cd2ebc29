//! Log probabilities for a result: the meter's note of each pick, with
//! each token's text, up to where the answer's text ends (a stop string
//! cuts it short of the tokens generated).
//!
//! A token's bytes come from the model's vocabulary when its directory has
//! a `tokenizer.json` (read once at load, as the grammar library reads it:
//! a SentencePiece `▁` is a space, a byte-fallback token its byte). Else
//! each token is decoded alone by the engine, which may drop a leading
//! space or show part of a character as U+FFFD.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use mistralrs::Model;
use retro_fleet_schemas::{ErrorCode, TokenLogprob, TopLogprob};

use super::request::Likelihood;
use crate::backend::BackendError;

/// Marks a special token's bytes in the vocabulary table.
const SPECIAL: u8 = 0xff;

/// Each token's bytes, from `dir/tokenizer.json` if there is one.
pub(super) fn vocab(dir: &Path) -> Option<Arc<Vec<Vec<u8>>>> {
    let file = dir.join("tokenizer.json");
    if !file.is_file() {
        return None;
    }
    match toktrie_hf_tokenizers::ByteTokenizer::from_file(&file) {
        Ok(t) => Some(Arc::new(t.token_bytes())),
        Err(e) => {
            tracing::warn!(error = %e, "reading each token's bytes failed; log probabilities decode tokens one by one");
            None
        }
    }
}

/// The picks, as many as make `text_len` bytes of text, in the result's shape.
pub(super) async fn of(
    model: &Model,
    vocab: Option<&[Vec<u8>]>,
    picks: Vec<Likelihood>,
    text_len: usize,
) -> Result<Vec<TokenLogprob>, BackendError> {
    let bytes = match vocab {
        Some(v) => table(v, &picks),
        None => decoded(model, &picks).await?,
    };
    let of = |id: u32| {
        let b = bytes.get(&id).cloned().unwrap_or_default();
        (String::from_utf8_lossy(&b).into_owned(), b)
    };
    let mut out = Vec::with_capacity(picks.len());
    let mut len = 0;
    for l in picks {
        if len >= text_len {
            break;
        }
        let (token, bytes) = of(l.token);
        len += bytes.len();
        let top_logprobs = l
            .top
            .iter()
            .map(|&(id, lp)| {
                let (token, bytes) = of(id);
                TopLogprob { token, logprob: lp as f64, bytes }
            })
            .collect();
        out.push(TokenLogprob { token, logprob: l.logprob as f64, bytes, top_logprobs });
    }
    Ok(out)
}

/// The ids `picks` mention.
fn ids(picks: &[Likelihood]) -> Vec<u32> {
    let mut ids: Vec<u32> =
        picks.iter().flat_map(|l| std::iter::once(l.token).chain(l.top.iter().map(|t| t.0))).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Their bytes from the vocabulary (a special token's without its mark).
fn table(vocab: &[Vec<u8>], picks: &[Likelihood]) -> HashMap<u32, Vec<u8>> {
    ids(picks)
        .into_iter()
        .map(|id| {
            let b = vocab.get(id as usize).map_or(&[][..], Vec::as_slice);
            let b = match b.split_first() {
                Some((&SPECIAL, rest)) if !rest.is_empty() => rest,
                _ => b,
            };
            (id, b.to_vec())
        })
        .collect()
}

/// Their texts, each decoded alone by the engine.
async fn decoded(model: &Model, picks: &[Likelihood]) -> Result<HashMap<u32, Vec<u8>>, BackendError> {
    let ids = ids(picks);
    let texts = futures::future::join_all(ids.iter().map(|&id| model.detokenize(vec![id], false))).await;
    let mut out = HashMap::with_capacity(ids.len());
    for (id, text) in ids.into_iter().zip(texts) {
        let text = text.map_err(|e| {
            tracing::warn!(error = %e, "decoding a token for its log probability failed");
            BackendError {
                code: ErrorCode::BackendError,
                message: "the model's tokenizer could not decode the tokens for their log probabilities".into(),
                retryable: true,
            }
        })?;
        out.insert(id, text.into_bytes());
    }
    Ok(out)
}
