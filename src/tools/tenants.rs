//! `retro-fleet tenants`: tenants' settings in KV `fleet_tenants`
//! ([`crate::ops::tenants`]), which every worker and ingress follows live.

use retro_fleet_schemas::{subjects, Budget, TenantPolicy};

use super::keys::describe;

use crate::config::Config;

async fn js(config: &Config) -> anyhow::Result<async_nats::jetstream::Context> {
    let client = crate::nats::connect(&config.nats, "tenants").await?;
    Ok(async_nats::jetstream::new(client))
}

/// `retro-fleet tenants list`.
pub async fn list(config: &Config) -> anyhow::Result<()> {
    let rows = crate::ops::tenants::list(&js(config).await?).await?;
    println!("{:<24} {:>8}  budget", "tenant", "weight");
    for (tenant, p) in &rows {
        println!("{tenant:<24} {:>8}  {}", p.weight, describe(p.budget.as_ref()));
    }
    println!(
        "{} tenant(s) with settings in {}; every other tenant has weight 1 and no budget",
        rows.len(),
        subjects::TENANTS_BUCKET
    );
    Ok(())
}

/// `retro-fleet tenants set TENANT --weight W [--budget-tokens N ...]`.
pub async fn set(config: &Config, tenant: String, weight: f64, budget: Option<Budget>) -> anyhow::Result<()> {
    if !subjects::is_token(&tenant) {
        anyhow::bail!("the tenant must be characters from [A-Za-z0-9_-]");
    }
    let policy = TenantPolicy { weight, budget };
    policy.check().map_err(|m| anyhow::anyhow!("{m}"))?;
    crate::ops::tenants::set(&js(config).await?, &tenant, &policy).await?;
    println!(
        "tenant `{tenant}`: weight {weight}, {} (workers and ingresses apply it within moments)",
        describe(budget.as_ref())
    );
    Ok(())
}
