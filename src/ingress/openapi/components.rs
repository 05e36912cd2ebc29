//! The document's component schemas: the handlers' own types through
//! schemars ([`Gen`]), the answers built as JSON in place ([`views`]), and
//! the facts of this ingress the types cannot know ([`narrow`]).

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

/// Component schemas, derived by schemars, collected under
/// `/components/schemas` as the operations refer to them.
pub(super) struct Gen(SchemaGenerator);

impl Gen {
    pub(super) fn new() -> Gen {
        Gen(SchemaSettings::draft2020_12().with(|s| s.definitions_path = "/components/schemas".into()).into_generator())
    }

    /// A `$ref` to `T`'s schema.
    pub(super) fn of<T: JsonSchema>(&mut self) -> Value {
        self.0.subschema_for::<T>().to_value()
    }

    /// Every schema referred to so far, by name.
    pub(super) fn take_definitions(&mut self) -> Map<String, Value> {
        self.0.take_definitions(true)
    }

    /// Query parameters from `T`'s properties.
    pub(super) fn query<T: JsonSchema>(&mut self) -> Vec<Value> {
        let schema = self.0.root_schema_for::<T>().to_value();
        let required: Vec<&str> =
            schema["required"].as_array().map(|r| r.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let mut out = Vec::new();
        if let Some(props) = schema["properties"].as_object() {
            for (name, s) in props {
                let mut s = not_null(s.clone());
                let description = s.as_object_mut().and_then(|o| o.remove("description"));
                out.push(json!({
                    "name": name, "in": "query", "required": required.contains(&name.as_str()),
                    "description": description, "schema": s,
                }));
            }
        }
        // a query type's own definitions (enums it names) become components
        for at in ["/$defs", "/components/schemas"] {
            if let Some(defs) = schema.pointer(at).and_then(Value::as_object) {
                self.0.definitions_mut().extend(defs.clone());
            }
        }
        out
    }
}

/// An optional query value's schema without its `null`: absence is the
/// parameter's `required: false`, and a query string has no null.
fn not_null(mut s: Value) -> Value {
    if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
        let rest: Vec<Value> = any.iter().filter(|v| v.get("type") != Some(&json!("null"))).cloned().collect();
        if rest.len() == 1 {
            let mut one = rest[0].clone();
            if let (Some(o), Some(d)) = (one.as_object_mut(), s.get("description")) {
                o.insert("description".into(), d.clone());
            }
            return one;
        }
    }
    if let Some(types) = s.get("type").and_then(Value::as_array) {
        let rest: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
        if rest.len() == 1 {
            s["type"] = rest[0].clone();
        }
    }
    s
}

/// The OpenAI objects the compatible routes answer with, and the views
/// built in place; described here, beside the handlers that build them.
fn openai_completion(object: &str, choice: Value) -> Value {
    json!({
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": object},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "system_fingerprint": {"type": ["string", "null"]},
            "choices": {"type": "array", "items": choice},
            "usage": {"$ref": "#/components/schemas/OpenAiUsage"},
        },
    })
}

