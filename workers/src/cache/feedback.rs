//! Verdicts on semantic answers, from `POST /v1/cache/feedback` through
//! the ingress: every worker hears each one on
//! [`subjects::CACHE_FEEDBACK`]; those holding the entry apply it and reply.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use retro_fleet_schemas::cache_key::Key;
use retro_fleet_schemas::{subjects, CacheFeedback, FeedbackAck};
use tokio_util::sync::CancellationToken;

use super::ResultCache;

/// Applies verdicts until `shutdown`.
pub async fn serve(cache: Arc<ResultCache>, client: async_nats::Client, worker: String, shutdown: CancellationToken) {
    if cache.similar().is_none() {
        return;
    }
    let mut sub = match client.subscribe(subjects::CACHE_FEEDBACK).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for semantic cache feedback");
            return;
        }
    };
    let ack = Bytes::from(serde_json::to_vec(&FeedbackAck { worker }).expect("an ack encodes"));
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let f: CacheFeedback = match serde_json::from_slice(&msg.payload) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring malformed cache feedback");
                continue;
            }
        };
        let Some(entry) = Key::parse(&f.entry) else {
            tracing::warn!(entry = %f.entry, "ignoring cache feedback about a malformed entry");
            continue;
        };
        let held = cache.similar().is_some_and(|s| s.feedback(&f.model, entry, f.similarity, f.verdict));
        if let (true, Some(reply)) = (held, msg.reply) {
            let _ = client.publish(reply, ack.clone()).await;
        }
    }
}
