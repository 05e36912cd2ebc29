//! The committed JSON Schemas and golden fixtures are the contract with
//! clients in other languages: these tests fail when the Rust types drift
//! from them. `UPDATE_SCHEMAS=1` rewrites the files after a deliberate change.

use std::collections::BTreeMap;
use std::path::PathBuf;

use retro_fleet_schemas::tools::{call_of, ToolChoice, ToolMode};
use retro_fleet_schemas::*;

fn dir(sub: &str) -> PathBuf {
    // at run time, not env!(): a binary reused from another checkout
    // through a shared target directory would read that checkout's files
    let package = std::env::var_os("CARGO_MANIFEST_DIR").expect("run with `cargo test` or `cargo nextest run`");
    PathBuf::from(package).join(sub)
}

fn update() -> bool {
    std::env::var_os("UPDATE_SCHEMAS").is_some()
}

#[test]
fn json_schemas_match_the_types() {
    for (name, schema) in json_schema::all() {
        let path = dir("json").join(format!("{name}.schema.json"));
        let want = serde_json::to_string_pretty(&sorted(schema.clone())).unwrap() + "\n";
        if update() {
            std::fs::write(&path, &want).unwrap();
            continue;
        }
        let have = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("{}: {e}; run UPDATE_SCHEMAS=1 cargo test -p retro-fleet-schemas", path.display())
        });
        let have: serde_json::Value = serde_json::from_str(&have).unwrap();
        assert!(
            have == schema,
            "{} drifted from the Rust type; if the change is deliberate run UPDATE_SCHEMAS=1 cargo test -p retro-fleet-schemas",
            path.display()
        );
    }
}

/// Keys sorted at every level, so the committed files do not depend on
/// whether serde_json preserves insertion order in this build.
fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let m: BTreeMap<String, serde_json::Value> = m.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            serde_json::Value::Object(m.into_iter().collect())
        }
        serde_json::Value::Array(a) => serde_json::Value::Array(a.into_iter().map(sorted).collect()),
        other => other,
    }
}

