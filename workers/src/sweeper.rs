//! Requests addressed to a model nobody in the fleet serves.
//!
//! Work-queue streams forbid overlapping consumers, so no catch-all consumer
//! can sit beside the per-model ones. Instead the sweeper looks at which
//! subjects hold messages; for a model outside the catalogue it reads the
//! messages directly, dead-letters each, deletes it from the stream (only one
//! sweeper wins the delete when several workers race), and the winner
//! answers `unknown_model`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use retro_fleet_schemas::{headers, subjects, ErrorCode, Priority};
use tokio_util::sync::CancellationToken;

use crate::process::{answer_error, dead_letter, header, Ids, Letter, Shared};

/// Sweeps every `interval` until `shutdown`.
pub async fn run(sh: Arc<Shared>, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
        for p in Priority::ALL {
            if let Err(e) = sweep(&sh, p).await {
                tracing::debug!(priority = %p, error = %e, "sweep failed");
            }
        }
    }
}

/// One pass over one priority stream; returns how many requests it answered.
pub async fn sweep(sh: &Shared, p: Priority) -> Result<usize, crate::process::Error> {
    let stream = sh.js.get_stream(subjects::request_stream(p)).await?;
    let mut listed = stream.info_with_subjects(subjects::request_wildcard(p)).await?;
    let mut unrouted = Vec::new();
    while let Some(entry) = listed.next().await {
        let (subject, _count) = entry?;
        let known = subjects::parse_request(&subject).is_some_and(|(_, m)| sh.catalog.contains(m));
        if !known {
            unrouted.push(subject);
        }
    }
    let mut answered = 0;
    for subject in unrouted {
        // Bounded per pass so one flood cannot hold the sweeper.
        for _ in 0..1_000 {
            let Ok(m) = stream.get_next_raw_message_by_subject(&subject).await else { break };
            let model = subjects::parse_request(&subject).map(|(_, m)| m).unwrap_or("unknown");
            let message = format!("model `{model}` is not configured in this fleet");
            let letter = Letter { subject: &subject, headers: Some(&m.headers), payload: &m.payload, delivered: 1 };
            let hdrs = Some(&m.headers);
            let id =
                header(hdrs, headers::MSG_ID).and_then(|m| subjects::id_of_msg_id(m, header(hdrs, headers::TENANT)));
            dead_letter(sh, p, &letter, id, ErrorCode::UnknownModel, &message).await?;
            // Only the sweeper whose delete succeeds answers; the dead letter
            // is deduplicated on the request id.
            if !stream.delete_message(m.sequence).await.unwrap_or(false) {
                continue;
            }
            let ids = Ids {
                id,
                tenant: header(hdrs, headers::TENANT).filter(|t| subjects::is_token(t)),
                reply: header(hdrs, headers::REPLY).filter(|r| !r.is_empty()),
            };
            answer_error(sh, ids, model, ErrorCode::UnknownModel, &message).await?;
            sh.metrics.dead_letters.with_label_values(&[p.as_str(), "unknown", ErrorCode::UnknownModel.as_str()]).inc();
            answered += 1;
        }
    }
    Ok(answered)
}
