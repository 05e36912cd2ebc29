//! `GET /openapi.json`: the OpenAPI 3.1 description of this ingress,
//! generated from the code. Request and response bodies are the handlers'
//! own types, their JSON Schemas derived by schemars from the same structs
//! serde reads and writes; the few answers built as JSON in place (OpenAI
//! objects, queue and batch views) are described next to their operation.
//! Security follows the running configuration: with authentication on,
//! every API route needs a bearer credential (API key or JWT).
//!
//! [`OPERATIONS`] lists every route the router serves; a test checks that
//! each one answers (no 404 from the fallback), and the CI conformance run
//! (schemathesis) checks that answers match what is written here.

use retro_fleet_schemas::{InferResult, WorkerInfo};
use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::JsonSchema;
use serde_json::{json, Map, Value};

use super::admin::{DlqQuery, PauseQuery, PurgeBody, ReplayBody};
use super::batch::CreateQuery;
use super::error::Body as ErrorBody;
use super::native::{Accepted, NativeRequest};
use super::openai_shapes::{ChatRequest, CompletionRequest};
use super::ratelimit::RouteClass;

/// Every route: method, path, and the class whose role it needs (`None`:
/// open to all, like health and metrics).
pub const OPERATIONS: &[(&str, &str, Option<RouteClass>)] = &[
    ("post", "/v1/infer", Some(RouteClass::Submit)),
    ("post", "/v1/infer/async", Some(RouteClass::Submit)),
    ("get", "/v1/results/{id}", Some(RouteClass::Read)),
    ("post", "/v1/chat/completions", Some(RouteClass::Submit)),
    ("post", "/v1/completions", Some(RouteClass::Submit)),
    ("get", "/v1/models", Some(RouteClass::Read)),
    ("post", "/v1/batches", Some(RouteClass::Submit)),
    ("get", "/v1/batches/{id}", Some(RouteClass::Read)),
    ("get", "/v1/batches/{id}/results", Some(RouteClass::Read)),
    ("get", "/v1/admin/config", Some(RouteClass::Admin)),
    ("get", "/v1/admin/queues", Some(RouteClass::Admin)),
    ("post", "/v1/admin/queues/{priority}/pause", Some(RouteClass::Admin)),
    ("post", "/v1/admin/queues/{priority}/resume", Some(RouteClass::Admin)),
    ("get", "/v1/admin/workers", Some(RouteClass::Admin)),
    ("post", "/v1/admin/workers/{id}/drain", Some(RouteClass::Admin)),
    ("post", "/v1/admin/workers/{id}/resume", Some(RouteClass::Admin)),
    ("get", "/v1/admin/dlq", Some(RouteClass::Admin)),
    ("post", "/v1/admin/dlq/replay", Some(RouteClass::Admin)),
    ("post", "/v1/admin/cache/purge", Some(RouteClass::Admin)),
    ("get", "/health/live", None),
    ("get", "/health/ready", None),
    ("get", "/metrics", None),
    ("get", "/openapi.json", None),
];

struct Gen(SchemaGenerator);

impl Gen {
    fn new() -> Gen {
        Gen(SchemaSettings::draft2020_12().with(|s| s.definitions_path = "/components/schemas".into()).into_generator())
    }

    /// A `$ref` to `T`'s schema.
    fn of<T: JsonSchema>(&mut self) -> Value {
        self.0.subschema_for::<T>().to_value()
    }

    /// Query parameters from `T`'s properties.
    fn query<T: JsonSchema>(&mut self) -> Vec<Value> {
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

fn json_body(schema: Value) -> Value {
    json!({"content": {"application/json": {"schema": schema}}})
}

fn ok_json(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}

fn text(description: &str, media: &str) -> Value {
    json!({"description": description, "content": {media: {"schema": {"type": "string"}}}})
}

fn path_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "description": description, "schema": {"type": "string"}})
}

