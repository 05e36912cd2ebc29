//! Warming: replaying answers stored in `FLEET_RESULTS` into the cache.
//!
//! Every cacheable result is stored with its cache key and expiry in headers
//! (`Fleet-Cache-Key`, `Fleet-Cache-Expires`), so a replay needs no request
//! bodies. A worker warms itself on start (`warm_on_start`) or when asked on
//! `fleet.ctl.cache.warm` (what `retro-fleet cache warm` sends); it answers
//! with progress messages, then a final report. The semantic index is not
//! rebuilt by a replay (results do not carry prompts).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::StreamExt;
use retro_fleet_schemas::cache_key::Key;
use retro_fleet_schemas::{codec, headers, subjects, InferResult, Status};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::answer::Answer;
use super::store::ResultCache;

/// Where a replay starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WarmFrom {
    /// Results stored at or after this unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Results from this stream sequence on (wins over `since_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
}

/// Progress and outcome of a replay, as sent to whoever asked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WarmProgress {
    /// Worker replaying.
    pub worker: String,
    /// Results read so far.
    pub scanned: u64,
    /// Results to read in all.
    pub total: u64,
    /// Answers put in the cache.
    pub inserted: u64,
    /// Answers skipped because they expired.
    pub expired: u64,
    /// True on the last message.
    pub done: bool,
    /// Set when the replay failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Replays `FLEET_RESULTS` from `from` into `cache`, calling `progress` now and then.
pub async fn replay(
    cache: &ResultCache,
    js: &jetstream::Context,
    from: WarmFrom,
    mut progress: impl FnMut(&WarmProgress),
    worker: &str,
) -> Result<WarmProgress, Box<dyn std::error::Error + Send + Sync>> {
    let deliver_policy = match (from.from_seq, from.since_ms) {
        (Some(seq), _) => consumer::DeliverPolicy::ByStartSequence { start_sequence: seq.max(1) },
        (None, Some(ms)) => consumer::DeliverPolicy::ByStartTime {
            start_time: time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)?,
        },
        (None, None) => consumer::DeliverPolicy::All,
    };
    let stream = js.get_stream(subjects::RESULTS_STREAM).await?;
    let mut c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: subjects::RESULTS_WILDCARD.to_string(),
            deliver_policy,
            ..Default::default()
        })
        .await?;
    let mut p = WarmProgress { worker: worker.to_string(), total: c.info().await?.num_pending, ..Default::default() };
    progress(&p);
    let mut messages = c.messages().await?;
    let mut last_report = std::time::Instant::now();
    while p.scanned < p.total {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await else { break };
        let msg = msg?;
        p.scanned += 1;
        let pending = msg.info().map(|i| i.pending).unwrap_or(1);
        if let Some(answer) = answer_of(&msg) {
            if answer.1.expires_ms > crate::clock::unix_ms() {
                cache.put(&answer.2, answer.0, &answer.1, None);
                p.inserted += 1;
            } else {
                p.expired += 1;
            }
        }
        if last_report.elapsed() > Duration::from_millis(200) {
            progress(&p);
            last_report = std::time::Instant::now();
        }
        if pending == 0 {
            break;
        }
    }
    p.done = true;
    progress(&p);
    Ok(p)
}

/// The cache entry a stored result carries, if it is a cacheable success.
fn answer_of(msg: &jetstream::Message) -> Option<(Key, Answer, String)> {
    let h = msg.headers.as_ref()?;
    let key = Key::parse(h.get(headers::CACHE_KEY)?.as_str())?;
    let expires_ms = h.get(headers::CACHE_EXPIRES)?.as_str().parse().ok()?;
    let r: InferResult = codec::decode(h.get(headers::CONTENT_TYPE).map(|v| v.as_str()), &msg.payload).ok()?;
    if r.status != Status::Ok {
        return None;
    }
    Some((key, Answer { output: r.output?, usage: r.usage.unwrap_or_default(), expires_ms }, r.model))
}

/// Answers warm requests on `fleet.ctl.cache.warm` until `shutdown`.
pub async fn serve(
    cache: Arc<ResultCache>,
    client: async_nats::Client,
    js: jetstream::Context,
    worker: String,
    shutdown: CancellationToken,
) {
    let mut sub = match client.subscribe(subjects::CACHE_WARM).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for cache warm requests");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = sub.next() => match m { Some(m) => m, None => return },
        };
        let Some(reply) = msg.reply.clone() else { continue };
        // an empty request means everything kept; anything else must parse
        let from: WarmFrom = match msg.payload.is_empty() {
            true => WarmFrom::default(),
            false => match serde_json::from_slice(&msg.payload) {
                Ok(f) => f,
                Err(e) => {
                    let p = WarmProgress {
                        worker: worker.clone(),
                        done: true,
                        error: Some(format!("bad warm request (want {{\"since_ms\"?, \"from_seq\"?}}): {e}")),
                        ..Default::default()
                    };
                    let _ = client.publish(reply, Bytes::from(serde_json::to_vec(&p).unwrap_or_default())).await;
                    continue;
                }
            },
        };
        // progress goes out in order, from one task
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<WarmProgress>();
        let client = client.clone();
        let forward = tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                let _ = client.publish(reply.clone(), Bytes::from(serde_json::to_vec(&p).unwrap_or_default())).await;
            }
        });
        tracing::info!(?from, "warming the cache from stored results");
        match replay(&cache, &js, from, |p| drop(tx.send(p.clone())), &worker).await {
            Ok(p) => tracing::info!(scanned = p.scanned, inserted = p.inserted, expired = p.expired, "cache warmed"),
            Err(e) => {
                tracing::warn!(error = %e, "cache warm failed");
                let p = WarmProgress {
                    worker: worker.clone(),
                    done: true,
                    error: Some(e.to_string()),
                    ..Default::default()
                };
                let _ = tx.send(p);
            }
        }
        drop(tx);
        let _ = forward.await;
    }
}
