//! Metered usage: one record per answered request in `FLEET_USAGE`, at
//! `fleet.usage.<tenant>.<model>`, written by whoever answered it: the
//! worker that stored its result (or re-sent a stored one), or the ingress
//! that answered from its memory. A record's `Nats-Msg-Id` is the request's
//! (per tenant), so the duplicate window keeps one record per request
//! however many deliveries or workers took part. The record is written
//! before the request's message is acked: a worker that dies in between
//! leaves the message for redelivery, whose record is the same.

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{codec, headers, subjects, CacheTier, InferResult, Status, SCHEMA_VERSION};

/// What one answered request used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UsageRecord {
    /// Schema version.
    pub v: u32,
    /// Request id.
    pub id: String,
    /// Tenant.
    pub tenant: String,
    /// The credential that sent it (`key:<id>`, `jwt:<iss>/<tenant>/<sub>`);
    /// empty when it was published to NATS directly.
    #[serde(default)]
    pub caller: String,
    /// Model.
    pub model: String,
    /// When it was answered, unix ms.
    pub at_ms: u64,
    /// `ok`, or `error` for a failed request (its tokens are 0 unless it
    /// failed after generating).
    pub status: Status,
    /// The cache tier that answered; `none` when the model computed it.
    pub cache: CacheTier,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Completion tokens.
    pub completion_tokens: u32,
}

impl UsageRecord {
    /// The record of `result`, answered to `caller` in `tenant` at `at_ms`.
    pub fn of(result: &InferResult, tenant: &str, caller: Option<&str>, at_ms: u64) -> UsageRecord {
        let (prompt_tokens, completion_tokens) =
            result.usage.as_ref().map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
        UsageRecord {
            v: SCHEMA_VERSION,
            id: result.id.clone(),
            tenant: tenant.to_string(),
            caller: caller.unwrap_or_default().to_string(),
            model: result.model.clone(),
            at_ms,
            status: result.status,
            cache: result.cache,
            prompt_tokens,
            completion_tokens,
        }
    }
}

/// Writes `record` to `FLEET_USAGE` and waits until it is stored; whether
/// it is the request's first (false: a duplicate of one stored, dropped).
pub async fn publish(js: &Context, record: &UsageRecord) -> Result<bool, PublishError> {
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, subjects::usage_msg_id(&record.tenant, &record.id).as_str());
    h.insert(headers::CONTENT_TYPE, codec::ContentType::MSGPACK_MIME);
    let subject = subjects::usage(&record.tenant, usage_model(&record.model));
    let ack = js.publish_with_headers(subject, h, codec::encode(record).into()).await?.await?;
    Ok(!ack.duplicate)
}

/// The model's subject token (`unknown` for a name that cannot be one).
fn usage_model(model: &str) -> &str {
    if subjects::is_token(model) {
        model
    } else {
        "unknown"
    }
}