fn header_param(name: &str, description: &str, schema: Value) -> Value {
    json!({"name": name, "in": "header", "required": false, "description": description, "schema": schema})
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

fn views() -> Map<String, Value> {
    let usage = json!({
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {
            "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    });
    let finish = json!({"type": "string"});
    let chat_choice = json!({
        "type": "object", "required": ["index", "message", "finish_reason"],
        "properties": {
            "index": {"type": "integer"},
            "message": {"type": "object", "required": ["role", "content"],
                        "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}},
            "logprobs": {"type": "null"},
            "finish_reason": finish,
        },
    });
    let text_choice = json!({
        "type": "object", "required": ["index", "text", "finish_reason"],
        "properties": {
            "index": {"type": "integer"}, "text": {"type": "string"}, "logprobs": {"type": "null"},
            "finish_reason": finish,
        },
    });
    let batch = json!({
        "type": "object",
        "required": ["id", "object", "endpoint", "priority", "status", "created_at", "request_counts", "results_url"],
        "properties": {
            "id": {"type": "string"}, "object": {"const": "batch"}, "endpoint": {"type": "string"},
            "priority": {"$ref": "#/components/schemas/Priority"},
            "status": {"enum": ["in_progress", "completed"]},
            "created_at": {"type": "integer"},
            "request_counts": {"type": "object", "required": ["total", "completed", "failed"], "properties": {
                "total": {"type": "integer"}, "completed": {"type": "integer"}, "failed": {"type": "integer"}}},
            "results_url": {"type": "string"},
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
    m.insert("Batch".into(), batch);
    m.insert(
        "BatchLine".into(),
        json!({
            "type": "object", "description": "One line of a batch file (JSONL: one object per line)",
            "required": ["custom_id", "method", "url", "body"], "additionalProperties": false,
            "properties": {
                "custom_id": {"type": "string", "minLength": 1, "maxLength": 256},
                "method": {"const": "POST"},
                "url": {"enum": ["/v1/chat/completions", "/v1/completions"]},
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
fn narrow(schemas: &mut Map<String, Value>, name: &str, prop: &str, extra: Value) {
    if let (Some(p), Some(extra)) =
        (schemas.get_mut(name).and_then(|s| s.pointer_mut(&format!("/properties/{prop}"))), extra.as_object())
    {
        if let Some(p) = p.as_object_mut() {
            p.extend(extra.clone());
        }
    }
}

/// The document, for an ingress serving `models`, whose authentication is
/// `auth_on` and whose rate limits are `limits_on`.
pub fn spec(models: &std::collections::BTreeSet<String>, auth_on: bool, limits_on: bool) -> Value {
    let mut g = Gen::new();
    let error = g.of::<ErrorBody>();
    let result = g.of::<InferResult>();
    let native = g.of::<NativeRequest>();
    let accepted = g.of::<Accepted>();
    let chat = g.of::<ChatRequest>();
    let completion = g.of::<CompletionRequest>();
    let replay = g.of::<ReplayBody>();
    let replayed = g.of::<crate::ops::dlq::Replayed>();
    let purge = g.of::<PurgeBody>();
    let control = g.of::<retro_fleet_worker::control::ControlState>();
    let _ = g.of::<WorkerInfo>();
    let _ = g.of::<retro_fleet_schemas::Priority>();
    let batch_query = g.query::<CreateQuery>();
    let dlq_query = g.query::<DlqQuery>();
    let pause_query = g.query::<PauseQuery>();
    let r = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});

    let request_id = header_param(
        "X-Request-Id",
        "Your id for this call (1-128 of [A-Za-z0-9_-]), echoed back; a ULID otherwise",
        json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"}),
    );
    let priority = header_param(
        "X-Priority",
        "Priority class (wins over the body)",
        json!({"enum": ["high", "normal", "low", "HIGH", "NORMAL", "LOW"]}),
    );
    let cache = header_param(
        "X-Cache",
        "Cache policy (wins over the body)",
        json!({"enum": ["use", "bypass", "refresh", "semantic"]}),
    );
    let cache_ttl = header_param(
        "X-Cache-Ttl",
        "Seconds a cached answer stays valid",
        json!({"type": "string", "pattern": "^[0-9]{1,9}$"}),
    );
    let submit_headers = vec![request_id.clone(), priority.clone(), cache, cache_ttl];
    let sse = "Server-Sent Events when the body asks for `stream: true`";
    let infer_ok = json!({"description": "The result (or, streaming, its chunks)", "content": {
        "application/json": {"schema": result}, "text/event-stream": {"schema": r("ServerSentEvent")}}});
    let openai_ok = |schema: Value| {
        json!({"description": format!("The completion; {sse}"), "content": {
            "application/json": {"schema": schema}, "text/event-stream": {"schema": r("ServerSentEvent")}}})
    };
    let id = |what: &str| path_param("id", what);
    let prio = json!({"name": "priority", "in": "path", "required": true, "description": "Priority class",
                      "schema": {"enum": ["high", "normal", "low"]}});

    // (summary, parameters, request body, success status, success response, error statuses)
    type Doc = (&'static str, Vec<Value>, Option<Value>, u16, Value, &'static [u16]);
    let infer_errors: &[u16] = &[400, 404, 413, 422, 502, 503, 504];
    let doc = |method: &str, path: &str| -> Doc {
        match (method, path) {
            ("post", "/v1/infer") => (
                "Run one request and wait for its result",
                submit_headers.clone(),
                Some(json_body(native.clone())),
                200,
                infer_ok.clone(),
                infer_errors,
            ),
            ("post", "/v1/infer/async") => (
                "Queue one request; fetch its result later",
                submit_headers.clone(),
                Some(json_body(native.clone())),
                202,
                ok_json("Queued", accepted.clone()),
                &[400, 404, 413, 422, 503],
            ),
            ("get", "/v1/results/{id}") => (
                "A stored result of the caller's tenant",
                vec![id("Request id"), request_id.clone()],
                None,
                200,
                ok_json("The result", result.clone()),
                &[404, 422],
            ),
            ("post", "/v1/chat/completions") => (
                "OpenAI-compatible chat completion",
                submit_headers.clone(),
                Some(json_body(chat.clone())),
                200,
                openai_ok(r("ChatCompletion")),
                infer_errors,
            ),
            ("post", "/v1/completions") => (
                "OpenAI-compatible completion",
                submit_headers.clone(),
                Some(json_body(completion.clone())),
                200,
                openai_ok(r("Completion")),
                infer_errors,
            ),
            ("get", "/v1/models") => (
                "Models the fleet serves",
                vec![request_id.clone()],
                None,
                200,
                ok_json("Models", r("ModelList")),
                &[422],
            ),
            ("post", "/v1/batches") => (
                "Submit a batch: JSONL in OpenAI's batch-file shape",
                [batch_query.clone(), vec![request_id.clone(), priority.clone()]].concat(),
                Some(json!({"content": {"application/jsonl": {"schema": {"type": "array", "items": r("BatchLine")}}}})),
                200,
                ok_json("The batch", r("Batch")),
                &[400, 413, 422, 503],
            ),
            ("get", "/v1/batches/{id}") => (
                "Progress of a batch of the caller's tenant",
                vec![id("Batch id"), request_id.clone()],
                None,
                200,
                ok_json("The batch", r("Batch")),
                &[404, 422],
            ),
            ("get", "/v1/batches/{id}/results") => (
                "Results of a batch so far, one JSONL line per finished request",
                vec![id("Batch id"), request_id.clone()],
                None,
                200,
                text("JSONL", "application/jsonl"),
                &[404, 422],
            ),
            ("get", "/v1/admin/config") => (
                "The effective configuration, secrets redacted",
                vec![request_id.clone()],
                None,
                200,
                ok_json("Configuration", json!({"type": "object"})),
                &[422],
            ),
            ("get", "/v1/admin/queues") => (
                "Depth of every request queue and its consumers' state",
                vec![request_id.clone()],
                None,
                200,
                ok_json("Queues", r("Queues")),
                &[422],
            ),
            ("post", "/v1/admin/queues/{priority}/pause") => (
                "Stop delivering a priority class to every worker",
                [vec![prio.clone(), request_id.clone()], pause_query.clone()].concat(),
                None,
                200,
                ok_json("Paused", r("PausedPriority")),
                &[422],
            ),
            ("post", "/v1/admin/queues/{priority}/resume") => (
                "Deliver a paused priority class again",
                vec![prio.clone(), request_id.clone()],
                None,
                200,
                ok_json("Resumed", r("PausedPriority")),
                &[422],
            ),
            ("get", "/v1/admin/workers") => (
                "Live workers (registry)",
                vec![request_id.clone()],
                None,
                200,
                ok_json("Workers", r("Workers")),
                &[422],
            ),
            ("post", "/v1/admin/workers/{id}/drain") => (
                "Stop one worker taking requests; it stays up until resumed",
                vec![id("Worker id"), request_id.clone()],
                None,
                200,
                ok_json("The worker's state", control.clone()),
                &[404, 422],
            ),
            ("post", "/v1/admin/workers/{id}/resume") => (
                "Let a drained worker take requests again",
                vec![id("Worker id"), request_id.clone()],
                None,
                200,
                ok_json("The worker's state", control.clone()),
                &[404, 422],
            ),
            ("get", "/v1/admin/dlq") => (
                "Dead letters, oldest first",
                [dlq_query.clone(), vec![request_id.clone()]].concat(),
                None,
                200,
                ok_json("Dead letters", r("DeadLetters")),
                &[422],
            ),
            ("post", "/v1/admin/dlq/replay") => (
                "Replay dead letters with a fresh delivery history",
                vec![request_id.clone()],
                Some(json_body(replay.clone())),
                200,
                ok_json("What happened to each letter", replayed.clone()),
                &[400, 413, 422],
            ),
            ("post", "/v1/admin/cache/purge") => (
                "Drop the cached answers of models (a new generation)",
                vec![request_id.clone()],
                Some(json_body(purge.clone())),
                200,
                ok_json("New generation per model", r("Purged")),
                &[400, 404, 413, 422],
            ),
            ("get", "/health/live") => ("Liveness", vec![], None, 200, text("ok", "text/plain"), &[]),
            ("get", "/health/ready") => (
                "Readiness: NATS connected and streams present",
                vec![],
                None,
                200,
                ok_json("Ready", r("Readiness")),
                &[503],
            ),
            ("get", "/metrics") => ("Prometheus metrics", vec![], None, 200, text("Metrics", "text/plain"), &[]),
            ("get", "/openapi.json") => {
                ("This document", vec![], None, 200, ok_json("OpenAPI 3.1", json!({"type": "object"})), &[])
            }
            _ => unreachable!("every operation is documented: {method} {path}"),
        }
    };

    let mut paths: Map<String, Value> = Map::new();
    for &(method, path, class) in OPERATIONS {
        let (summary, parameters, body, ok, ok_response, errors) = doc(method, path);
        let mut responses = Map::new();
        responses.insert(ok.to_string(), ok_response);
        let mut statuses: Vec<u16> = errors.to_vec();
        if class.is_some() {
            if auth_on {
                statuses.extend([401, 403]);
            }
            if limits_on {
                statuses.push(429);
            }
            statuses.push(422); // a malformed X-Request-Id
        }
        if path.contains('{') {
            // a parameter holding `#` or `?` unescaped cuts the path short,
            // and the fallback answers 404 `not_found`
            statuses.push(404);
        }
        statuses.sort_unstable();
        statuses.dedup();
        for s in statuses {
            let reason = axum::http::StatusCode::from_u16(s).ok().and_then(|c| c.canonical_reason()).unwrap_or("Error");
            responses.insert(s.to_string(), ok_json(reason, error.clone()));
        }
        let mut op = json!({
            "operationId": format!("{method}{}", path.replace(['/', '{', '}', '.'], "_")),
            "summary": summary,
            "responses": responses,
        });
        if !parameters.is_empty() {
            op["parameters"] = json!(parameters);
        }
        if let Some(b) = body {
            op["requestBody"] = b;
            op["requestBody"]["required"] = json!(true);
        }
        if let Some(c) = class {
            op["tags"] = json!([c.as_str()]);
            op["description"] = json!(format!("Needs the `{}` role.", c.role().as_str()));
            if auth_on {
                op["security"] = json!([{"bearer": []}]);
            }
        }
        paths.entry(path.to_string()).or_insert_with(|| json!({}))[method] = op;
    }

    let mut schemas = g.0.take_definitions(true);
    schemas.extend(views());
    // model names are for callers with the `read` role (`/v1/models`): the
    // document, open to all, lists them only when authentication is off
    if !auth_on {
        let names = json!({"enum": models});
        for body in ["NativeRequest", "ChatRequest", "CompletionRequest"] {
            narrow(&mut schemas, body, "model", names.clone());
        }
    }
    narrow(&mut schemas, "NativeRequest", "id", json!({"pattern": "^[A-Za-z0-9_-]{1,128}$"}));
    let mut doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "retro-fleet ingress",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "HTTP ingress of the retro-fleet inference fleet: native and OpenAI-compatible inference, batches, results and admin.",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    });
    if auth_on {
        doc["components"]["securitySchemes"] = json!({"bearer": {
            "type": "http", "scheme": "bearer",
            "description": "An API key, or a JWT (HS256, RS256 or ES256) from a configured issuer",
        }});
    }
    doc
}
