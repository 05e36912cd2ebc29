//! JSON Schemas of the wire types.
//!
//! The files under `schemas/json/` are generated from the Rust types and
//! committed, so clients in other languages can validate against them; a test
//! fails when they drift (`UPDATE_SCHEMAS=1 cargo test -p retro-fleet-schemas`
//! rewrites them).

use schemars::schema_for;
use serde_json::Value;

use crate::archive::Recorded;
use crate::usage::UsageRecord;
use crate::{InferRequest, InferResult, ModelScaling, StreamChunk, TenantPolicy, WorkerInfo};

/// `(file stem, schema)` for every wire type.
pub fn all() -> Vec<(&'static str, Value)> {
    vec![
        ("request", serde_json::to_value(schema_for!(InferRequest)).expect("schema is JSON")),
        ("result", serde_json::to_value(schema_for!(InferResult)).expect("schema is JSON")),
        ("chunk", serde_json::to_value(schema_for!(StreamChunk)).expect("schema is JSON")),
        ("worker_info", serde_json::to_value(schema_for!(WorkerInfo)).expect("schema is JSON")),
        ("model_scaling", serde_json::to_value(schema_for!(ModelScaling)).expect("schema is JSON")),
        ("usage", serde_json::to_value(schema_for!(UsageRecord)).expect("schema is JSON")),
        ("tenant_policy", serde_json::to_value(schema_for!(TenantPolicy)).expect("schema is JSON")),
        ("cache_feedback", serde_json::to_value(schema_for!(crate::CacheFeedback)).expect("schema is JSON")),
        ("recorded", serde_json::to_value(schema_for!(Recorded)).expect("schema is JSON")),
    ]
}
