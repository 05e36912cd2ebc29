//! The inference request.

use std::borrow::Cow;
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::result::ErrorCode;
use crate::tools::{self, Tool, ToolCall, ToolChoice, ToolMode, ToolPlan, MAX_TOOLS};

/// An inference request, published to `fleet.req.<priority>.<model>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    /// Schema version of this message.
    #[serde(default = "crate::version::default_version")]
    pub v: u32,
    /// Request id (a ULID when the ingress makes it). Also the `Nats-Msg-Id`,
    /// so a re-published request is deduplicated by JetStream.
    pub id: String,
    /// Model name, as configured in the fleet.
    pub model: String,
    /// LoRA adapter of the model to apply, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// The prompt: chat messages or plain completion text; or, for an
    /// embedding model, the texts to embed.
    pub input: Input,
    /// Sampling parameters.
    #[serde(default)]
    pub params: SamplingParams,
    /// Stream token deltas to the reply subject before the final result.
    #[serde(default)]
    pub stream: bool,
    /// How the result cache may be used for this request.
    #[serde(default)]
    pub cache: CacheMode,
    /// Tenant the request belongs to; `Fleet-Tenant` header wins when both are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Free-form caller metadata, echoed nowhere and never interpreted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// The prompt of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Input {
    /// A conversation rendered with the model's chat template.
    Chat {
        /// Messages in order.
        messages: Vec<ChatMessage>,
    },
    /// Plain text completion.
    Completion {
        /// The text to continue.
        prompt: String,
    },
    /// Texts to embed, by a model of kind `embedding`: the result's
    /// `output.embeddings` holds one vector per text, in order. All texts
    /// are embedded as one batch.
    Embed {
        /// The texts (at least one).
        texts: Vec<String>,
        /// Numbers per vector the caller needs; refused unless it is the
        /// model's own (no model here shortens its vectors).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dimensions: Option<u32>,
    },
}

impl InferRequest {
    /// Bytes of caller text the limits count: the prompt's (see
    /// [`Input::text_len`]), the constraint's and the tools'.
    pub fn counted_len(&self) -> usize {
        self.input.text_len() + self.params.shaping_len()
    }
}

impl Input {
    /// Bytes of text the prompt carries: every message's role and content,
    /// or the prompt. What the size limit and token estimates count.
    pub fn text_len(&self) -> usize {
        match self {
            // the role reaches the model too (the chat template writes it)
            Input::Chat { messages } => messages.iter().map(ChatMessage::text_len).sum(),
            Input::Completion { prompt } => prompt.len(),
            Input::Embed { texts, .. } => texts.iter().map(String::len).sum(),
        }
    }

    /// Whether these are texts to embed rather than a prompt to answer.
    pub fn is_embed(&self) -> bool {
        matches!(self, Input::Embed { .. })
    }
}

/// Most texts one request may embed (OpenAI's limit).
pub const MAX_EMBED_TEXTS: usize = 2048;

