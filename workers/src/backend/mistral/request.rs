//! Building a mistral.rs request from a fleet request: the prompt, the
//! sampling parameters, and the logits processor that counts tokens and
//! samples with the request's own seed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mistralrs::{
    Constraint, CustomLogitsProcessor, NormalRequest, Request, RequestLike, RequestMessage, Response, SamplingParams,
    StopTokens, Tensor, TextMessageRole, TextMessages,
};
use tokio::sync::mpsc;

/// The input of a request, borrowed.
pub(super) enum Prompt<'a> {
    Chat(&'a [(String, String)]),
    Completion(&'a str),
    /// Token ids, used as they are (a resumed generation).
    Tokens(&'a [u32]),
}

/// The sampling parameters of a request, with its defaults applied.
#[derive(Clone, Debug, Default)]
pub(super) struct Params {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
}

/// The sampler's seed for a request that sets none: a hash of its id, so
/// every attempt of one request (after a worker died, say) draws the same
/// tokens and a caller's stream continues with what it already read.
pub(super) fn seed_of(id: &str) -> u64 {
    // FNV-1a: stable across builds and platforms
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Where a resumed generation starts: the tokens generated before, its last
/// token to be produced again first (so the engine streams the tokens after
/// it as a continuation; the engine trims the first piece of a stream),
/// and the sampler's state after it.
pub(super) struct From<'a> {
    pub prompt: &'a [u32],
    pub generated: &'a [u32],
    pub rng: u64,
}

/// A streaming mistral.rs request for `prompt` (`id` from the engine),
/// stopping at `stops`, answering on `response`; and the meter that counts
/// its tokens (and records them when `record`, for checkpoints).
pub(super) fn build(
    prompt: Prompt<'_>,
    p: &Params,
    stops: &[String],
    id: usize,
    response: mpsc::Sender<Response>,
    record: bool,
    from: Option<From<'_>>,
) -> (Request, Arc<Meter>) {
    let greedy = p.temperature.is_none_or(|t| t <= 0.0);
    let (before, last) = match &from {
        Some(f) => (&f.generated[..f.generated.len() - 1], f.generated.last().copied()),
        None => (&[][..], None),
    };
    let meter = Arc::new(Meter {
        prompt_len: AtomicUsize::new(0),
        sampled: AtomicUsize::new(0),
        sampling: (!greedy).then(|| (p.temperature.unwrap(), p.top_k.map(|k| k as usize), p.top_p)),
        rng: Mutex::new(from.as_ref().map_or(p.seed.unwrap_or(0), |f| f.rng)),
        before: before.len(),
        forced: Mutex::new(last),
        record: record.then(|| {
            Mutex::new(Record {
                prompt: from.as_ref().map(|f| f.prompt.to_vec()),
                generated: before.iter().map(|t| (*t, 0)).collect(),
            })
        }),
    });
    let messages = match prompt {
        Prompt::Chat(msgs) => {
            let mut tm = TextMessages::new();
            for (role, content) in msgs {
                // Custom(role) renders the role verbatim in the template
                tm = tm.add_message(TextMessageRole::Custom(role.clone()), content);
            }
            tm.take_messages()
        }
        Prompt::Completion(text) => {
            RequestMessage::Completion { text: text.to_string(), echo_prompt: false, best_of: None }
        }
        Prompt::Tokens(tokens) => RequestMessage::CompletionTokens(tokens.to_vec()),
    };

    // SamplingParams directly, not RequestBuilder: its set_deterministic_sampler()
    // replaces every field, max_len included. Temperature must be Some(0.0):
    // None means 1.0 in the engine.
    let sampling_params = SamplingParams {
        temperature: Some(0.0),
        max_len: p.max_tokens.map(|m| m as usize),
        stop_toks: (!stops.is_empty()).then(|| StopTokens::Seqs(stops.to_vec())),
        ..SamplingParams::neutral()
    };
    let req = Request::Normal(Box::new(NormalRequest {
        messages,
        sampling_params,
        response,
        return_logprobs: false,
        is_streaming: true,
        id,
        constraint: Constraint::None,
        suffix: None,
        tools: None,
        tool_choice: None,
        logits_processors: Some(vec![meter.clone() as Arc<dyn CustomLogitsProcessor>]),
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        truncate_sequence: false, // a too-long prompt is a validation error, not silently cut
    }));
    (req, meter)
}

/// Per-request logits processor. It counts prompt and completion tokens
/// (streamed completion chunks carry no usage) and does seeded sampling:
/// it picks the token with its own RNG and masks every other one, and the
/// engine, asked for temperature 0, takes the only token left. When
/// recording (for checkpoints) it picks greedy tokens too, so it knows
/// every token id the engine takes.
pub(super) struct Meter {
    prompt_len: AtomicUsize,
    sampled: AtomicUsize,
    sampling: Option<(f64, Option<usize>, Option<f64>)>, // (temperature, top_k, top_p) when not greedy
    rng: Mutex<u64>,
    /// Tokens generated by an earlier attempt, in the prompt of this one.
    before: usize,
    /// The token to pick first (a resumed generation's last token).
    forced: Mutex<Option<u32>>,
    record: Option<Mutex<Record>>,
}

/// What a recording meter saw.
struct Record {
    /// The prompt's token ids (without earlier attempts' tokens).
    prompt: Option<Vec<u32>>,
    /// Each generated token and the sampler's state after it.
    generated: Vec<(u32, u64)>,
}

impl Meter {
    /// Tokens of the prompt, of the completion (an earlier attempt's tokens
    /// counted), and those this attempt computed, at most `max_tokens` of
    /// them: the engine may step a sequence once more after it reached its
    /// `max_len`, and that token never reaches the answer.
    pub(super) fn tokens(&self, max_tokens: Option<u32>) -> (usize, usize, usize) {
        let prompt = self.prompt_len.load(Ordering::SeqCst).saturating_sub(self.before);
        let sampled = self.sampled.load(Ordering::SeqCst);
        let computed = max_tokens.map_or(sampled, |m| sampled.min(m as usize));
        (prompt, computed + self.before, computed)
    }

    /// The prompt, the first `n` generated tokens and the sampler's state
    /// after them, when recorded that far.
    pub(super) fn recorded(&self, n: usize) -> Option<(Vec<u32>, Vec<u32>, u64)> {
        let r = self.record.as_ref()?.lock().unwrap();
        let prompt = r.prompt.clone()?;
        let (_, rng) = *r.generated.get(n.checked_sub(1)?)?;
        Some((prompt, r.generated[..n].iter().map(|(t, _)| *t).collect(), rng))
    }

    /// Notes the token picked, with the sampler's state after it.
    fn picked(&self, token: usize) {
        if let Some(r) = &self.record {
            let rng = *self.rng.lock().unwrap();
            r.lock().unwrap().generated.push((token as u32, rng));
        }
    }

    fn next_f64(&self) -> f64 {
        let mut s = self.rng.lock().unwrap(); // splitmix64
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl CustomLogitsProcessor for Meter {
    fn apply(&self, logits: &Tensor, context: &[u32]) -> mistralrs::Result<Tensor> {
        if self.sampled.fetch_add(1, Ordering::SeqCst) == 0 {
            self.prompt_len.store(context.len(), Ordering::SeqCst);
            if let Some(r) = &self.record {
                let mut r = r.lock().unwrap();
                if r.prompt.is_none() {
                    r.prompt = Some(context.to_vec());
                }
            }
        }
        let pick = match (self.forced.lock().unwrap().take(), self.sampling) {
            (Some(token), _) => token as usize,
            (None, None) if self.record.is_none() => return Ok(logits.clone()),
            (None, None) => logits.argmax(0)?.to_scalar::<u32>()? as usize,
            (None, Some(sampling)) => self.sample(logits, sampling)?,
        };
        self.picked(pick);
        only(pick, logits)
    }
}

/// `logits` with every token but `pick` masked out.
fn only(pick: usize, logits: &Tensor) -> mistralrs::Result<Tensor> {
    let n = logits.dim(0)?;
    let mut out = vec![f32::MIN; n];
    out[pick] = 0.0;
    Tensor::from_vec(out, n, logits.device())
}

impl Meter {
    /// Draws a token from `logits` with this request's RNG.
    fn sample(
        &self,
        logits: &Tensor,
        (t, top_k, top_p): (f64, Option<usize>, Option<f64>),
    ) -> mistralrs::Result<usize> {
        let v: Vec<f32> = logits.to_vec1::<f32>()?;
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_unstable_by(|&a, &b| v[b].total_cmp(&v[a]));
        if let Some(k) = top_k.filter(|k| *k > 0) {
            idx.truncate(k);
        }
        let max = v[idx[0]] as f64;
        let mut p: Vec<f64> = idx.iter().map(|&i| ((v[i] as f64 - max) / t).exp()).collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        if let Some(tp) = top_p.filter(|tp| *tp > 0.0 && *tp < 1.0) {
            let (mut c, mut keep) = (0.0, 0);
            while keep < p.len() && c < tp {
                c += p[keep];
                keep += 1;
            }
            idx.truncate(keep);
            p.truncate(keep);
            let z: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= z);
        }
        let u = self.next_f64();
        let (mut acc, mut pick) = (0.0, idx[idx.len() - 1]);
        for (j, &i) in idx.iter().enumerate() {
            acc += p[j];
            if u < acc {
                pick = i;
                break;
            }
        }
        Ok(pick)
    }
}
