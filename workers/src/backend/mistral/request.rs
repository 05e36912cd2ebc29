//! Building a mistral.rs request from a fleet request: the prompt, the
//! sampling parameters, and the logits processor that counts tokens and
//! samples with the request's own seed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use either::Either;
use mistralrs::{
    CalledFunction, Constraint, CustomLogitsProcessor, Function, NormalRequest, Request, RequestMessage, Response,
    SamplingParams, StopTokens, Tensor, TextMessageRole, TextMessages, Tool, ToolChoice, ToolType,
};
use retro_fleet_schemas::{ChatMessage, ToolPlan};
use tokio::sync::mpsc;

/// The input of a request, borrowed.
pub(super) enum Prompt<'a> {
    /// Messages, and the tools the chat template shows the model.
    Chat(&'a [ChatMessage], &'a [retro_fleet_schemas::tools::Tool]),
    Completion(&'a str),
    /// Token ids, used as they are (a resumed generation).
    Tokens(&'a [u32]),
}

/// The sampling parameters of a request, with its defaults applied.
#[derive(Clone, Debug)]
pub(super) struct Params<'a> {
    /// What the request asked for.
    pub asked: &'a retro_fleet_schemas::SamplingParams,
    /// Most tokens to generate: the request's within the model's context,
    /// or what is left of a resumed generation's.
    pub max_tokens: Option<u32>,
    /// The sampler's seed: the request's, or one made from its id.
    pub seed: u64,
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
    let a = p.asked;
    let greedy = a.temperature.is_none_or(|t| t <= 0.0);
    let (before, last) = match &from {
        Some(f) => (&f.generated[..f.generated.len() - 1], f.generated.last().copied()),
        None => (&[][..], None),
    };
    let meter = Arc::new(Meter {
        prompt_len: AtomicUsize::new(0),
        sampled: AtomicUsize::new(0),
        last_context: AtomicUsize::new(0),
        sampling: (!greedy).then(|| Sampling {
            temperature: a.temperature.unwrap_or(1.0),
            top_k: a.top_k.map(|k| k as usize),
            top_p: a.top_p,
            min_p: a.min_p,
        }),
        shaping: Shaping::of(a),
        rng: Mutex::new(from.as_ref().map_or(p.seed, |f| f.rng)),
        before: before.len(),
        forced: Mutex::new(last),
        record: record.then(|| {
            Mutex::new(Record {
                prompt: from.as_ref().map(|f| f.prompt.to_vec()),
                generated: before.iter().map(|t| (*t, 0)).collect(),
            })
        }),
        likelihoods: a.logprobs.then(|| (a.top_logprobs.unwrap_or(0) as usize, Mutex::new(Vec::new()))),
    });
    let tools = match &prompt {
        Prompt::Chat(_, tools) => engine_tools(tools),
        _ => None,
    };
    let messages = match prompt {
        Prompt::Chat(msgs, _) => {
            RequestMessage::Chat { messages: chat(msgs), enable_thinking: None, reasoning_effort: None }
        }
        Prompt::Completion(text) => {
            RequestMessage::Completion { text: text.to_string(), echo_prompt: false, best_of: None }
        }
        Prompt::Tokens(tokens) => RequestMessage::CompletionTokens(tokens.to_vec()),
    };

    // SamplingParams directly, not RequestBuilder: its set_deterministic_sampler()
    // replaces every field, max_len included. Temperature must be Some(0.0):
    // None means 1.0 in the engine. Penalties and logit bias are the meter's
    // (the engine counts penalties over the prompt too, and 0.8.1 never
    // applies `logits_bias`).
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
        constraint: a.answer_constraint().map_or(Constraint::None, |c| constraint(&c)),
        suffix: None,
        // the engine parses calls from the model's own format only when the
        // model decides (`auto`); a forced call is decoded under its schema
        // and read by the fleet (`SamplingParams::tool_calls`)
        tool_choice: tools.as_ref().map(|_| match a.tool_plan() {
            ToolPlan::Auto => ToolChoice::Auto,
            _ => ToolChoice::None,
        }),
        tools,
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
    /// Length of the context at the last call: the engine calls again with
    /// the same context when a grammar refused the first pick.
    last_context: AtomicUsize,
    /// How to draw a token, when not greedy.
    sampling: Option<Sampling>,
    /// Penalties and biases applied to the logits first.
    shaping: Option<Shaping>,
    rng: Mutex<u64>,
    /// Tokens generated by an earlier attempt, in the prompt of this one.
    before: usize,
    /// The token to pick first (a resumed generation's last token).
    forced: Mutex<Option<u32>>,
    record: Option<Mutex<Record>>,
    /// When the request asked for log probabilities: how many of the
    /// likeliest tokens to keep per position, and each pick's.
    likelihoods: Option<(usize, Mutex<Vec<Likelihood>>)>,
}

