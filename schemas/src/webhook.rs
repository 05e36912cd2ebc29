//! Webhook events waiting for delivery in the work queue `FLEET_WEBHOOKS`
//! at `fleet.webhook.send.<tenant>`: queued by whoever sees the end of what
//! was asked to call back (an ingress running a batch, the worker settling
//! a request sent with `Fleet-Callback-Url`) and POSTed by an ingress, which
//! signs them and checks the URL against its allowed hosts again.

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::{headers, subjects, InferResult, Status};

/// An event waiting to be delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// `webhook-id`: the same for every attempt, so receivers can drop repeats.
    pub id: String,
    /// `batch.completed`, `request.completed`, ...
    pub kind: String,
    /// Whose it is.
    pub tenant: String,
    /// Where it goes.
    pub url: String,
    /// The JSON body, as sent.
    pub body: String,
}

impl Event {
    /// Event `id` of `kind` for `tenant`, to `url`, carrying `data`; its
    /// body is `{id, object: "event", type, created_at, data}`.
    pub fn new(id: String, kind: String, tenant: &str, url: String, data: serde_json::Value, now_secs: u64) -> Event {
        let body = serde_json::json!({"id": id, "object": "event", "type": kind, "created_at": now_secs, "data": data});
        Event { id, kind, tenant: tenant.to_string(), url, body: body.to_string() }
    }

    /// The `request.completed` (or `request.failed`) event of `result`.
    pub fn of_result(result: &InferResult, tenant: &str, url: &str, now_secs: u64) -> Event {
        let kind = if result.status == Status::Ok { "request.completed" } else { "request.failed" };
        let data = serde_json::to_value(result).unwrap_or_default();
        Event::new(format!("evt_{}", result.id), kind.to_string(), tenant, url.to_string(), data, now_secs)
    }
}

/// Queues `event` and waits until it is stored; an event queued twice for
/// the same tenant within the duplicate window is kept once.
pub async fn enqueue(js: &Context, event: &Event) -> Result<(), PublishError> {
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, subjects::usage_msg_id(&event.tenant, &event.id).as_str());
    let payload = serde_json::to_vec(event).unwrap_or_default();
    js.publish_with_headers(subjects::webhook_send(&event.tenant), h, payload.into()).await?.await?;
    Ok(())
}
