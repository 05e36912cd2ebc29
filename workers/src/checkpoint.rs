//! Durable checkpoints of running generations, in KV `fleet_checkpoints`
//! under `<tenant>.<id>`: the tokens generated so far, so that when a
//! worker dies mid-generation the attempt JetStream redelivers goes on
//! from there, on any worker, instead of starting again.
//!
//! A generation sends its latest [`Checkpoint`] at most once per interval;
//! [`Checkpoints::writing`] writes it while the generation runs (a slow
//! write skips to the newest one). Settling a request removes its
//! checkpoint; the bucket's max age removes any a crash left behind.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use retro_fleet_schemas::codec;

use crate::backend::{Checkpoint, Checkpointing};

/// The checkpoint bucket, and how often a generation writes to it.
pub struct Checkpoints {
    kv: kv::Store,
    every: Duration,
}

fn key(tenant: &str, id: &str) -> String {
    format!("{tenant}.{id}")
}

impl Checkpoints {
    /// Checkpoints in `kv`, one per `every` at most per generation.
    pub fn new(kv: kv::Store, every: Duration) -> Self {
        Checkpoints { kv, every }
    }

    /// The checkpoint of request `id` of `tenant`, if one was written (a
    /// checkpoint that cannot be read is logged and ignored: the request
    /// starts again).
    pub async fn load(&self, tenant: &str, id: &str) -> Option<Checkpoint> {
        let bytes = match self.kv.get(key(tenant, id)).await {
            Ok(b) => b?,
            Err(e) => {
                tracing::warn!(id, error = %e, "reading the checkpoint failed; starting again");
                return None;
            }
        };
        codec::decode(Some(codec::ContentType::MSGPACK_MIME), &bytes)
            .inspect_err(|e| tracing::warn!(id, error = %e, "an unreadable checkpoint; starting again"))
            .ok()
    }

    /// Removes the checkpoint of request `id` of `tenant` (its result is
    /// settled). A failure is logged: the bucket's max age removes it.
    pub async fn forget(&self, tenant: &str, id: &str) {
        if let Err(e) = self.kv.purge(key(tenant, id)).await {
            tracing::warn!(id, error = %e, "removing the checkpoint failed; it expires with the bucket's max age");
        }
    }

    /// Where a generation of request `id` of `tenant` sends checkpoints,
    /// and the future that writes them until the generation drops its
    /// sender; `wrote` is set before the first write.
    pub fn writing<'a>(
        &'a self,
        tenant: &'a str,
        id: &'a str,
        wrote: &'a AtomicBool,
    ) -> (Checkpointing, impl Future<Output = ()> + 'a) {
        let (tx, mut rx) = tokio::sync::watch::channel(None::<Checkpoint>);
        let write = async move {
            while rx.changed().await.is_ok() {
                let Some(c) = rx.borrow_and_update().clone() else { continue };
                wrote.store(true, Ordering::Relaxed);
                let value = Bytes::from(codec::encode(&c));
                if let Err(e) = self.kv.put(key(tenant, id), value).await {
                    tracing::warn!(id, error = %e, "writing a checkpoint failed; the next one may succeed");
                }
            }
        };
        (Checkpointing { tx, every: self.every }, write)
    }
}
