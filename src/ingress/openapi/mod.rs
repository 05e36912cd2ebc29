//! `GET /openapi.json`: the OpenAPI 3.1 description of this ingress,
//! generated from the code. Request and response bodies are the handlers'
//! own types, their JSON Schemas derived by schemars from the same structs
//! serde reads and writes; the few answers built as JSON in place (OpenAI
//! objects, queue and batch views) are described by hand. Those component
//! schemas are made in [`components`]; the operations that use them, here.
//! Security follows the running configuration: with authentication on,
//! every API route needs a bearer credential (API key or JWT).
//!
//! [`OPERATIONS`] lists every route the router serves; a test checks that
//! each one answers (no 404 from the fallback), and the CI conformance run
//! (schemathesis) checks that answers match what is written here.

mod components;

use retro_fleet_schemas::{InferResult, WorkerInfo};
use serde_json::{json, Map, Value};

use super::admin::{DlqQuery, PauseQuery, PurgeBody, RecentQuery, ReplayBody, TenantBody};
use super::batch::CreateQuery;
use super::error::Body as ErrorBody;
use super::native::{Accepted, Choices, NativeRequest};
use super::openai_shapes::{ChatRequest, CompletionRequest, EmbeddingRequest};
use super::ratelimit::RouteClass;
use components::{narrow, views, Gen};

/// Every route: method, path, and the class whose role it needs (`None`:
/// open to all, like health and metrics).
pub const OPERATIONS: &[(&str, &str, Option<RouteClass>)] = &[
    ("post", "/v1/infer", Some(RouteClass::Submit)),
    ("post", "/v1/infer/async", Some(RouteClass::Submit)),
    ("get", "/v1/results/{id}", Some(RouteClass::Read)),
    ("post", "/v1/chat/completions", Some(RouteClass::Submit)),
    ("post", "/v1/completions", Some(RouteClass::Submit)),
    ("post", "/v1/embeddings", Some(RouteClass::Submit)),
    ("post", "/v1/cache/feedback", Some(RouteClass::Submit)),
    ("get", "/v1/models", Some(RouteClass::Read)),
    ("get", "/v1/usage", Some(RouteClass::Read)),
    ("post", "/v1/batches", Some(RouteClass::Submit)),
    ("get", "/v1/batches/{id}", Some(RouteClass::Read)),
    ("get", "/v1/batches/{id}/results", Some(RouteClass::Read)),
    ("get", "/v1/batches", Some(RouteClass::Read)),
    ("post", "/v1/batches/{id}/cancel", Some(RouteClass::Submit)),
    ("post", "/v1/files", Some(RouteClass::Submit)),
    ("get", "/v1/files", Some(RouteClass::Read)),
    ("get", "/v1/files/{id}", Some(RouteClass::Read)),
    ("get", "/v1/files/{id}/content", Some(RouteClass::Read)),
    ("delete", "/v1/files/{id}", Some(RouteClass::Submit)),
    ("get", "/v1/admin/config", Some(RouteClass::Admin)),
    ("get", "/v1/admin/queues", Some(RouteClass::Admin)),
    ("post", "/v1/admin/queues/{priority}/pause", Some(RouteClass::Admin)),
    ("post", "/v1/admin/queues/{priority}/resume", Some(RouteClass::Admin)),
    ("get", "/v1/admin/workers", Some(RouteClass::Admin)),
    ("post", "/v1/admin/workers/{id}/drain", Some(RouteClass::Admin)),
    ("post", "/v1/admin/workers/{id}/resume", Some(RouteClass::Admin)),
    ("get", "/v1/admin/dlq", Some(RouteClass::Admin)),
    ("get", "/v1/admin/dlq/{seq}", Some(RouteClass::Admin)),
    ("post", "/v1/admin/dlq/replay", Some(RouteClass::Admin)),
    ("get", "/v1/admin/batches", Some(RouteClass::Admin)),
    ("get", "/v1/admin/webhooks", Some(RouteClass::Admin)),
    ("get", "/v1/admin/console/events", Some(RouteClass::Admin)),
    ("post", "/v1/admin/cache/purge", Some(RouteClass::Admin)),
    ("get", "/v1/admin/tenants", Some(RouteClass::Admin)),
    ("put", "/v1/admin/tenants/{tenant}", Some(RouteClass::Admin)),
    ("get", "/health/live", None),
    ("get", "/health/ready", None),
    ("get", "/metrics", None),
    ("get", "/openapi.json", None),
    ("get", "/console", None),
    ("get", "/console/console.js", None),
    ("get", "/console/console.css", None),
];

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

