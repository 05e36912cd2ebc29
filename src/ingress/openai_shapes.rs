//! OpenAI's shapes, both ways: chat, completion and embedding bodies into a
//! [`Draft`], results into OpenAI's response objects and stream chunks.
//!
//! Two adapters speak OpenAI: the [`openai`](super::openai) handlers and
//! the lines of a [`batch`](super::batch), which are OpenAI bodies too. The
//! translation lives here, apart from both, so neither imports the other;
//! it is not the submit service's either, whose input is the shape-free
//! [`Draft`].

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use retro_fleet_schemas::tools::{Tool, ToolChoice};
use retro_fleet_schemas::{ChatMessage, Constraint, ErrorCode, InferResult, Input, Priority, SamplingParams, ToolCall};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Asked;
use super::error::{parse_json, ApiError};
use super::submit::Draft;

/// A `stop` given as one string or a list.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// Message content: a string, or a list of parts of which the text parts count.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Message {
    #[schemars(extend("enum" = retro_fleet_schemas::request::CHAT_ROLES))]
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// The calls an assistant turn made.
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
    /// The call a tool message answers.
    #[serde(default)]
    tool_call_id: Option<String>,
    /// A participant's name: accepted without effect.
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// `response_format`: free text, any JSON object, or JSON that validates
/// against a schema.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaFormat },
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct JsonSchemaFormat {
    /// The schema's name (for the caller; not used in decoding).
    #[allow(dead_code)]
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    /// The JSON Schema; absent, any JSON object.
    #[serde(default)]
    schema: Option<Value>,
    /// Accepted either way: the schema is always enforced while decoding.
    #[serde(default)]
    #[allow(dead_code)]
    strict: Option<bool>,
}

impl ResponseFormat {
    fn into_constraint(self) -> Option<Constraint> {
        let any_object = || serde_json::json!({"type": "object"});
        match self {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(Constraint::JsonSchema { schema: any_object() }),
            ResponseFormat::JsonSchema { json_schema } => {
                Some(Constraint::JsonSchema { schema: json_schema.schema.unwrap_or_else(any_object) })
            }
        }
    }
}

/// Fields shared by both endpoints. What each OpenAI field does here, and
/// the fields accepted without effect (`user`, `store`, ...), is the table
/// in docs/INGRESS.md; a field that would change the answer and that is not
/// honoured is refused by [`refuse_unhonoured`], never ignored.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct Common {
    model: String,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    #[schemars(range(min = -2.0, max = 2.0))]
    frequency_penalty: Option<f64>,
    #[serde(default)]
    #[schemars(range(min = -2.0, max = 2.0))]
    presence_penalty: Option<f64>,
    /// Token id (as a string) to a bias within -100..=100.
    #[serde(default)]
    logit_bias: Option<BTreeMap<String, f64>>,
    /// Not OpenAI's, but common among OpenAI-compatible servers.
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    min_p: Option<f64>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
    /// `true` (chat), or a count of alternatives (completions).
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<u32>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<ToolChoice>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    /// The deprecated form of `tools`: refused, naming `tools`.
    #[serde(default)]
    functions: Option<Vec<Value>>,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    suffix: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// The priority class the call runs in (`X-Priority` wins). Read as a
    /// string so a refusal names the field (a flattened struct loses
    /// serde's path).
    #[serde(default)]
    #[schemars(with = "Option<ServiceTier>")]
    service_tier: Option<String>,
    /// Not a field of this API: the tenant is the credential's. Present, it
    /// is refused rather than ignored, so no caller believes it chose one.
    #[serde(default)]
    #[schemars(skip)]
    tenant: Option<serde::de::IgnoredAny>,
}

/// OpenAI's `service_tier`, mapped to this fleet's priority classes.
#[derive(Debug, Clone, Copy, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
enum ServiceTier {
    /// The credential's default: `normal`, or its ceiling when lower.
    Auto,
    /// `normal`.
    Default,
    /// `low`: cheaper, slower, and first to wait when the fleet is busy.
    Flex,
    /// `high`.
    Priority,
}

impl ServiceTier {
    /// The class `tier` asks for (`auto` asks for none); 422 naming
    /// `service_tier` for another value.
    fn asked(tier: &str) -> Result<Option<Asked>, ApiError> {
        let tier: ServiceTier = serde_json::from_value(Value::String(tier.to_string())).map_err(|_| {
            ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "`service_tier` is one of auto, default, flex, priority; not `{}`",
                    tier.chars().take(40).collect::<String>()
                ),
            )
            .param("service_tier")
        })?;
        let class = match tier {
            ServiceTier::Auto => return Ok(None),
            ServiceTier::Default => Priority::Normal,
            ServiceTier::Flex => Priority::Low,
            ServiceTier::Priority => Priority::High,
        };
        Ok(Some((class, "service_tier")))
    }
}