pub(super) fn views() -> Map<String, Value> {
    let usage = json!({
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    });
    let finish = json!({"type": "string"});
    let tool_call = json!({
        "type": "object", "required": ["id", "type", "function"],
        "properties": {
            "id": {"type": "string"}, "type": {"const": "function"},
            "function": {"type": "object", "required": ["name", "arguments"],
                         "properties": {"name": {"type": "string"}, "arguments": {"type": "string"}}},
        },
    });
    let chat_choice = json!({
        "type": "object", "required": ["index", "message", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            // content is null when the answer is only tool calls
            "message": {"type": "object", "required": ["role", "content"],
                        "properties": {"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                                       "tool_calls": {"type": "array", "items": tool_call}}},
            "logprobs": {"type": ["object", "null"]},
            "finish_reason": finish,
        },
    });
    let text_choice = json!({
        "type": "object", "required": ["index", "text", "finish_reason"],
        "properties": {
            "index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": {"type": ["object", "null"]},
            "finish_reason": finish,
        },
    });
    let time = json!({"type": ["integer", "null"]});
    let file_id = json!({"type": ["string", "null"]});
    let batch = json!({
        "type": "object",
        "description": "OpenAI's batch object; `results_url` only for a batch submitted as a JSONL body",
        "required": ["id", "object", "endpoint", "priority", "status", "created_at", "request_counts",
                     "completion_window", "expires_at", "input_file_id", "output_file_id", "error_file_id"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "batch"}, "endpoint": {"type": "string"},
            "priority": {"$ref": "#/components/schemas/Priority"}, "tenant": {"type": "string"},
            "status": {"enum": ["validating", "in_progress", "finalizing", "completed", "failed", "expired",
                                "cancelling", "cancelled"]},
            "created_at": {"type": "integer"}, "completion_window": {"type": "string"}, "expires_at": {"type": "integer"},
            "request_counts": {"type": "object", "required": ["total", "completed", "failed"], "properties": {
                "total": {"type": "integer"}, "completed": {"type": "integer"}, "failed": {"type": "integer"}}},
            "input_file_id": file_id, "output_file_id": file_id, "error_file_id": file_id,
            "errors": {"type": ["object", "null"]}, "metadata": {"type": ["object", "null"]},
            "in_progress_at": time, "finalizing_at": time, "completed_at": time, "failed_at": time,
            "expired_at": time, "cancelling_at": time, "cancelled_at": time,
            "results_url": {"type": "string"},
        },
    });
    let list_of = |item: &str| {
        json!({"type": "object", "required": ["object", "data", "has_more"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": format!("#/components/schemas/{item}")}},
            "first_id": {"type": ["string", "null"]}, "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"}}})
    };
    let file = json!({
        "type": "object", "required": ["id", "object", "bytes", "created_at", "filename", "purpose", "status"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "file"}, "bytes": {"type": "integer"},
            "created_at": {"type": "integer"}, "filename": {"type": "string"},
            "purpose": {"enum": ["batch", "batch_output", "user_data"]}, "status": {"const": "processed"},
            "status_details": {"type": "null"}, "expires_at": {"type": "null"},
        },
    });
    let consumer = json!({
        "type": "object",
        "required": ["name", "pending", "in_flight", "redelivered", "waiting_pulls", "paused"],
        "properties": {
            "name": {"type": "string"}, "pending": {"type": "integer"}, "in_flight": {"type": "integer"},
            "redelivered": {"type": "integer"}, "waiting_pulls": {"type": "integer"}, "paused": {"type": "boolean"},
            "pause_remaining_secs": {"type": ["integer", "null"]},
        },
    });
    let queues = json!({
        "type": "object", "required": ["queues"],
        "properties": {"queues": {"type": "array", "items": {
            "type": "object", "required": ["priority", "stream", "messages", "bytes", "consumers"],
            "properties": {
                "priority": {"$ref": "#/components/schemas/Priority"}, "stream": {"type": "string"},
                "messages": {"type": "integer"}, "bytes": {"type": "integer"},
                "consumers": {"type": "array", "items": consumer},
            },
        }}},
    });
    let paused = json!({
        "type": "object", "required": ["priority", "paused", "consumers"],
        "properties": {
            "priority": {"$ref": "#/components/schemas/Priority"}, "paused": {"type": "boolean"},
            "consumers": {"type": "array", "items": {"type": "object", "required": ["consumer", "paused"],
                "properties": {"consumer": {"type": "string"}, "paused": {"type": "boolean"},
                               "remaining_secs": {"type": ["integer", "null"]}}}},
        },
    });
    let letter = json!({
        "type": "object", "required": ["seq", "time", "priority", "model", "tenant", "code", "message", "payload_bytes"],
        "properties": {
            "seq": {"type": "integer"}, "time": {"type": "string"}, "priority": {"type": "string"},
            "model": {"type": "string"}, "id": {"type": ["string", "null"]}, "tenant": {"type": "string"},
            "code": {"type": "string"}, "message": {"type": "string"}, "deliveries": {"type": "string"},
            "original_subject": {"type": ["string", "null"]}, "payload_bytes": {"type": "integer"},
        },
    });
    let models = json!({
        "type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
            "type": "object", "required": ["id", "object", "owned_by"],
            "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                           "owned_by": {"type": "string"}},
        }}},
    });
    let mut m = Map::new();
    m.insert("OpenAiUsage".into(), usage);
    m.insert("ChatCompletion".into(), openai_completion("chat.completion", chat_choice));
    m.insert("Completion".into(), openai_completion("text_completion", text_choice));
    m.insert("ModelList".into(), models);
    m.insert(
        "EmbeddingList".into(),
        json!({"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer", "minimum": 0},
                    "embedding": {"oneOf": [
                        {"type": "array", "items": {"type": "number"}},
                        {"type": "string", "description": "little-endian 32-bit floats, base64"}]}}}},
            "model": {"type": "string"},
            "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"], "properties": {
                "prompt_tokens": {"type": "integer", "minimum": 0},
                "total_tokens": {"type": "integer", "minimum": 0}}}}}),
    );
    m.insert("Batch".into(), batch);
    m.insert("BatchList".into(), list_of("Batch"));
    m.insert("File".into(), file);
    m.insert("FileList".into(), list_of("File"));
    m.insert(
        "FileDeleted".into(),
        json!({"type": "object", "required": ["id", "object", "deleted"], "properties": {
            "id": {"type": "string"}, "object": {"const": "file"}, "deleted": {"const": true}}}),
    );
    m.insert(
        "BatchLine".into(),
        json!({
            "type": "object", "description": "One line of a batch file (JSONL: one object per line)",
            "required": ["custom_id", "method", "url", "body"], "additionalProperties": false,
            "properties": {
                "custom_id": {"type": "string", "minLength": 1, "maxLength": 256},
                "method": {"const": "POST"},
                "url": {"enum": ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]},
                "body": {"type": "object", "description": "The body of that endpoint"},
            },
        }),
    );
    m.insert("Queues".into(), queues);
    m.insert("PausedPriority".into(), paused);
    m.insert(
        "DeadLetters".into(),
        json!({"type": "object", "required": ["letters"],
        "properties": {"letters": {"type": "array", "items": letter}}}),
    );
    let mut whole = letter.clone();
    whole["required"].as_array_mut().expect("a list").extend([json!("headers"), json!("payload")]);
    whole["properties"]["headers"] = json!({"type": "array", "description": "(name, value) pairs",
        "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}});
    whole["properties"]["payload"] = json!({"description": "The request as decoded, or escaped text"});
    m.insert("DeadLetter".into(), whole);
    m.insert(
        "Batches".into(),
        json!({"type": "object", "required": ["object", "data"], "properties": {
            "object": {"const": "list"}, "data": {"type": "array", "items": {"$ref": "#/components/schemas/Batch"}}}}),
    );
    m.insert(
        "Workers".into(),
        json!({"type": "object", "required": ["workers"],
        "properties": {"workers": {"type": "array", "items": {"$ref": "#/components/schemas/WorkerInfo"}}}}),
    );
    m.insert(
        "Purged".into(),
        json!({"type": "object", "required": ["generations"],
        "properties": {"generations": {"type": "object", "additionalProperties": {"type": "string"}}}}),
    );
    let tenant = json!({"type": "object", "required": ["tenant", "weight"],
        "properties": {"tenant": {"type": "string"}, "weight": {"type": "number"}}});
    m.insert(
        "Tenants".into(),
        json!({"type": "object", "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": tenant.clone()}}}),
    );
    m.insert("Tenant".into(), tenant);
    // one event of a stream: `event: chunk|result|error` (native) or bare
    // `data:` lines ending with `[DONE]` (OpenAI)
    m.insert(
        "ServerSentEvent".into(),
        json!({"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"},
        "retry": {"type": "integer"}}}),
    );
    m.insert(
        "Readiness".into(),
        json!({"type": "object", "required": ["ready"],
        "properties": {"ready": {"type": "boolean"}, "reason": {"type": "string"}}}),
    );
    m
}

/// Narrows property `prop` of component `name` with `extra` (the
/// configured model names, the request id pattern): facts of this ingress
/// that the Rust types cannot know.
pub(super) fn narrow(schemas: &mut Map<String, Value>, name: &str, prop: &str, extra: Value) {
    if let (Some(p), Some(extra)) =
        (schemas.get_mut(name).and_then(|s| s.pointer_mut(&format!("/properties/{prop}"))), extra.as_object())
    {
        if let Some(p) = p.as_object_mut() {
            p.extend(extra.clone());
        }
    }
}
