//! The mistral.rs backend: text models from a local directory (safetensors
//! with `config.json`, tokenizer and chat template) or a GGUF file, on CPU
//! (or CUDA with the `cuda` feature).
//!
//! Facts of mistral.rs 0.8.1 this code relies on (read in its sources):
//! - A request is only abortable in streaming mode (dropping the receiver
//!   cancels the sequence at the next token), so every request streams
//!   internally; dropping the future returned by `generate` stops the model.
//! - There is no per-request seed (one RNG per engine, seeded with 0), so
//!   sampling with a temperature is done by a per-request logits processor
//!   with its own seeded RNG; the engine then takes the only token left.
//! - A `None` temperature means 1.0 inside the engine: greedy needs `Some(0.0)`.
//! - `max_len = Some(0)` still yields one token: 0 is answered here.
//! - Stop strings are noticed one token late in streaming mode, so text is
//!   held back and cut here.
//! - The engine's response channel has capacity 1 and a slow reader stalls
//!   the whole engine: responses are drained at once.
//! - An engine whose thread panicked (its KV cache does under mixed-length
//!   batches, see [`super::cohort`]) closes the response channels of the
//!   requests it held, and `get_sender` starts a new engine for the next
//!   request: those requests fail retryably and are run again (unless text
//!   already reached a streaming caller: then the failure is final).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, Model, ModelDType, NormalRequest, Request, RequestLike,
    RequestMessage, Response, SamplingParams, StopTokens, Tensor, TextMessageRole, TextMessages, TextModelBuilder,
    TokenSource,
};
use retro_fleet_schemas::{ErrorCode, InferRequest, Input, Usage};
use tokio::sync::mpsc;

use super::{Backend, BackendError, DeltaSender, Generation};

/// How to load one mistral.rs model.
#[derive(Debug, Clone)]
pub struct MistralSpec {
    /// Directory with `config.json`, `tokenizer.json`, `tokenizer_config.json`
    /// and safetensors weights; or a directory holding `gguf_file`.
    pub path: PathBuf,
    /// GGUF file name inside `path`, for quantized models.
    pub gguf_file: Option<String>,
    /// In-situ quantization, e.g. `q4k` or `q8_0` (safetensors models only).
    pub isq: Option<String>,
    /// Sequences the engine batches together.
    pub max_num_seqs: usize,
    /// How requests enter the engine.
    pub admission: super::cohort::Admission,
    /// With cohort admission: how long a request finding the engine idle
    /// waits for companions.
    pub gather: std::time::Duration,
    /// `max_tokens` when a request sets none.
    pub default_max_tokens: u32,
    /// Revision reported in results; default: a hash of the model files.
    pub revision: Option<String>,
}

fn backend_err(message: impl Into<String>) -> BackendError {
    BackendError { code: ErrorCode::BackendError, message: message.into(), retryable: true }
}

/// A loaded mistral.rs model.
pub struct Mistral {
    model: Model,
    /// Cohort admission (none: continuous).
    gate: Option<Arc<super::cohort::Gate>>,
    revision: String,
    default_max_tokens: u32,
}

impl Mistral {
    /// Loads the model described by `spec`; `waiting` counts requests
    /// queued for its engine (cohort admission).
    pub async fn load(spec: &MistralSpec, waiting: Option<prometheus::IntGauge>) -> Result<Mistral, BackendError> {
        let (dir, token) = match crate::hub::resolve(&spec.path) {
            Ok(crate::hub::ModelSource::Local(p)) => (p.to_string_lossy().to_string(), TokenSource::None),
            Ok(crate::hub::ModelSource::Hub(id)) => {
                tracing::info!(model = %id, "fetching from the Hugging Face hub (HF_TOKEN used if set)");
                (id, TokenSource::CacheToken)
            }
            Err(message) => return Err(BackendError { code: ErrorCode::Internal, message, retryable: false }),
        };
        let model = match &spec.gguf_file {
            Some(file) => {
                GgufModelBuilder::new(&dir, vec![file.clone()])
                    .with_force_cpu_if_no_cuda()
                    .with_token_source(token.clone())
                    .with_max_num_seqs(spec.max_num_seqs)
                    .build()
                    .await
            }
            None => {
                let mut b = TextModelBuilder::new(&dir)
                    .with_force_cpu_if_no_cuda()
                    .with_dtype(ModelDType::F32)
                    .with_token_source(token.clone())
                    .with_max_num_seqs(spec.max_num_seqs);
                if let Some(isq) = &spec.isq {
                    let t = mistralrs::parse_isq_value(isq, None).map_err(|e| BackendError {
                        code: ErrorCode::Internal,
                        message: format!("isq `{isq}`: {e}"),
                        retryable: false,
                    })?;
                    b = b.with_isq(t);
                }
                b.build().await
            }
        }
        .map_err(|e| BackendError {
            code: ErrorCode::Internal,
            message: format!("loading {dir}: {e}"),
            retryable: false,
        })?;
        let revision = match &spec.revision {
            Some(r) => r.clone(),
            None if Path::new(&dir).exists() => {
                files_revision(Path::new(&dir)).map_err(|e| backend_err(format!("hashing {dir}: {e}")))?
            }
            None => format!("hub:{dir}"),
        };
        let gate = (spec.admission == super::cohort::Admission::Cohort)
            .then(|| super::cohort::Gate::new(spec.max_num_seqs, spec.gather, waiting));
        Ok(Mistral { model, gate, revision, default_max_tokens: spec.default_max_tokens })
    }
}