/// Body of `POST /v1/chat/completions`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<Message>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
enum PromptField {
    One(String),
    Many(Vec<String>),
}

/// Body of `POST /v1/completions`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: PromptField,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Which OpenAI object family a call belongs to.
#[derive(Clone, Copy)]
pub enum Kind {
    /// `chat.completion`.
    Chat,
    /// `text_completion`.
    Completion,
}

impl Kind {
    fn id(self, id: &str) -> String {
        match self {
            Kind::Chat => format!("chatcmpl-{id}"),
            Kind::Completion => format!("cmpl-{id}"),
        }
    }
}

fn draft(common: Common, input: Input) -> Result<(Draft, bool), ApiError> {
    if common.tenant.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "`tenant` is not a request field: the tenant is the credential's (or `Fleet-Tenant` with authentication off)",
        )
        .param("tenant"));
    }
    refuse_unhonoured(&common)?;
    // a count, even 0 (completions), asks for the chosen tokens' logprobs
    let (logprobs, top_logprobs) = match &common.logprobs {
        None | Some(Value::Null) | Some(Value::Bool(false)) => (false, common.top_logprobs),
        Some(Value::Bool(true)) => (true, common.top_logprobs),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n <= u32::MAX as u64) => {
            (true, n.as_u64().map(|n| n as u32).filter(|n| *n > 0))
        }
        Some(_) => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "`logprobs` is `true` or `false` (chat), or a count of alternatives (completions)",
            )
            .param("logprobs"))
        }
    };
    let include_usage = common.stream_options.map(|o| o.include_usage).unwrap_or(false);
    let priority = match &common.service_tier {
        Some(tier) => ServiceTier::asked(tier)?,
        None => None,
    };
    let mut logit_bias = BTreeMap::new();
    for (token, bias) in common.logit_bias.unwrap_or_default() {
        let Ok(id) = token.parse::<u32>() else {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!("`logit_bias` keys are token ids; `{}` is not one", token.chars().take(40).collect::<String>()),
            )
            .param("logit_bias"));
        };
        logit_bias.insert(id, bias);
    }
    let params = SamplingParams {
        max_tokens: common.max_completion_tokens.or(common.max_tokens),
        temperature: common.temperature,
        top_p: common.top_p,
        top_k: common.top_k,
        seed: common.seed,
        stop: common.stop.map(Stop::into_vec).unwrap_or_default(),
        frequency_penalty: common.frequency_penalty,
        presence_penalty: common.presence_penalty,
        logit_bias,
        min_p: common.min_p,
        constraint: common.response_format.and_then(ResponseFormat::into_constraint),
        tools: common.tools.unwrap_or_default(),
        tool_choice: common.tool_choice,
        parallel_tool_calls: common.parallel_tool_calls,
        logprobs,
        top_logprobs,
    };
    let draft = Draft {
        model: common.model,
        adapter: None,
        input,
        params,
        stream: common.stream,
        cache: Default::default(),
        metadata: Default::default(),
        id: None,
        timeout_ms: None,
        priority,
        n: common.n,
    };
    Ok((draft, include_usage))
}

/// Refuses, naming it, each field that would change the answer and that
/// this fleet does not honour yet; unset or neutral values pass.
fn refuse_unhonoured(c: &Common) -> Result<(), ApiError> {
    let refused = |field: &'static str, what: &str| {
        Err(ApiError::new(ErrorCode::Unsupported, format!("`{field}` is not supported: {what}")).param(field))
    };
    if c.functions.as_ref().is_some_and(|f| !f.is_empty()) {
        return refused("functions", "send them as `tools` (each `{\"type\": \"function\", \"function\": ...}`)");
    }
    if c.best_of.is_some_and(|n| n > 1) {
        return refused("best_of", "send `best_of: 1`");
    }
    if c.echo == Some(true) {
        return refused("echo", "the answer never repeats the prompt");
    }
    if c.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return refused("suffix", "models here do not fill in the middle");
    }
    Ok(())
}