/// The roles a chat message may have: the ones chat templates know.
pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`: the roles chat templates
    /// know. Any other is refused (a template would write it into the
    /// prompt verbatim).
    #[schemars(extend("enum" = CHAT_ROLES))]
    pub role: String,
    /// Message text (`""` for an assistant turn that only called tools).
    pub content: String,
    /// The calls an `assistant` turn made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with text only.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into(), tool_calls: Vec::new(), tool_call_id: None }
    }

    /// Bytes of caller text the message carries (what limits count).
    pub fn text_len(&self) -> usize {
        self.role.len()
            + self.content.len()
            + self.tool_calls.iter().map(ToolCall::len).sum::<usize>()
            + self.tool_call_id.as_ref().map_or(0, String::len)
    }
}

/// Sampling parameters; absent fields take the model's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SamplingParams {
    /// Most tokens to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Temperature; 0 means greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 2.0))]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass, in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0.0))]
    pub top_p: Option<f64>,
    /// Top-k sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Random seed; with a seed, sampling is reproducible.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Subtracted from a token's logit once per time it already appears in
    /// the completion, within -2..=2 (OpenAI's `frequency_penalty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub frequency_penalty: Option<f64>,
    /// Subtracted once from the logit of every token already in the
    /// completion, within -2..=2 (OpenAI's `presence_penalty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -2.0, max = 2.0))]
    pub presence_penalty: Option<f64>,
    /// Added to the logits of these token ids before sampling, each within
    /// -100..=100; -100 bans a token, 100 all but forces it (OpenAI's
    /// `logit_bias`; JSON keys are the ids as strings).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub logit_bias: BTreeMap<u32, f64>,
    /// When sampling, drops tokens less likely than `min_p` times the
    /// likeliest one, within [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_p: Option<f64>,
    /// What the output must match: a JSON Schema, a regular expression or a
    /// Lark grammar, enforced token by token while decoding (OpenAI's
    /// `response_format` maps onto it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraint: Option<Constraint>,
    /// Functions the model may call (OpenAI's `tools`); chat requests only.
    /// The model's chat template shows them to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    /// `none`, `auto` (the default with tools), `required`, or
    /// `{"type": "function", "function": {"name": ...}}`. A required or
    /// named call is decoded under the functions' parameter schemas, and
    /// the result carries `output.tool_calls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// With `tool_choice: required`, `false` allows one call only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// Return each generated token's log probability (OpenAI's
    /// `logprobs`), in `output.logprobs`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logprobs: bool,
    /// With `logprobs`, also the likeliest tokens at each position, 0..=20
    /// of them (OpenAI's `top_logprobs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 20))]
    pub top_logprobs: Option<u32>,
}

/// A grammar the output is decoded under: every token the model may pick
/// keeps the output a prefix of a match, and it ends when the match is
/// complete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Constraint {
    /// JSON that validates against `schema` (`{"type": "object"}` for any
    /// object). Written compactly unless the schema's `x-guidance` says
    /// otherwise.
    JsonSchema {
        /// The JSON Schema.
        schema: serde_json::Value,
    },
    /// Text that matches a regular expression, whole.
    Regex {
        /// The expression (Rust `regex` syntax).
        pattern: String,
    },
    /// Text in the language of a Lark grammar (llguidance's dialect).
    Lark {
        /// The grammar, starting at `start`.
        grammar: String,
    },
}

impl Constraint {
    /// Bytes the constraint's text takes (counted like prompt text).
    pub fn len(&self) -> usize {
        match self {
            Constraint::JsonSchema { schema } => schema.to_string().len(),
            Constraint::Regex { pattern } => pattern.len(),
            Constraint::Lark { grammar } => grammar.len(),
        }
    }

    /// Whether the constraint has no text (never true of a usable one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request field a backend may be unable to honour, by its name in the
/// native API and in the OpenAI API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Dotted path in a native request (`params.constraint`).
    pub native: &'static str,
    /// The OpenAI request field that sets it (`response_format`).
    pub openai: &'static str,
}

impl SamplingParams {
    /// The first field set here that changes how tokens are picked beyond
    /// temperature, top-p, top-k, seed, stops and length: what a backend
    /// without a real sampler (echo, synthetic) cannot honour.
    pub fn beyond_basic(&self) -> Option<Field> {
        let field = |native, openai| Some(Field { native, openai });
        if !self.tools.is_empty() {
            field("params.tools", "tools")
        } else if self.constraint.is_some() {
            field("params.constraint", "response_format")
        } else if self.frequency_penalty.is_some_and(|v| v != 0.0) {
            field("params.frequency_penalty", "frequency_penalty")
        } else if self.presence_penalty.is_some_and(|v| v != 0.0) {
            field("params.presence_penalty", "presence_penalty")
        } else if !self.logit_bias.is_empty() {
            field("params.logit_bias", "logit_bias")
        } else if self.min_p.is_some_and(|v| v != 0.0) {
            field("params.min_p", "min_p")
        } else if self.logprobs {
            field("params.logprobs", "logprobs")
        } else {
            None
        }
    }
}