/// How likely a picked token was, and the likeliest at its position.
#[derive(Debug, Clone)]
pub(super) struct Likelihood {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
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

    /// The likelihoods of the first `n` picks, when the request asked.
    pub(super) fn likelihoods(&self, n: usize) -> Option<Vec<Likelihood>> {
        let (_, all) = self.likelihoods.as_ref()?;
        let all = all.lock().unwrap();
        Some(all[..n.min(all.len())].to_vec())
    }

    /// Notes how likely the pick was under `logits` (in place of the last
    /// note when picked `again` for the same context).
    fn weigh(&self, logits: &Tensor, token: usize, again: bool) -> mistralrs::Result<()> {
        let Some((top, all)) = &self.likelihoods else { return Ok(()) };
        let v: Vec<f32> = logits.to_vec1::<f32>()?;
        let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = max + v.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
        let lp = |i: usize| (v[i] - lse).max(-9999.0);
        let mut idx: Vec<usize> = (0..v.len()).collect();
        let k = (*top).min(v.len());
        if k > 0 {
            idx.select_nth_unstable_by(k - 1, |&a, &b| v[b].total_cmp(&v[a]));
        }
        idx.truncate(k);
        idx.sort_unstable_by(|&a, &b| v[b].total_cmp(&v[a]));
        let l = Likelihood {
            token: token as u32,
            logprob: lp(token),
            top: idx.iter().map(|&i| (i as u32, lp(i))).collect(),
        };
        let mut all = all.lock().unwrap();
        if again {
            all.pop();
        }
        all.push(l);
        Ok(())
    }

    /// Notes the token picked, with the sampler's state after it (in place
    /// of the last one when picked `again` for the same context).
    fn picked(&self, token: usize, again: bool) {
        if let Some(r) = &self.record {
            let rng = *self.rng.lock().unwrap();
            let mut r = r.lock().unwrap();
            if again {
                r.generated.pop();
            }
            r.generated.push((token as u32, rng));
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
        // a second call for the same context: a grammar refused the first
        // pick and the engine samples again among the tokens it allows
        let again = self.last_context.swap(context.len(), Ordering::SeqCst) == context.len();
        if !again && self.sampled.fetch_add(1, Ordering::SeqCst) == 0 {
            self.prompt_len.store(context.len(), Ordering::SeqCst);
            if let Some(r) = &self.record {
                let mut r = r.lock().unwrap();
                if r.prompt.is_none() {
                    r.prompt = Some(context.to_vec());
                }
            }
        }
        let shaped;
        let logits = match &self.shaping {
            Some(s) => {
                let completion = self.prompt_len.load(Ordering::SeqCst).saturating_sub(self.before);
                shaped = s.apply(logits, &context[completion.min(context.len())..])?;
                &shaped
            }
            None => logits,
        };
        let pick = match (self.forced.lock().unwrap().take(), &self.sampling) {
            (Some(token), _) => token as usize,
            (None, None) if self.record.is_none() && self.likelihoods.is_none() => return Ok(logits.clone()),
            (None, None) => logits.argmax(0)?.to_scalar::<u32>()? as usize,
            (None, Some(sampling)) => self.sample(logits, sampling)?,
        };
        self.weigh(logits, pick, again)?;
        self.picked(pick, again);
        only(pick, logits)
    }
}

/// How a request draws tokens when it is not greedy.
#[derive(Debug, Clone, Copy)]
struct Sampling {
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    min_p: Option<f64>,
}

/// What a request changes in the logits before any token is picked, greedy
/// or not: OpenAI's penalties, over the completion's tokens only, and
/// logit bias.
#[derive(Debug, Clone)]
struct Shaping {
    frequency: f32,
    presence: f32,
    bias: Vec<(usize, f32)>,
}

impl Shaping {
    fn of(p: &retro_fleet_schemas::SamplingParams) -> Option<Shaping> {
        let s = Shaping {
            frequency: p.frequency_penalty.unwrap_or(0.0) as f32,
            presence: p.presence_penalty.unwrap_or(0.0) as f32,
            bias: p.logit_bias.iter().map(|(t, b)| (*t as usize, *b as f32)).collect(),
        };
        (s.frequency != 0.0 || s.presence != 0.0 || !s.bias.is_empty()).then_some(s)
    }

