//! What the cache shares with the rest of the fleet through NATS KV:
//! model cache generations (`fleet_models`) and compute claims
//! (`fleet_cache_claims`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use retro_fleet_schemas::cache_key::{Generations, Key};
use retro_fleet_schemas::subjects;

use super::answer::Answer;

/// Sets `model`'s generation in `table`, saying so (and what it means for
/// the answers of the process: `consequence`) when it changed.
fn set(table: &Generations, model: &str, generation: &str, consequence: &str) {
    if table.set(model, generation) {
        tracing::info!(model, generation, "cache generation changed; {consequence}");
    }
}

/// Loads every model's cache generation from KV `fleet_models`, then keeps
/// following changes until the task is dropped. Without the bucket
/// (topology not applied) it says so and looks again every few seconds.
/// `consequence` says in the log what a change means for this process.
pub async fn follow_generations(table: Arc<Generations>, js: jetstream::Context, consequence: &'static str) {
    let missing = "`cache purge` cannot reach this process until it exists";
    crate::follow::bucket(&js, subjects::MODELS_BUCKET, missing, |e| {
        match e.operation {
            kv::Operation::Put => set(&table, &e.key, &String::from_utf8_lossy(&e.value), consequence),
            kv::Operation::Delete | kv::Operation::Purge => set(&table, &e.key, "", consequence),
        }
        true
    })
    .await
}

/// Reads the current generations once (so the first requests already use them).
pub async fn load_generations(table: &Generations, js: &jetstream::Context, consequence: &str) {
    let Ok(store) = js.get_key_value(subjects::MODELS_BUCKET).await else { return };
    let Ok(mut keys) = store.keys().await else { return };
    while let Some(Ok(k)) = keys.next().await {
        if let Ok(Some(v)) = store.get(&k).await {
            set(table, &k, &String::from_utf8_lossy(&v), consequence);
        }
    }
}

const CLAIMED: u8 = 0;
const ANSWERED: u8 = 1;

/// Cross-worker coalescing: the first worker to claim a key computes it and
/// publishes the answer in the claim; others wait for it, for a bounded time.
pub struct Claims {
    store: kv::Store,
    worker: String,
    wait: Duration,
}

/// Outcome of trying to claim a key.
pub enum Claim {
    /// This worker computes (or claims are unavailable: compute anyway).
    Mine,
    /// Another worker computes; wait with [`Claims::wait`].
    Theirs,
}

impl Claims {
    /// Opens the claims bucket; `None` (with a warning) when it does not exist.
    pub async fn open(js: &jetstream::Context, worker: &str, wait: Duration) -> Option<Claims> {
        match js.get_key_value(subjects::CACHE_CLAIMS_BUCKET).await {
            Ok(store) => Some(Claims { store, worker: worker.to_string(), wait }),
            Err(e) => {
                tracing::warn!(bucket = subjects::CACHE_CLAIMS_BUCKET, error = %e,
                    "no claims bucket; coalescing stays within this worker (run `retro-fleet topology apply`)");
                None
            }
        }
    }

    /// Tries to claim `key`.
    pub async fn claim(&self, key: Key) -> Claim {
        let mut v = vec![CLAIMED];
        v.extend_from_slice(self.worker.as_bytes());
        match self.store.create(key.hex(), Bytes::from(v)).await {
            Ok(_) => Claim::Mine,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Claim::Theirs,
            Err(e) => {
                tracing::warn!(error = %e, "claiming a cache key failed; computing without a claim");
                Claim::Mine
            }
        }
    }

    /// Publishes the answer to a key this worker claimed.
    pub async fn answer(&self, key: Key, answer: &Answer) {
        let mut v = vec![ANSWERED];
        v.extend_from_slice(&answer.encode());
        if let Err(e) = self.store.put(key.hex(), Bytes::from(v)).await {
            tracing::warn!(error = %e, "publishing a claimed answer failed; waiting workers will compute it");
        }
    }

    /// Gives a claim up (the computation failed), so waiting workers stop waiting.
    pub async fn release(&self, key: Key) {
        let _ = self.store.delete(key.hex()).await;
    }

    /// Waits for the answer to a key another worker claimed: `None` when the
    /// claim was released, or after the configured wait.
    pub async fn wait(&self, key: Key) -> Option<Answer> {
        let mut watch = self.store.watch_with_history(key.hex()).await.ok()?;
        let waited = tokio::time::timeout(self.wait, async {
            while let Some(Ok(e)) = watch.next().await {
                match e.operation {
                    kv::Operation::Put => {
                        if e.value.first() == Some(&ANSWERED) {
                            return Answer::decode(&e.value[1..]);
                        }
                    }
                    kv::Operation::Delete | kv::Operation::Purge => return None,
                }
            }
            None
        })
        .await;
        waited.ok().flatten()
    }
}