/// Cache policy of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Read and write the cache.
    #[default]
    Use,
    /// Neither read nor write.
    Bypass,
    /// Recompute and overwrite.
    Refresh,
    /// Like `use`, and also accept the answer to a similar prompt (nearest
    /// neighbour above the model's similarity threshold) where the worker
    /// enables the semantic cache for the model.
    Semantic,
}

/// A request that decoded but cannot be served as asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    /// Stable code of the problem.
    pub code: ErrorCode,
    /// The field at fault (dotted path, as in the JSON body), when one is.
    pub field: Option<&'static str>,
    /// What is wrong and what to do.
    pub message: String,
}

impl Invalid {
    fn new(code: ErrorCode, field: Option<&'static str>, message: impl Into<String>) -> Self {
        Invalid { code, field, message: message.into() }
    }

    fn field(field: &'static str, message: impl Into<String>) -> Self {
        Invalid::new(ErrorCode::InvalidRequest, Some(field), message)
    }
}

/// Longest request id accepted.
pub const MAX_ID_LEN: usize = 128;

impl InferRequest {
    /// Checks the fields a worker relies on; `max_prompt_bytes` bounds the input text.
    pub fn validate(&self, max_prompt_bytes: usize) -> Result<(), Invalid> {
        if self.v > crate::version::SCHEMA_VERSION {
            return Err(Invalid::new(
                ErrorCode::InvalidRequest,
                None,
                format!("schema version {} is newer than this worker's {}", self.v, crate::version::SCHEMA_VERSION),
            ));
        }
        if self.id.is_empty() || self.id.len() > MAX_ID_LEN || !crate::subjects::is_token(&self.id) {
            return Err(Invalid::field("id", "`id` must be 1-128 characters from [A-Za-z0-9_-]"));
        }
        if !crate::subjects::is_token(&self.model) {
            return Err(Invalid::field("model", "`model` must be characters from [A-Za-z0-9_-]"));
        }
        if let Some(t) = &self.tenant {
            if !crate::subjects::is_token(t) {
                return Err(Invalid::field("tenant", "`tenant` must be characters from [A-Za-z0-9_-]"));
            }
        }
        if let Input::Embed { texts, .. } = &self.input {
            if texts.is_empty() || texts.len() > MAX_EMBED_TEXTS {
                return Err(Invalid::field(
                    "input.texts",
                    format!("send 1 to {MAX_EMBED_TEXTS} texts to embed, not {}", texts.len()),
                ));
            }
            if let Some(i) = texts.iter().position(String::is_empty) {
                return Err(Invalid::field(
                    "input.texts",
                    format!("text {i} is empty; every text to embed needs some"),
                ));
            }
            if self.stream {
                return Err(Invalid::field("stream", "embeddings come whole: send `stream: false`"));
            }
        }
        if let Input::Chat { messages } = &self.input {
            if messages.is_empty() {
                return Err(Invalid::field("input.messages", "`input.messages` must not be empty"));
            }
            if let Some((i, m)) = messages.iter().enumerate().find(|(_, m)| !CHAT_ROLES.contains(&m.role.as_str())) {
                let shown: String = m.role.chars().take(40).collect();
                return Err(Invalid::field(
                    "input.messages.role",
                    format!("message {i} has role `{shown}`; a role is one of {}", CHAT_ROLES.join(", ")),
                ));
            }
            if let Some(i) = messages.iter().position(|m| !m.tool_calls.is_empty() && m.role != "assistant") {
                return Err(Invalid::field(
                    "input.messages.tool_calls",
                    format!("message {i} has `tool_calls`; only an `assistant` message calls tools"),
                ));
            }
            if let Some(i) = messages.iter().position(|m| m.tool_call_id.is_some() && m.role != "tool") {
                return Err(Invalid::field(
                    "input.messages.tool_call_id",
                    format!("message {i} has `tool_call_id`; only a `tool` message answers a call"),
                ));
            }
        } else if !self.params.tools.is_empty() {
            return Err(Invalid::field("params.tools", "`params.tools` needs chat input (`input.messages`)"));
        }
        let len = self.counted_len();
        if len > max_prompt_bytes {
            // the constraint's and tools' bytes count too: name them when
            // they tip the scale
            let text = self.input.text_len();
            let field = match (text > max_prompt_bytes, self.params.tools.is_empty()) {
                (true, _) => "input",
                (false, true) => "params.constraint",
                (false, false) => "params.tools",
            };
            let of = match len - text {
                0 => String::new(),
                n => format!(" ({n} of them the constraint's and tools')"),
            };
            return Err(Invalid::new(
                ErrorCode::PromptTooLarge,
                Some(field),
                format!("prompt is {len} bytes{of}; the limit is {max_prompt_bytes}"),
            ));
        }
        if let Some(t) = self.params.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(Invalid::field("params.temperature", "`params.temperature` must be within 0..=2"));
            }
        }
        if let Some(p) = self.params.top_p {
            if !(0.0..=1.0).contains(&p) || p == 0.0 {
                return Err(Invalid::field("params.top_p", "`params.top_p` must be within (0, 1]"));
            }
        }
        self.params.validate_extras()
    }
}