/// Reads a chat completion body (also a line of a batch).
pub fn chat_draft(body: &[u8]) -> Result<(Draft, bool), ApiError> {
    parse_json::<ChatRequest>(body).and_then(|r| {
        let mut messages = Vec::with_capacity(r.messages.len());
        for m in r.messages {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                        return Err(ApiError::new(
                            ErrorCode::InvalidRequest,
                            format!("content part type `{}` is not supported; send text", p.kind),
                        ));
                    }
                    parts.into_iter().filter_map(|p| p.text).collect::<Vec<_>>().join("")
                }
            };
            messages.push(ChatMessage {
                tool_calls: m.tool_calls.unwrap_or_default(),
                tool_call_id: m.tool_call_id,
                ..ChatMessage::text(m.role, content)
            });
        }
        draft(r.common, Input::Chat { messages })
    })
}

/// Reads a completion body (also a line of a batch).
pub fn completion_draft(body: &[u8]) -> Result<(Draft, bool), ApiError> {
    parse_json::<CompletionRequest>(body).and_then(|r| {
        let prompt = match r.prompt {
            PromptField::One(p) => p,
            PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptField::Many(_) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "send one prompt per request (`prompt` as a string)",
                ))
            }
        };
        draft(r.common, Input::Completion { prompt })
    })
}

/// `input` of an embeddings body, as documented (read as any JSON, so that
/// a token array gets its own refusal).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum EmbeddingInput {
    One(String),
    Many(Vec<String>),
}

/// How vectors are written in the answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EncodingFormat {
    /// Lists of numbers.
    #[default]
    Float,
    /// Each vector's little-endian 32-bit floats, base64-encoded (what the
    /// `openai` clients ask for by default).
    Base64,
}

/// Body of `POST /v1/embeddings`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct EmbeddingRequest {
    model: String,
    /// A text, or a list of 1 to 2048 texts, embedded as one batch.
    #[schemars(with = "EmbeddingInput")]
    input: Value,
    #[serde(default)]
    encoding_format: Option<EncodingFormat>,
    /// Refused unless it is the model's own dimension.
    #[serde(default)]
    dimensions: Option<u32>,
    /// Accepted without effect.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
    /// Refused, as on the other endpoints: the tenant is the credential's.
    #[serde(default)]
    #[schemars(skip)]
    tenant: Option<serde::de::IgnoredAny>,
}

/// Reads an embeddings body: the draft, and how the answer writes vectors.
pub fn embeddings_draft(body: &[u8]) -> Result<(Draft, EncodingFormat), ApiError> {
    let r = parse_json::<EmbeddingRequest>(body)?;
    let invalid = |m: &str| Err(ApiError::new(ErrorCode::InvalidRequest, m.to_string()).param("input"));
    if r.tenant.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidRequest,
            "`tenant` is not a request field: the tenant is the credential's",
        )
        .param("tenant"));
    }
    let texts = match r.input {
        Value::String(s) => vec![s],
        Value::Array(items) if items.iter().all(Value::is_string) => {
            items.into_iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        }
        Value::Array(items) if items.iter().all(|v| v.is_number() || v.is_array()) => {
            return Err(ApiError::new(ErrorCode::Unsupported, "`input` as token ids is not supported: send text")
                .param("input"))
        }
        _ => return invalid("`input` is a string or a list of strings"),
    };
    let draft = Draft {
        model: r.model,
        adapter: None,
        input: Input::Embed { texts, dimensions: r.dimensions },
        params: SamplingParams::default(),
        stream: false,
        cache: Default::default(),
        metadata: Default::default(),
        id: None,
        timeout_ms: None,
        priority: None,
        n: None,
    };
    Ok((draft, r.encoding_format.unwrap_or_default()))
}

