//! The request archive: accepted requests with the answers they got, in
//! `FLEET_ARCHIVE` at `fleet.archive.<tenant>.<model>`. It is off unless
//! `topology.archive_max_age_secs` is set; then the worker that settles a
//! request records it after the result is stored and before the ack. The
//! record's `Nats-Msg-Id` is the request's (per tenant), so a redelivered
//! request is recorded once. `retro-fleet replay` reads it back, and its
//! JSONL files hold one record per line as JSON.

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{codec, headers, subjects, InferRequest, InferResult, Priority, SCHEMA_VERSION};

/// One recorded request and the result its caller got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Recorded {
    /// Schema version.
    pub v: u32,
    /// When the request was published, unix ms: replays are paced by it.
    pub at_ms: u64,
    /// Its priority class.
    pub priority: Priority,
    /// Its tenant.
    pub tenant: String,
    /// The time its caller allowed (its deadline less `at_ms`), in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// The request as it was published.
    pub request: InferRequest,
    /// The result it got.
    pub result: InferResult,
}

impl Recorded {
    /// The record of `request` (published at `at_ms`) answered with `result`.
    pub fn new(at_ms: u64, priority: Priority, tenant: &str, request: InferRequest, result: InferResult) -> Recorded {
        Recorded { v: SCHEMA_VERSION, at_ms, priority, tenant: tenant.to_string(), timeout_ms: None, request, result }
    }
}

/// Writes `record` to `FLEET_ARCHIVE` and waits until it is stored.
pub async fn publish(js: &Context, record: &Recorded) -> Result<(), PublishError> {
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, subjects::usage_msg_id(&record.tenant, &record.request.id).as_str());
    h.insert(headers::CONTENT_TYPE, codec::ContentType::MSGPACK_MIME);
    let model = if subjects::is_token(&record.request.model) { record.request.model.as_str() } else { "unknown" };
    let subject = subjects::archive(&record.tenant, model);
    js.publish_with_headers(subject, h, codec::encode(record).into()).await?.await?;
    Ok(())
}