impl SamplingParams {
    /// How the answer is decoded, given the tools and the tool choice
    /// (see [`crate::tools`]).
    pub fn tool_plan(&self) -> ToolPlan<'_> {
        tools::plan(&self.tools, self.tool_choice.as_ref())
    }

    /// The grammar the answer is decoded under: the request's constraint,
    /// or the one a forced or required tool call makes.
    pub fn answer_constraint(&self) -> Option<Cow<'_, Constraint>> {
        if let Some(c) = &self.constraint {
            return Some(Cow::Borrowed(c));
        }
        let schema = tools::schema(self.tool_plan(), &self.tools, self.parallel_tool_calls)?;
        Some(Cow::Owned(Constraint::JsonSchema { schema }))
    }

    /// The calls a decoded answer `text` to request `id` makes, when its
    /// tool choice forced them (see [`tools::calls`]).
    pub fn tool_calls(&self, id: &str, text: &str) -> Option<Vec<ToolCall>> {
        tools::calls(self.tool_plan(), id, text)
    }

    /// Bytes of caller text beyond the prompt: the constraint's and the
    /// tools' (each as JSON).
    pub fn shaping_len(&self) -> usize {
        self.constraint.as_ref().map_or(0, Constraint::len)
            + self.tools.iter().map(|t| serde_json::to_vec(t).map_or(0, |v| v.len())).sum::<usize>()
    }

    fn validate_tools(&self) -> Result<(), Invalid> {
        let field = "params.tools";
        if self.tools.len() > MAX_TOOLS {
            return Err(Invalid::field(field, format!("{} tools; at most {MAX_TOOLS}", self.tools.len())));
        }
        for (i, t) in self.tools.iter().enumerate() {
            let f = &t.function;
            if f.name.is_empty() || f.name.len() > 64 || !crate::subjects::is_token(&f.name) {
                let shown: String = f.name.chars().take(40).collect();
                return Err(Invalid::field(
                    field,
                    format!("tool {i} is named `{shown}`; a name is 1-64 characters from [A-Za-z0-9_-]"),
                ));
            }
            if self.tools[..i].iter().any(|o| o.function.name == f.name) {
                return Err(Invalid::field(field, format!("two tools are named `{}`", f.name)));
            }
            if f.parameters.as_ref().is_some_and(|p| !p.is_object()) {
                return Err(Invalid::field(
                    field,
                    format!("`parameters` of tool `{}` must be a JSON Schema object", f.name),
                ));
            }
        }
        let choice = "params.tool_choice";
        match (&self.tool_choice, self.tool_plan()) {
            (Some(ToolChoice::Named(n)), ToolPlan::Text) => {
                let shown: String = n.function.name.chars().take(40).collect();
                Err(Invalid::field(choice, format!("`tool_choice` names `{shown}`, which is not among `tools`")))
            }
            (Some(ToolChoice::Mode(ToolMode::Required)), ToolPlan::Text) => {
                Err(Invalid::field(choice, "`tool_choice: required` needs `tools`"))
            }
            (_, ToolPlan::Forced(_) | ToolPlan::Required) if self.constraint.is_some() => Err(Invalid::field(
                choice,
                "a required or named `tool_choice` decodes the answer under the tools' schemas; \
                 it cannot be combined with `params.constraint` (OpenAI `response_format`)",
            )),
            _ => Ok(()),
        }
    }
}