/// The document, for an ingress serving `models`, whose authentication is
/// `auth_on` and that may answer 429 when `throttled` (rate limits, or the
/// failed-login throttle), and on submit routes when `budgets` are kept.
pub fn spec(models: &std::collections::BTreeSet<String>, auth_on: bool, throttled: bool, budgets: bool) -> Value {
    let mut g = Gen::new();
    let error = g.of::<ErrorBody>();
    let result = g.of::<InferResult>();
    let native = g.of::<NativeRequest>();
    let accepted = g.of::<Accepted>();
    let choices = g.of::<Choices>();
    let chat = g.of::<ChatRequest>();
    let completion = g.of::<CompletionRequest>();
    let embedding = g.of::<EmbeddingRequest>();
    let replay = g.of::<ReplayBody>();
    let replayed = g.of::<crate::ops::dlq::Replayed>();
    let purge = g.of::<PurgeBody>();
    let feedback = g.of::<super::feedback::FeedbackBody>();
    let feedback_applied = g.of::<super::feedback::FeedbackApplied>();
    let tenant_body = g.of::<TenantBody>();
    let control = g.of::<retro_fleet_worker::control::ControlState>();
    let _ = g.of::<WorkerInfo>();
    let _ = g.of::<retro_fleet_schemas::Priority>();
    let batch_query = g.query::<CreateQuery>();
    let batch_body = g.of::<super::batch::CreateBody>();
    let batch_list_query = g.query::<super::batch::ListQuery>();
    let file_list_query = g.query::<super::files::ListQuery>();
    let dlq_query = g.query::<DlqQuery>();
    let recent_query = g.query::<RecentQuery>();
    let pause_query = g.query::<PauseQuery>();
    let usage_query = g.query::<super::usage::UsageParams>();
    let usage_row = g.of::<crate::usage::Row>();
    let _ = g.of::<super::webhooks::Attempt>();
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
    let infer_ok = json!({"description": "The result, or every choice's with `n` > 1 (or, streaming, their chunks)",
        "content": {"application/json": {"schema": {"oneOf": [result, choices]}},
                    "text/event-stream": {"schema": r("ServerSentEvent")}}});
    let openai_ok = |schema: Value| {
        json!({"description": format!("The completion; {sse}"), "content": {
            "application/json": {"schema": schema}, "text/event-stream": {"schema": r("ServerSentEvent")}}})
    };
    let id = |what: &str| path_param("id", what);
    let prio = json!({"name": "priority", "in": "path", "required": true, "description": "Priority class",
                      "schema": {"enum": ["high", "normal", "low"]}});

    // (summary, parameters, request body, success status, success response, error statuses)
    type Doc = (&'static str, Vec<Value>, Option<Value>, u16, Value, &'static [u16]);
    // 409: a request id run within the duplicate window whose result is gone
    let infer_errors: &[u16] = &[400, 404, 409, 413, 422, 502, 503, 504];
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
            ("post", "/v1/embeddings") => (
                "OpenAI-compatible embeddings, from a model with `backend = \"embedding\"`",
                submit_headers.clone(),
                Some(json_body(embedding.clone())),
                200,
                ok_json("One vector per input text, in order", r("EmbeddingList")),
                infer_errors,
            ),
            ("post", "/v1/cache/feedback") => (
                "A verdict on an answer the semantic cache gave one of the caller's requests",
                vec![request_id.clone()],
                Some(json_body(feedback.clone())),
                200,
                ok_json("Applied by the workers holding the entry", feedback_applied.clone()),
                &[400, 404, 422],
            ),
            ("get", "/v1/models") => (
                "Models the fleet serves",
                vec![request_id.clone()],
                None,
                200,
                ok_json("Models", r("ModelList")),
                &[422],
            ),
            ("get", "/v1/usage") => (
                "Metered usage added up by tenant, key, model and day (a tenant reads its own; an admin any)",
                [usage_query.clone(), vec![request_id.clone()]].concat(),
                None,
                200,
                ok_json(
                    "Usage",
                    json!({"type": "object", "required": ["object", "data"], "properties": {
                        "object": {"const": "list"}, "data": {"type": "array", "items": usage_row.clone()}}}),
                ),
                &[403, 422],
            ),
            ("post", "/v1/batches") => (
                "Create a batch from an uploaded file (OpenAI's Batches API), or submit one as a JSONL body",
                [
                    batch_query.clone(),
                    vec![
                        request_id.clone(),
                        priority.clone(),
                        header_param(
                            "Idempotency-Key",
                            "A retry with the same key (1-256 bytes) answers the batch the first call created",
                            json!({"type": "string", "minLength": 1, "maxLength": 256}),
                        ),
                    ],
                ]
                .concat(),
                Some(json!({"content": {
                    "application/json": {"schema": batch_body.clone()},
                    "application/jsonl": {"schema": {"type": "array", "items": r("BatchLine")}}}})),
                200,
                ok_json("The batch", r("Batch")),
                &[400, 404, 413, 422, 503],
            ),
            ("get", "/v1/batches") => (
                "The caller's batches, newest first",
                [batch_list_query.clone(), vec![request_id.clone()]].concat(),
                None,
                200,
                ok_json("A page of batches", r("BatchList")),
                &[422],
            ),
            ("post", "/v1/batches/{id}/cancel") => (
                "Cancel a batch created from a file: lines not sent never run, running ones are cancelled",
                vec![id("Batch id"), request_id.clone()],
                None,
                200,
                ok_json("The batch, `cancelling` until its running lines stop", r("Batch")),
                &[400, 404, 422, 503],
            ),
            ("post", "/v1/files") => (
                "Upload a file (multipart: `file`, `purpose`)",
                vec![request_id.clone()],
                Some(json!({"content": {"multipart/form-data": {"schema": {
                    "type": "object", "required": ["file", "purpose"],
                    "properties": {"file": {"type": "string", "format": "binary"},
                                   "purpose": {"enum": ["batch", "user_data"]}}}}}})),
                200,
                ok_json("The file", r("File")),
                &[400, 413, 422, 503],
            ),
            ("get", "/v1/files") => (
                "The caller's files",
                [file_list_query.clone(), vec![request_id.clone()]].concat(),
                None,
                200,
                ok_json("A page of files", r("FileList")),
                &[422],
            ),
            ("get", "/v1/files/{id}") => (
                "A file of the caller's tenant",
                vec![id("File id"), request_id.clone()],
                None,
                200,
                ok_json("The file", r("File")),
                &[404, 422],
            ),
            ("get", "/v1/files/{id}/content") => (
                "The content of a file of the caller's tenant",
                vec![id("File id"), request_id.clone()],
                None,
                200,
                text("The bytes as uploaded or written", "application/octet-stream"),
                &[404, 422],
            ),
            ("delete", "/v1/files/{id}") => (
                "Delete a file of the caller's tenant",
                vec![id("File id"), request_id.clone()],
                None,
                200,
                ok_json("Deleted", r("FileDeleted")),
                &[404, 422],
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
            ("get", "/v1/admin/dlq/{seq}") => (
                "One dead letter whole: its headers and payload",
                vec![
                    json!({"name": "seq", "in": "path", "required": true, "description": "Sequence in FLEET_DLQ",
                           "schema": {"type": "integer", "minimum": 0}}),
                    request_id.clone(),
                ],
                None,
                200,
                ok_json("The dead letter", r("DeadLetter")),
                &[404, 422],
            ),
            ("get", "/v1/admin/batches") => (
                "The newest batches of every tenant, with their progress",
                [recent_query.clone(), vec![request_id.clone()]].concat(),
                None,
                200,
                ok_json("Batches, newest first", r("Batches")),
                &[422],
            ),
            ("get", "/v1/admin/webhooks") => (
                "The last webhook delivery attempts of every tenant, oldest first",
                [recent_query.clone(), vec![request_id.clone()]].concat(),
                None,
                200,
                ok_json(
                    "Delivery attempts",
                    json!({"type": "object", "required": ["object", "data"], "properties": {
                        "object": {"const": "list"}, "data": {"type": "array", "items": r("WebhookAttempt")}}}),
                ),
                &[422],
            ),
            ("get", "/v1/admin/console/events") => (
                "The console's live feed: Server-Sent Events `history`, then a `sample` per worker heartbeat",
                vec![request_id.clone()],
                None,
                200,
                json!({"description": "Server-Sent Events", "content": {
                    "text/event-stream": {"schema": r("ServerSentEvent")}}}),
                &[],
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
            ("get", "/v1/admin/tenants") => (
                "Tenants' settings (weights for fair sharing)",
                vec![request_id.clone()],
                None,
                200,
                ok_json("Every tenant with settings", r("Tenants")),
                &[],
            ),
            ("put", "/v1/admin/tenants/{tenant}") => (
                "Set a tenant's settings",
                vec![path_param("tenant", "Tenant"), request_id.clone()],
                Some(json_body(tenant_body.clone())),
                200,
                ok_json("The stored settings", r("Tenant")),
                &[400, 413, 422],
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
            ("get", "/console") => ("The web console", vec![], None, 200, text("HTML", "text/html"), &[]),
            ("get", "/console/console.js") => {
                ("The console's script", vec![], None, 200, text("JavaScript", "text/javascript"), &[])
            }
            ("get", "/console/console.css") => ("The console's style", vec![], None, 200, text("CSS", "text/css"), &[]),
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
            if throttled || (budgets && class == Some(RouteClass::Submit)) {
                statuses.push(429);
            }
            statuses.push(422); // a malformed X-Request-Id
        }
        if body.is_some() {
            // a body over the route's limit, or one that does not arrive in time
            statuses.extend([408, 413]);
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

    let mut schemas = g.take_definitions();
    schemas.extend(views());
    // model names are for callers with the `read` role (`/v1/models`): the
    // document, open to all, lists them only when authentication is off
    if !auth_on {
        let names = json!({"enum": models});
        for body in ["NativeRequest", "ChatRequest", "CompletionRequest", "EmbeddingRequest"] {
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