fn golden_request() -> InferRequest {
    InferRequest {
        v: 1,
        id: "01JDQ3Z6W5XK0B1Q2R3S4T5V6W".into(),
        model: "tiny".into(),
        adapter: Some("support-bot".into()),
        input: Input::Chat {
            messages: vec![
                ChatMessage::text("system", "Be brief."),
                ChatMessage::text("user", "What is NATS?"),
                ChatMessage {
                    tool_calls: vec![call_of("01JDQ3Z6W5XK0B1Q2R3S4T5V6V", 0, "search", r#"{"q":"NATS"}"#.into())],
                    ..ChatMessage::text("assistant", "")
                },
                ChatMessage {
                    tool_call_id: Some("call_01JDQ3Z6W5XK0B1Q2R3S4T5V6V_0".into()),
                    ..ChatMessage::text("tool", "A connective technology.")
                },
            ],
        },
        params: SamplingParams {
            max_tokens: Some(32),
            temperature: Some(0.0),
            top_p: Some(0.9),
            top_k: Some(40),
            seed: Some(7),
            stop: vec!["\n\n".into()],
            frequency_penalty: Some(0.5),
            presence_penalty: Some(-0.25),
            logit_bias: BTreeMap::from([(50, -100.0), (51, 2.5)]),
            min_p: Some(0.05),
            // keys in sorted order: the encoding is the same whether or not
            // serde_json keeps insertion order (a feature another crate of a
            // build may turn on)
            constraint: Some(Constraint::JsonSchema {
                schema: serde_json::json!({"properties": {"answer": {"maxLength": 64, "type": "string"}},
                    "required": ["answer"], "type": "object"}),
            }),
            tools: serde_json::from_value(serde_json::json!([{"type": "function", "function": {
                "name": "search", "description": "Searches the docs.",
                "parameters": {"properties": {"q": {"type": "string"}}, "required": ["q"], "type": "object"}}}]))
            .unwrap(),
            tool_choice: Some(ToolChoice::Mode(ToolMode::Auto)),
            parallel_tool_calls: Some(true),
            logprobs: true,
            top_logprobs: Some(2),
        },
        stream: true,
        cache: CacheMode::Refresh,
        tenant: Some("acme".into()),
        metadata: BTreeMap::from([("source".into(), "docs".into())]),
    }
}

fn golden_result() -> InferResult {
    InferResult {
        v: 1,
        id: "01JDQ3Z6W5XK0B1Q2R3S4T5V6W".into(),
        model: "tiny".into(),
        model_revision: Some("sha256:2c1f0e".into()),
        adapter: Some("support-bot".into()),
        status: Status::Ok,
        output: Some(Output {
            tool_calls: vec![call_of("01JDQ3Z6W5XK0B1Q2R3S4T5V6W", 0, "search", r#"{"q":"JetStream"}"#.into())],
            logprobs: Some(vec![TokenLogprob {
                token: "A".into(),
                logprob: -0.25,
                bytes: vec![65],
                top_logprobs: vec![
                    TopLogprob { token: "A".into(), logprob: -0.25, bytes: vec![65] },
                    TopLogprob { token: "The".into(), logprob: -1.5, bytes: vec![84, 104, 101] },
                ],
            }]),
            ..Output::text("A messaging system.", "tool_calls")
        }),
        usage: Some(Usage { prompt_tokens: 12, completion_tokens: 5, total_tokens: 17 }),
        cache: CacheTier::Memory,
        cache_similarity: None,
        cache_entry: None,
        timings: Timings { queued_ms: 0.5, compute_ms: 0.25, total_ms: 1.0 },
        worker: "worker-1".into(),
        error: None,
    }
}

fn golden_error() -> InferResult {
    let mut r = InferResult::error(
        "01JDQ3Z6W5XK0B1Q2R3S4T5V6X",
        "tiny",
        ErrorCode::DeadlineExceeded,
        "deadline passed 120 ms before the request reached a worker",
    );
    r.worker = "worker-1".into();
    r
}

fn golden_chunk() -> StreamChunk {
    StreamChunk {
        v: 1,
        id: "01JDQ3Z6W5XK0B1Q2R3S4T5V6W".into(),
        seq: 3,
        offset: 21,
        delta: " system".into(),
        done: false,
    }
}

fn check<T>(name: &str, value: T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mp_path = dir("fixtures").join(format!("{name}.msgpack"));
    let json_path = dir("fixtures").join(format!("{name}.json"));
    if update() {
        std::fs::write(&mp_path, encode(&value)).unwrap();
        std::fs::write(&json_path, serde_json::to_string_pretty(&value).unwrap() + "\n").unwrap();
        return;
    }
    let mp = std::fs::read(&mp_path).unwrap();
    let json = std::fs::read(&json_path).unwrap();
    let from_mp: T = decode(Some("application/msgpack"), &mp).unwrap();
    let from_json: T = decode(Some("application/json"), &json).unwrap();
    assert_eq!(from_mp, value, "{name}.msgpack decodes to the golden value");
    assert_eq!(from_json, value, "{name}.json decodes to the golden value");
    assert_eq!(encode(&value), mp, "{name}: encoding is byte-for-byte stable");
}

#[test]
fn golden_fixtures_decode() {
    check("request", golden_request());
    check("result", golden_result());
    check("result_error", golden_error());
    check("chunk", golden_chunk());
}

#[test]
fn minimal_request_takes_defaults() {
    let json = br#"{"id":"r1","model":"echo","input":{"type":"completion","prompt":"hi"}}"#;
    let r: InferRequest = decode(Some("application/json"), json).unwrap();
    assert_eq!(r.v, SCHEMA_VERSION);
    assert_eq!(r.cache, CacheMode::Use);
    assert!(!r.stream);
    r.validate(1024).unwrap();
}

#[test]
fn validation_codes() {
    let mut r = golden_request();
    r.validate(1 << 20).unwrap();
    assert_eq!(r.validate(4).unwrap_err().code, ErrorCode::PromptTooLarge);
    r.model = "a.b".into();
    assert_eq!(r.validate(1 << 20).unwrap_err().code, ErrorCode::InvalidRequest);
    let mut r = golden_request();
    r.v = SCHEMA_VERSION + 1;
    assert_eq!(r.validate(1 << 20).unwrap_err().code, ErrorCode::InvalidRequest);
}