/// Most alternatives `params.top_logprobs` may ask for (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Most log-probability entries one answer may carry, picks and their
/// alternatives together: about 50 bytes each, so a result stays well
/// inside NATS's smallest default message size (1 MiB).
pub const MAX_LOGPROB_ENTRIES: u32 = 8192;

impl SamplingParams {
    /// Whether the log probabilities of `max_tokens` tokens fit in one
    /// result ([`MAX_LOGPROB_ENTRIES`]).
    pub fn check_logprob_entries(&self, max_tokens: u32) -> Result<(), Invalid> {
        let per_token = 1 + self.top_logprobs.unwrap_or(0);
        if !self.logprobs || max_tokens.saturating_mul(per_token) <= MAX_LOGPROB_ENTRIES {
            return Ok(());
        }
        Err(Invalid::field(
            "params.top_logprobs",
            format!(
                "`params.top_logprobs`: {max_tokens} tokens with {} alternatives each make {} log-probability \
                 entries; one answer carries at most {MAX_LOGPROB_ENTRIES}: ask for fewer tokens or alternatives",
                per_token - 1,
                max_tokens.saturating_mul(per_token)
            ),
        ))
    }
}

/// Most entries of `params.logit_bias` (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;

impl SamplingParams {
    fn validate_extras(&self) -> Result<(), Invalid> {
        let within = |v: Option<f64>, lo: f64, hi: f64| v.is_none_or(|v| (lo..=hi).contains(&v));
        if !within(self.frequency_penalty, -2.0, 2.0) {
            return Err(Invalid::field("params.frequency_penalty", "`params.frequency_penalty` must be within -2..=2"));
        }
        if !within(self.presence_penalty, -2.0, 2.0) {
            return Err(Invalid::field("params.presence_penalty", "`params.presence_penalty` must be within -2..=2"));
        }
        if !within(self.min_p, 0.0, 1.0) {
            return Err(Invalid::field("params.min_p", "`params.min_p` must be within 0..=1"));
        }
        if self.top_logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(Invalid::field(
                "params.top_logprobs",
                format!("`params.top_logprobs` must be within 0..={MAX_TOP_LOGPROBS}"),
            ));
        }
        if let Some(max_tokens) = self.max_tokens {
            self.check_logprob_entries(max_tokens)?;
        }
        if self.top_logprobs.is_some_and(|n| n > 0) && !self.logprobs {
            return Err(Invalid::field("params.top_logprobs", "`params.top_logprobs` needs `params.logprobs: true`"));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(Invalid::field(
                "params.logit_bias",
                format!("`params.logit_bias` has {} entries; at most {MAX_LOGIT_BIAS}", self.logit_bias.len()),
            ));
        }
        if let Some((t, _)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(*b)) {
            return Err(Invalid::field(
                "params.logit_bias",
                format!("`params.logit_bias` of token {t} must be within -100..=100"),
            ));
        }
        self.validate_tools()?;
        match &self.constraint {
            Some(Constraint::JsonSchema { schema }) if !schema.is_object() => {
                Err(Invalid::field("params.constraint", "`params.constraint.schema` must be a JSON Schema object"))
            }
            Some(c @ (Constraint::Regex { .. } | Constraint::Lark { .. })) if c.is_empty() => {
                Err(Invalid::field("params.constraint", "`params.constraint` must not be empty"))
            }
            _ => Ok(()),
        }
    }
}
