//! Function calling, in OpenAI's shapes: the tools a request offers, which
//! one the model must call, and the calls in a result.
//!
//! One owner for what a tool choice means: [`plan`] says how the answer is
//! decoded, [`schema`] under which grammar (a forced call's arguments under
//! its function's parameters schema), and [`calls`] turns the decoded text
//! into calls. Requests expose them as `SamplingParams::tool_plan`,
//! `answer_constraint` and `tool_calls`; workers apply them, and the
//! ingress reads the same plan to stream.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Most tools a request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;

/// The only kind of tool: a function.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolKind {
    /// A function the caller runs.
    #[default]
    Function,
}

/// A tool the model may call (an entry of OpenAI's `tools`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type", default)]
    pub kind: ToolKind,
    /// The function.
    pub function: Function,
}

/// A function's name, what it does and the JSON Schema of its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Function {
    /// 1-64 characters from `[A-Za-z0-9_-]`, unique among the tools.
    pub name: String,
    /// What the function does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments object; absent, any object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Accepted either way: a forced call's arguments are always decoded
    /// under `parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Whether the model may, must, or must not call a tool, or which one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `none`, `auto` or `required`.
    Mode(ToolMode),
    /// `{"type": "function", "function": {"name": ...}}`: that function.
    Named(NamedTool),
}

/// How freely the model calls tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ToolMode {
    /// It answers in text (the tools are still shown to it).
    None,
    /// It decides, in its own tool-call format (the default with tools).
    Auto,
    /// It calls one or more of the tools, decoded under their schemas.
    Required,
}

/// A tool choice that names one function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NamedTool {
    /// Always `function`.
    #[serde(rename = "type", default)]
    pub kind: ToolKind,
    /// The function to call.
    pub function: FunctionName,
}

/// A function, by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FunctionName {
    /// One of the tools' names.
    pub name: String,
}

/// A call the model made (an entry of OpenAI's `tool_calls`; also what an
/// assistant message of the conversation carries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolCall {
    /// Names the call; a `tool` message answering it carries the same id
    /// as `tool_call_id`.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default)]
    pub kind: ToolKind,
    /// What to call, with what.
    pub function: CalledFunction,
}

/// A function called, with its arguments as JSON text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CalledFunction {
    /// The tool's name.
    pub name: String,
    /// The arguments: a JSON object, as text (cut short when the answer
    /// ran out of tokens).
    pub arguments: String,
}

impl ToolCall {
    /// Bytes of caller text a call in a conversation carries.
    pub fn len(&self) -> usize {
        self.id.len() + self.function.name.len() + self.function.arguments.len()
    }

    /// Whether the call carries no text at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the answer to a request is decoded, as its tools decide.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ToolPlan<'a> {
    /// No tools, or `tool_choice: none`: a text answer.
    Text,
    /// The model may call tools in its own format, which the engine parses.
    Auto,
    /// The answer is the arguments of a call to this function, decoded
    /// under its parameters schema.
    Forced(&'a Function),
    /// The answer is a list of calls, decoded under every tool's schema.
    Required,
}

/// How the answer is decoded, given the `tools` offered and the `choice`.
pub fn plan<'a>(tools: &'a [Tool], choice: Option<&ToolChoice>) -> ToolPlan<'a> {
    if tools.is_empty() {
        return ToolPlan::Text;
    }
    match choice {
        None | Some(ToolChoice::Mode(ToolMode::Auto)) => ToolPlan::Auto,
        Some(ToolChoice::Mode(ToolMode::None)) => ToolPlan::Text,
        Some(ToolChoice::Mode(ToolMode::Required)) => ToolPlan::Required,
        Some(ToolChoice::Named(n)) => tools
            .iter()
            .find(|t| t.function.name == n.function.name)
            .map_or(ToolPlan::Text, |t| ToolPlan::Forced(&t.function)),
    }
}

/// The JSON Schema a plan decodes the answer under: a forced call's
/// arguments, or a list of calls to `tools` (one at most without
/// `parallel` calls); none for a text or `auto` answer.
pub fn schema(plan: ToolPlan<'_>, tools: &[Tool], parallel: Option<bool>) -> Option<Value> {
    match plan {
        ToolPlan::Text | ToolPlan::Auto => None,
        ToolPlan::Forced(f) => Some(arguments_schema(f)),
        ToolPlan::Required => {
            let calls: Vec<Value> = tools
                .iter()
                .map(|t| {
                    json!({"type": "object", "additionalProperties": false, "required": ["name", "arguments"],
                           "properties": {"name": {"const": t.function.name}, "arguments": arguments_schema(&t.function)}})
                })
                .collect();
            let mut list = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
            if parallel == Some(false) {
                list["maxItems"] = json!(1);
            }
            Some(list)
        }
    }
}

