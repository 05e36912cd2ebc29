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
use retro_fleet_schemas::{subjects, ErrorCode, Priority, Received};
use tokio_util::sync::CancellationToken;

use crate::process::decide::Ids;
use crate::process::settle::{answer_error, dead_letter, meter, Letter};
use crate::process::Shared;

type Error = Box<dyn std::error::Error + Send + Sync>;

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
pub async fn sweep(sh: &Shared, p: Priority) -> Result<usize, Error> {
    let stream = sh.js.get_stream(subjects::request_stream(p)).await?;
    let mut listed = stream.info_with_subjects(subjects::request_wildcard(p)).await?;
    let mut unrouted = Vec::new();
    while let Some(entry) = listed.next().await {
        let (subject, _count) = entry?;
        let known = subjects::parse_request(&subject).is_some_and(|(_, m, _)| sh.catalog.contains(m));
        if !known {
            unrouted.push(subject);
        }
    }
    let mut answered = 0;
    for subject in unrouted {
        // Bounded per pass so one flood cannot hold the sweeper.
        for _ in 0..1_000 {
            let Ok(m) = stream.get_next_raw_message_by_subject(&subject).await else { break };
            let model = subjects::parse_request(&subject).map(|(_, m, _)| m).unwrap_or("unknown");
            let message = format!("model `{model}` is not configured in this fleet");
            let letter = Letter { subject: &subject, headers: Some(&m.headers), payload: &m.payload, delivered: 1 };
            let ids = Ids::of_envelope(&Received::read(Some(&m.headers)));
            dead_letter(sh, p, &letter, ErrorCode::UnknownModel, &message).await?;
            // Only the sweeper whose delete succeeds answers; the dead letter
            // is deduplicated on the request id.
            if !stream.delete_message(m.sequence).await.unwrap_or(false) {
                continue;
            }
            if let Some(result) = answer_error(sh, &ids, model, ErrorCode::UnknownModel, &message).await? {
                let tenant = ids.tenant.as_deref().unwrap_or(subjects::DEFAULT_TENANT);
                meter(sh, tenant, ids.caller.as_deref(), &result).await?;
            }
            sh.metrics.dead_lettered(p, "unknown", ErrorCode::UnknownModel, ids.id.as_deref(), &message);
            answered += 1;
        }
    }
    Ok(answered)
}