    /// `logits` penalised for what `completion` (the tokens generated so
    /// far) holds, and biased.
    fn apply(&self, logits: &Tensor, completion: &[u32]) -> mistralrs::Result<Tensor> {
        let mut v: Vec<f32> = logits.to_vec1::<f32>()?;
        if self.frequency != 0.0 || self.presence != 0.0 {
            let mut counts = std::collections::HashMap::<usize, f32>::new();
            for t in completion {
                *counts.entry(*t as usize).or_default() += 1.0;
            }
            for (t, n) in counts {
                if let Some(l) = v.get_mut(t) {
                    *l -= n * self.frequency + self.presence;
                }
            }
        }
        for (t, b) in &self.bias {
            if let Some(l) = v.get_mut(*t) {
                *l += b;
            }
        }
        let n = v.len();
        Tensor::from_vec(v, n, logits.device())
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
    fn sample(&self, logits: &Tensor, s: &Sampling) -> mistralrs::Result<usize> {
        let v: Vec<f32> = logits.to_vec1::<f32>()?;
        let mut idx: Vec<usize> = (0..v.len()).filter(|&i| v[i] > f32::NEG_INFINITY).collect();
        if idx.is_empty() {
            idx = (0..v.len()).collect();
        }
        idx.sort_unstable_by(|&a, &b| v[b].total_cmp(&v[a]));
        if let Some(k) = s.top_k.filter(|k| *k > 0) {
            idx.truncate(k);
        }
        let max = v[idx[0]] as f64;
        let mut p: Vec<f64> = idx.iter().map(|&i| ((v[i] as f64 - max) / s.temperature).exp()).collect();
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        if let Some(mp) = s.min_p.filter(|mp| *mp > 0.0) {
            // p is sorted: keep the likeliest and those within min_p of it
            let floor = p[0] * mp;
            let keep = p.iter().take_while(|x| **x >= floor).count().max(1);
            idx.truncate(keep);
            p.truncate(keep);
            let z: f64 = p.iter().sum();
            p.iter_mut().for_each(|x| *x /= z);
        }
        if let Some(tp) = s.top_p.filter(|tp| *tp > 0.0 && *tp < 1.0) {
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

/// A conversation as the engine's chat template reads it: role and
/// content, and the tool calls of an assistant turn and the call a tool
/// message answers, under the keys templates use.
pub(super) fn chat(msgs: &[ChatMessage]) -> Vec<indexmap::IndexMap<String, mistralrs::MessageContent>> {
    let mut tm = TextMessages::new();
    for m in msgs {
        // Custom(role) renders the role verbatim in the template
        tm = tm.add_message(TextMessageRole::Custom(m.role.clone()), &m.content);
    }
    let mut messages: Vec<_> = tm.into();
    for (map, m) in messages.iter_mut().zip(msgs) {
        if !m.tool_calls.is_empty() {
            let calls = m
                .tool_calls
                .iter()
                .map(|c| {
                    let f = serde_json::json!({"name": c.function.name, "arguments": c.function.arguments});
                    [
                        ("id".to_string(), c.id.clone().into()),
                        ("type".into(), "function".into()),
                        ("function".into(), f),
                    ]
                    .into_iter()
                    .collect()
                })
                .collect();
            map.insert("tool_calls".into(), Either::Right(calls));
        }
        if let Some(id) = &m.tool_call_id {
            map.insert("tool_call_id".into(), Either::Left(id.clone()));
        }
    }
    messages
}

/// The engine's tools for a request's (none when it offers none).
pub(super) fn engine_tools(tools: &[retro_fleet_schemas::tools::Tool]) -> Option<Vec<Tool>> {
    (!tools.is_empty()).then(|| {
        tools
            .iter()
            .map(|t| Tool {
                tp: ToolType::Function,
                function: Function {
                    name: t.function.name.clone(),
                    description: t.function.description.clone(),
                    parameters: t.function.parameters.as_ref().and_then(|p| serde_json::from_value(p.clone()).ok()),
                },
            })
            .collect()
    })
}

/// The engine's tool call, as the fleet names it.
pub(super) fn tool_call(id: &str, c: CalledFunction, i: usize) -> retro_fleet_schemas::ToolCall {
    retro_fleet_schemas::tools::call_of(id, i, &c.name, c.arguments)
}

/// The engine's constraint for a fleet one. A JSON schema without its own
/// `x-guidance` options is written compactly: flexible whitespace lets a
/// model pad its answer with blanks until `max_tokens` runs out.
fn constraint(c: &retro_fleet_schemas::Constraint) -> Constraint {
    use retro_fleet_schemas::Constraint as C;
    match c {
        C::JsonSchema { schema } => {
            let mut schema = schema.clone();
            if let Some(o) = schema.as_object_mut() {
                o.entry("x-guidance").or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
            }
            Constraint::JsonSchema(schema)
        }
        C::Regex { pattern } => Constraint::Regex(pattern.clone()),
        C::Lark { grammar } => Constraint::Lark(grammar.clone()),
    }
}