/// The calls a decoded answer `text` to request `id` makes, when its plan
/// forced them; `None` when it did not. A list of calls cut short by
/// `max_tokens` gives the calls it completed (`None` if none).
pub fn calls(plan: ToolPlan<'_>, id: &str, text: &str) -> Option<Vec<ToolCall>> {
    match plan {
        ToolPlan::Text | ToolPlan::Auto => None,
        ToolPlan::Forced(f) => Some(vec![call_of(id, 0, &f.name, text.to_string())]),
        ToolPlan::Required => {
            #[derive(Deserialize)]
            struct Decoded {
                name: String,
                arguments: Value,
            }
            let decoded: Vec<Decoded> = serde_json::from_str(text).ok().or_else(|| {
                // a cut list: its complete calls end at a `}` (the last
                // one the list can close after); a call's own arguments
                // hold at most a few hundred of them
                text.rmatch_indices('}')
                    .take(512)
                    .find_map(|(at, _)| serde_json::from_str(&format!("{}]", &text[..=at])).ok())
            })?;
            Some(
                decoded
                    .into_iter()
                    .enumerate()
                    .map(|(i, d)| call_of(id, i, &d.name, d.arguments.to_string()))
                    .collect(),
            )
        }
    }
}

/// The finish reason of an answer that made tool calls, from the engine's
/// `finish`: `length` stays; a call the plan forced by name ends with
/// `stop` (as OpenAI's does); any other with `tool_calls`.
pub fn finish_with_calls(plan: ToolPlan<'_>, finish: &str) -> &'static str {
    match (finish, plan) {
        ("length", _) => "length",
        (_, ToolPlan::Forced(_)) => "stop",
        _ => "tool_calls",
    }
}

/// The `i`th call of request `id`. The id is made from both, so every
/// attempt at a request (and a streamed answer's chunks) names a call the
/// same way.
pub fn call_of(id: &str, i: usize, name: &str, arguments: String) -> ToolCall {
    ToolCall {
        id: format!("call_{id}_{i}"),
        kind: ToolKind::Function,
        function: CalledFunction { name: name.to_string(), arguments },
    }
}

/// A function's arguments schema: its `parameters`, or any object.
fn arguments_schema(f: &Function) -> Value {
    f.parameters.clone().unwrap_or_else(|| json!({"type": "object"}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Vec<Tool> {
        serde_json::from_value(json!([
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
        ]))
        .unwrap()
    }

    fn choice(c: Value) -> Option<ToolChoice> {
        serde_json::from_value(c).unwrap()
    }

    #[test]
    fn the_tool_choice_decides_the_plan_and_the_grammar() {
        let t = tools();
        assert_eq!(plan(&[], None), ToolPlan::Text);
        assert_eq!(plan(&t, None), ToolPlan::Auto);
        assert_eq!(plan(&t, choice(json!("none")).as_ref()), ToolPlan::Text);
        assert_eq!(plan(&t, choice(json!("required")).as_ref()), ToolPlan::Required);
        let named = choice(json!({"type": "function", "function": {"name": "add"}}));
        let forced = plan(&t, named.as_ref());
        assert!(matches!(forced, ToolPlan::Forced(f) if f.name == "add"));
        assert_eq!(schema(ToolPlan::Auto, &t, None), None);
        assert_eq!(schema(forced, &t, None), Some(json!({"type": "object"})));
        let list = schema(ToolPlan::Required, &t, Some(false)).unwrap();
        assert_eq!(list["items"]["anyOf"][1]["properties"]["name"]["const"], "add");
        assert_eq!(list["maxItems"], 1);
    }

    #[test]
    fn decoded_text_becomes_calls_with_stable_ids() {
        let t = tools();
        let named = choice(json!({"type": "function", "function": {"name": "add"}}));
        let c = calls(plan(&t, named.as_ref()), "r1", r#"{"a":1}"#).unwrap();
        assert_eq!((c[0].id.as_str(), c[0].function.name.as_str()), ("call_r1_0", "add"));
        assert_eq!(c[0].function.arguments, r#"{"a":1}"#);
        let both = r#"[{"name":"add","arguments":{"a":1}},{"name":"get_weather","arguments":{}}]"#;
        let c = calls(ToolPlan::Required, "r1", both).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!((c[1].id.as_str(), c[1].function.arguments.as_str()), ("call_r1_1", "{}"));
        assert_eq!(calls(ToolPlan::Required, "r1", r#"[{"name":"add","argu"#), None);
        for cut in [
            r#"[{"name":"add","arguments":{}},{"name":"add","arguments":{"a":2"#,
            r#"[{"name":"add","arguments":{}},{"na"#,
            r#"[{"name":"add","arguments":{}},"#,
            r#"[{"name":"add","arguments":{"x":[{"name":"y"}]}},{"name":"add","arguments":{"a":[{"name":"#,
        ] {
            assert_eq!(calls(ToolPlan::Required, "r1", cut).map(|c| c.len()), Some(1), "the completed calls of {cut}");
        }
        assert_eq!(calls(ToolPlan::Auto, "r1", "{}"), None);
    }
}
