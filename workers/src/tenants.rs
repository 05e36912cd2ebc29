//! Tenants' settings from KV `fleet_tenants` (see
//! [`retro_fleet_schemas::TenantPolicy`]), followed live: current entries
//! first, then every change, each sent to the pull loop, which owns the
//! fair-sharing state. A deleted entry is sent as the defaults.

use async_nats::jetstream::{self, kv};
use retro_fleet_schemas::{subjects, TenantPolicy};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Sends `(tenant, policy)` to `to` for every entry and change until `stop`.
pub async fn follow(
    js: jetstream::Context,
    to: mpsc::UnboundedSender<(String, TenantPolicy)>,
    stop: CancellationToken,
) {
    let missing = "every tenant has weight 1 until it exists";
    let run = crate::follow::bucket(&js, subjects::TENANTS_BUCKET, missing, |e| {
        let policy = match e.operation {
            kv::Operation::Put => match serde_json::from_slice::<TenantPolicy>(&e.value) {
                Ok(p) if p.check().is_ok() => p,
                _ => {
                    tracing::warn!(tenant = %e.key, "unreadable tenant settings; the defaults apply");
                    TenantPolicy::default()
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => TenantPolicy::default(),
        };
        to.send((e.key, policy)).is_ok()
    });
    tokio::select! {
        _ = run => {}
        _ = stop.cancelled() => {}
    }
}
