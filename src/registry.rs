//! Reading the worker registry (KV bucket `fleet_workers`): the scaler,
//! the admin API and `retro-fleet workers` list the live workers with it.
//! Workers write their own entries (see the worker crate's `heartbeat`).

use futures::StreamExt;
use retro_fleet_schemas::{subjects, WorkerInfo};

/// Every live worker, sorted by id. Entries older than `ttl_ms` (a worker
/// that stopped without deleting its key, before the bucket expired it) and
/// unreadable ones are left out. No bucket yet means no workers.
pub async fn list(js: &async_nats::jetstream::Context, ttl_ms: u64) -> anyhow::Result<Vec<WorkerInfo>> {
    let kv = match js.get_key_value(subjects::WORKERS_BUCKET).await {
        Ok(kv) => kv,
        Err(e) if e.kind() == async_nats::jetstream::context::KeyValueErrorKind::GetBucket => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut keys = kv.keys().await?;
    let now = retro_fleet_worker::unix_ms();
    let mut out = Vec::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        let Some(value) = kv.get(&key).await? else { continue };
        match serde_json::from_slice::<WorkerInfo>(&value) {
            Ok(w) if now.saturating_sub(w.updated_ms) <= ttl_ms => out.push(w),
            Ok(_) => {}
            Err(e) => tracing::debug!(%key, error = %e, "unreadable registry entry"),
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}
