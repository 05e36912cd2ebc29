//! Tenants' settings in KV `fleet_tenants` ([`TenantPolicy`]): read and
//! written by `retro-fleet tenants` and the admin API, followed by every
//! worker (weights) and ingress (budgets).

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use retro_fleet_schemas::{subjects, TenantPolicy};

async fn bucket(js: &jetstream::Context) -> anyhow::Result<kv::Store> {
    js.get_key_value(subjects::TENANTS_BUCKET)
        .await
        .with_context(|| format!("no KV bucket {} (run `retro-fleet topology apply`)", subjects::TENANTS_BUCKET))
}

/// Every tenant with settings, by name.
pub async fn list(js: &jetstream::Context) -> anyhow::Result<Vec<(String, TenantPolicy)>> {
    let kv = bucket(js).await?;
    let mut keys = kv.keys().await?;
    let mut out = Vec::new();
    while let Some(tenant) = keys.next().await {
        let tenant = tenant?;
        if let Some(v) = kv.get(&tenant).await? {
            let policy = serde_json::from_slice(&v).unwrap_or_default();
            out.push((tenant, policy));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Stores `policy` for `tenant` (checked by the caller: [`TenantPolicy::check`]).
pub async fn set(js: &jetstream::Context, tenant: &str, policy: &TenantPolicy) -> anyhow::Result<()> {
    let kv = bucket(js).await?;
    kv.put(tenant, serde_json::to_vec(policy)?.into()).await.with_context(|| format!("storing tenant `{tenant}`"))?;
    Ok(())
}