/// How a model's instances are pooled (see [`super::pool`]).
#[derive(Clone)]
pub struct Pooling {
    /// Most instances.
    pub max: usize,
    /// Instances loaded at start.
    pub warm: usize,
    /// Requests in flight per instance before the pool grows.
    pub grow_at: usize,
    /// Idle time after which an instance is unloaded.
    pub idle_unload: Option<std::time::Duration>,
    /// Routing.
    pub balance: super::pool::Balance,
    /// The worker's memory budget.
    pub budget: Arc<super::pool::Budget>,
}

/// Bytes of the weight files under `path` (the budget's estimate of an instance).
fn weight_bytes(path: &Path) -> u64 {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path).into_iter().flatten().flatten().map(|e| e.path()).collect()
    } else {
        vec![path.to_path_buf()]
    };
    files
        .iter()
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("safetensors" | "gguf")))
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// The pool of `spec`'s instances.
pub async fn load_instances(
    name: &str,
    spec: &MistralSpec,
    pooling: &Pooling,
    breakers: &crate::breaker::Board,
) -> Result<Arc<dyn Backend>, BackendError> {
    let (revision, bytes) = match crate::hub::resolve(&spec.path) {
        Ok(crate::hub::ModelSource::Local(dir)) => {
            let rev = match &spec.revision {
                Some(r) => Some(r.clone()),
                None => Some(files_revision(&dir).map_err(|e| backend_err(format!("hashing {}: {e}", dir.display())))?),
            };
            (rev, weight_bytes(&dir))
        }
        _ => (spec.revision.clone(), 0),
    };
    let owned = spec.clone();
    let waiting = pooling.budget.waiting_gauge(name);
    let loader: super::pool::Loader = Arc::new(move || {
        let (spec, waiting) = (owned.clone(), waiting.clone());
        Box::pin(async move { Ok(Arc::new(Mistral::load(&spec, waiting).await?) as Arc<dyn Backend>) })
    });
    let pool_spec = super::pool::PoolSpec {
        max: pooling.max,
        warm: pooling.warm,
        grow_at: pooling.grow_at,
        idle_unload: pooling.idle_unload,
        probe_after: std::time::Duration::from_secs(60),
        balance: pooling.balance,
        bytes,
        revision,
    };
    let pool =
        super::pool::Pool::build(name, pool_spec, loader, pooling.budget.clone(), |i, b| breakers.guard(name, i, b))
            .await?;
    tracing::info!(model = name, path = %spec.path.display(), "model ready");
    Ok(pool)
}

/// The base model plus one instance set per LoRA adapter, each merged into
/// a copy of the weights (see [`crate::lora`]); requests go to the instance
/// of the adapter they name.
pub async fn with_adapters(
    name: &str,
    spec: &MistralSpec,
    base: Arc<dyn Backend>,
    adapters: &std::collections::BTreeMap<String, PathBuf>,
    pooling: &Pooling,
    breakers: &crate::breaker::Board,
) -> Result<Adapted, BackendError> {
    let fail = |message: String| BackendError { code: ErrorCode::Internal, message, retryable: false };
    if spec.gguf_file.is_some() {
        return Err(fail(format!("model `{name}`: LoRA adapters need safetensors weights, not GGUF")));
    }
    let base_rev = base.revision().unwrap_or_default();
    let mut loaded = std::collections::BTreeMap::new();
    let mut revisions = vec![base_rev.clone()];
    for (adapter, dir) in adapters {
        let rev = files_revision(dir).map_err(|e| fail(format!("adapter `{adapter}` at {}: {e}", dir.display())))?;
        let tag = rev.trim_start_matches("fnv1a64:").to_string();
        let base_tag =
            base_rev.trim_start_matches("fnv1a64:").chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>();
        let merged = std::env::temp_dir().join("retro-fleet-lora").join(format!("{name}-{adapter}-{base_tag}-{tag}"));
        if !merged.exists() {
            let base_dir = match crate::hub::resolve(&spec.path).map_err(fail)? {
                crate::hub::ModelSource::Local(p) => p,
                crate::hub::ModelSource::Hub(id) => {
                    return Err(fail(format!(
                        "adapters of `{name}` need the files of `{id}` in the Hugging Face cache"
                    )))
                }
            };
            let (adapter_dir, out) = (dir.clone(), merged.clone());
            tokio::task::spawn_blocking(move || crate::lora::merge(&base_dir, &adapter_dir, &out))
                .await
                .map_err(|e| fail(format!("merging adapter `{adapter}`: {e}")))?
                .map_err(|e| fail(format!("adapter `{adapter}` of model `{name}`: {e}")))?;
        }
        let adapted =
            MistralSpec { path: merged, revision: Some(format!("{base_rev}+{adapter}:{tag}")), ..spec.clone() };
        loaded
            .insert(adapter.clone(), load_instances(&format!("{name}+{adapter}"), &adapted, pooling, breakers).await?);
        revisions.push(format!("{adapter}:{tag}"));
    }
    Ok(Adapted { base, adapters: loaded, revision: revisions.join("+") })
}