/// The `list` of embeddings answering `r`, written as `format` asks.
pub fn embeddings_object(r: &InferResult, format: EncodingFormat) -> Value {
    use base64::Engine as _;
    let vectors = r.output.as_ref().map_or(&[][..], |o| o.embeddings.as_slice());
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = match format {
                EncodingFormat::Float => json!(v),
                EncodingFormat::Base64 => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens = r.usage.as_ref().map_or(0, |u| u.prompt_tokens);
    json!({"object": "list", "data": data, "model": r.model,
           "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
}

/// The `usage` object of a request's results (one per choice), as OpenAI
/// counts it: the prompt once, the completions' tokens summed.
pub fn usage(rs: &[InferResult]) -> Value {
    let of = |r: &InferResult| r.usage.clone().unwrap_or_default();
    let prompt = rs.first().map_or(0, |r| of(r).prompt_tokens);
    let completion: u32 = rs.iter().map(|r| of(r).completion_tokens).sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The non-streaming response object of a request's results, one choice
/// each, in order.
pub fn object(kind: Kind, rs: &[InferResult]) -> Value {
    let first = rs.first().expect("a request has a choice");
    let choices: Vec<Value> = rs.iter().enumerate().map(|(i, r)| choice(kind, i, r)).collect();
    let object = match kind {
        Kind::Chat => "chat.completion",
        Kind::Completion => "text_completion",
    };
    json!({
        "id": kind.id(&first.id), "object": object, "created": now(), "model": first.model,
        "system_fingerprint": first.model_revision, "choices": choices, "usage": usage(rs),
    })
}

/// Choice `index` of a response object: result `r`'s answer.
fn choice(kind: Kind, index: usize, r: &InferResult) -> Value {
    let (text, finish) = r.output.as_ref().map(|o| (o.text.as_str(), o.finish_reason.as_str())).unwrap_or(("", "stop"));
    match kind {
        Kind::Chat => {
            let calls = r.output.as_ref().map_or(&[][..], |o| o.tool_calls.as_slice());
            let mut message = json!({"role": "assistant", "content": text});
            if !calls.is_empty() {
                // OpenAI's: no content beside calls unless the model wrote some
                if text.is_empty() {
                    message["content"] = Value::Null;
                }
                message["tool_calls"] = json!(calls);
            }
            json!({"index": index, "message": message, "logprobs": logprobs(kind, r), "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": index, "text": text, "logprobs": logprobs(kind, r), "finish_reason": finish})
        }
    }
}

/// One streamed chunk object (`chat.completion.chunk` or `text_completion`).
pub fn chunk(kind: Kind, id: &str, model: &str, delta: Option<&str>, finish: Option<&str>, first: bool) -> Value {
    match kind {
        Kind::Chat => {
            let mut d = serde_json::Map::new();
            if let Some(t) = delta {
                d.insert("content".into(), json!(t));
            }
            chat_chunk(id, model, d, finish, first)
        }
        Kind::Completion => json!({"id": kind.id(id), "object": "text_completion", "created": now(), "model": model,
                   "choices": [{"index": 0, "text": delta.unwrap_or(""), "logprobs": null, "finish_reason": finish}]}),
    }
}

/// A `chat.completion.chunk` with `delta` (its role added to the first).
fn chat_chunk(
    id: &str,
    model: &str,
    mut delta: serde_json::Map<String, Value>,
    finish: Option<&str>,
    first: bool,
) -> Value {
    if first {
        delta.insert("role".into(), json!("assistant"));
    }
    json!({"id": Kind::Chat.id(id), "object": "chat.completion.chunk", "created": now(), "model": model,
           "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
}

/// A chat chunk carrying tool calls, whole or in part: `calls` as
/// `(index, id and name when first seen, arguments text)`.
pub fn tool_chunk(id: &str, model: &str, calls: &[(usize, Option<(&str, &str)>, &str)], first: bool) -> Value {
    let calls: Vec<Value> = calls
        .iter()
        .map(|(index, head, arguments)| match head {
            Some((call_id, name)) => json!({"index": index, "id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": arguments}}),
            None => json!({"index": index, "function": {"arguments": arguments}}),
        })
        .collect();
    let mut d = serde_json::Map::new();
    d.insert("tool_calls".into(), Value::Array(calls));
    chat_chunk(id, model, d, None, first)
}

/// A result's log probabilities in OpenAI's shape for `kind` (`null` when
/// the request asked for none): chat's `{"content": [...]}`, or the
/// completions' parallel lists.
pub fn logprobs(kind: Kind, r: &InferResult) -> Value {
    let Some(lps) = r.output.as_ref().and_then(|o| o.logprobs.as_ref()) else { return Value::Null };
    match kind {
        Kind::Chat => json!({"content": lps, "refusal": null}),
        Kind::Completion => {
            let mut offset = 0;
            let offsets: Vec<usize> = lps
                .iter()
                .map(|l| {
                    let at = offset;
                    offset += l.token.len();
                    at
                })
                .collect();
            let top: Vec<Value> = lps
                .iter()
                .map(|l| Value::Object(l.top_logprobs.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect()))
                .collect();
            json!({
                "tokens": lps.iter().map(|l| l.token.as_str()).collect::<Vec<_>>(),
                "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}