/// A model with LoRA adapters: the base and one backend per adapter.
pub struct Adapted {
    base: Arc<dyn Backend>,
    adapters: std::collections::BTreeMap<String, Arc<dyn Backend>>,
    /// Base revision and every adapter's file hash: any change is a new revision.
    revision: String,
}

impl Backend for Adapted {
    fn revision(&self) -> Option<String> {
        Some(self.revision.clone())
    }

    fn adapters(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    fn generate<'a>(
        &'a self,
        req: &'a InferRequest,
        deltas: Option<DeltaSender>,
    ) -> BoxFuture<'a, Result<Generation, BackendError>> {
        match req.adapter.as_deref() {
            None => self.base.generate(req, deltas),
            Some(a) => match self.adapters.get(a) {
                Some(b) => b.generate(req, deltas),
                None => {
                    let message = format!("no adapter `{a}`; adapters: {}", self.adapters().join(", "));
                    Box::pin(
                        async move { Err(BackendError { code: ErrorCode::InvalidRequest, message, retryable: false }) },
                    )
                }
            },
        }
    }
}

trait ForceCpu {
    fn with_force_cpu_if_no_cuda(self) -> Self;
}

impl ForceCpu for TextModelBuilder {
    fn with_force_cpu_if_no_cuda(self) -> Self {
        if cfg!(feature = "cuda") {
            self
        } else {
            self.with_force_cpu()
        }
    }
}

impl ForceCpu for GgufModelBuilder {
    fn with_force_cpu_if_no_cuda(self) -> Self {
        if cfg!(feature = "cuda") {
            self
        } else {
            self.with_force_cpu()
        }
    }
}

/// `fnv1a64:<hex>` over the small files of a model directory in full and,
/// for weight files, their size and first and last MiB (hashing gigabytes at
/// every start would cost seconds; a changed weight file changes its size or
/// its header in practice). Stable across platforms and Rust versions.
pub fn files_revision(dir: &Path) -> std::io::Result<String> {
    const FNV_OFFSET: u64 = 0xcbf29ce484222325;
    const FNV_PRIME: u64 = 0x100000001b3;
    let mut h = FNV_OFFSET;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(FNV_PRIME);
        }
    };
    let mut names: Vec<PathBuf> = if dir.is_dir() {
        std::fs::read_dir(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect()
    } else {
        vec![dir.to_path_buf()]
    };
    names.sort();
    for path in names {
        let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        feed(name.as_bytes());
        let len = std::fs::metadata(&path)?.len();
        feed(&len.to_le_bytes());
        if len <= 4 << 20 {
            feed(&std::fs::read(&path)?);
        } else {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open(&path)?;
            let mut buf = vec![0u8; 1 << 20];
            f.read_exact(&mut buf)?;
            feed(&buf);
            f.seek(SeekFrom::End(-(1 << 20)))?;
            f.read_exact(&mut buf)?;
            feed(&buf);
        }
    }
    Ok(format!("fnv1a64:{h:016x}"))
}

impl Backend for Mistral {
    fn revision(&self) -> Option<String> {
        Some(self.revision.clone())
    }

    fn generate<'a>(
        &'a self,
        req: &'a InferRequest,
        deltas: Option<DeltaSender>,
    ) -> BoxFuture<'a, Result<Generation, BackendError>> {
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
            let out = generate(&self.model, prompt, &params, deltas).await?;
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

enum Prompt<'a> {
    Chat(&'a [(String, String)]),
    Completion(&'a str),
}

#[derive(Clone, Debug, Default)]
struct Params {
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    seed: Option<u64>,
    stop: Vec<String>,
}

struct Output {
    text: String,
    finish_reason: String,
    prompt_tokens: usize,
    completion_tokens: usize,
}

/// Per-request logits processor. It counts prompt and completion tokens
/// (streamed completion chunks carry no usage) and does seeded sampling:
/// it picks the token with its own RNG and masks every other one, and the
/// engine, asked for temperature 0, takes the only token left.
struct Meter {
    prompt_len: AtomicUsize,
    sampled: AtomicUsize,
    sampling: Option<(f64, Option<usize>, Option<f64>)>, // (temperature, top_k, top_p) when not greedy
    rng: Mutex<u64>,
}

impl Meter {
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
        }
        let Some((t, top_k, top_p)) = self.sampling else { return Ok(logits.clone()) };
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
        let mut out = vec![f32::MIN; v.len()];
        out[pick] = 0.0;
        Tensor::from_vec(out, v.len(), logits.device())
    }
}

/// Runs one request in streaming mode (the only abortable one: dropping
/// the receiver cancels the sequence), forwarding text to `deltas` as it
/// arrives and cutting it at stop strings.
async fn generate(
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
    let greedy = p.temperature.is_none_or(|t| t <= 0.0);
    let meter = Arc::new(Meter {
        prompt_len: AtomicUsize::new(0),
        sampled: AtomicUsize::new(0),
        sampling: (!greedy).then(|| (p.temperature.unwrap(), p.top_k.map(|k| k as usize), p.top_p)),
        rng: Mutex::new(p.seed.unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
        })),
    });
    let stops: Vec<String> = p.stop.iter().filter(|s| !s.is_empty()).cloned().collect();

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
    };

    // SamplingParams directly, not RequestBuilder: its set_deterministic_sampler()
    // replaces every field, max_len included. Temperature must be Some(0.0):
    // None means 1.0 in the engine.
    let sampling_params = SamplingParams {
        temperature: Some(0.0),
        max_len: p.max_tokens.map(|m| m as usize),
        stop_toks: (!stops.is_empty()).then(|| StopTokens::Seqs(stops.clone())),
        ..SamplingParams::neutral()
    };

    let (tx, mut rx) = mpsc::channel::<Response>(1);
    let runner = model.inner();
    let req = Request::Normal(Box::new(NormalRequest {
        messages,
        sampling_params,
        response: tx,
        return_logprobs: false,
        is_streaming: true,
        id: runner.next_request_id(),
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
    let sender = runner.get_sender(None).map_err(|e| backend_err(format!("mistral.rs engine: {e}")))?;
    sender.send(req).await.map_err(|_| backend_err("mistral.rs engine stopped"))?;

    // In streaming mode the engine sends the stop string (and one more
    // token) before it notices it: hold back a possible prefix and cut here.
    let max_stop = stops.iter().map(|s| s.len()).max().unwrap_or(0);
    let (mut text, mut emitted, mut stopped) = (String::new(), 0usize, false);
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
            return Err(failed("the mistral.rs engine stopped before the answer was complete".into(), emitted));
        };
        let (piece, fr) = match resp {
            // chat streaming chunk
            Response::Chunk(c) => {
                let ch = c.choices.into_iter().next();
                (
                    ch.as_ref().and_then(|c| c.delta.content.clone()).unwrap_or_default(),
                    ch.and_then(|c| c.finish_reason),
                )
            }
            // completion streaming chunk
            Response::CompletionChunk(c) => {
                let ch = c.choices.into_iter().next();
                (ch.as_ref().map(|c| c.text.clone()).unwrap_or_default(), ch.and_then(|c| c.finish_reason))
            }
            Response::ValidationError(e) => {
                return Err(BackendError { code: ErrorCode::InvalidRequest, message: format!("{e}"), retryable: false })
            }
            Response::InternalError(e) => return Err(failed(format!("mistral.rs: {e}"), emitted)),
            Response::ModelError(m, _) | Response::CompletionModelError(m, _) => {
                return Err(failed(format!("mistral.rs model error: {m}"), emitted))
            }
            _ => return Err(failed("unexpected mistral.rs response".into(), emitted)),
        };
        if !stopped {
            let from = text.len().saturating_sub(max_stop.saturating_sub(1));
            text.push_str(&piece);
            let from = (0..=from).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
            if let Some(pos) = stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| i + from)).min() {
                text.truncate(pos);
                stopped = true;
            }
            let safe = if stopped { text.len() } else { safe_prefix_len(&text, &stops) };
            if safe > emitted {
                if let Some(d) = &deltas {
                    let _ = d.send(text[emitted..safe].to_string());
                }
                emitted = safe;
            }
        }
        if let Some(fr) = fr {
            break if stopped { "stop".to_string() } else { fr };
        }
    };
    if emitted < text.len() {
        if let Some(d) = &deltas {
            let _ = d.send(text[emitted..].to_string());
        }
    }
    Ok(Output {
        text,
        finish_reason,
        prompt_tokens: meter.prompt_len.load(Ordering::SeqCst),
        completion_tokens: meter.sampled.load(Ordering::SeqCst),
    })
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
