//! `retro-fleet keys`: API keys kept in the KV bucket `fleet_api_keys`,
//! which every ingress with `ingress.auth.kv_keys` follows live. A key is
//! made here, shown once, and stored only as its SHA-256.

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use retro_fleet_schemas::{subjects, Budget, Priority};

use crate::config::Config;
use crate::ingress::auth::{hash_key, ApiKeyConfig, Role};

async fn bucket(config: &Config) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    let client = crate::nats::connect(&config.nats, "keys").await?;
    let js = async_nats::jetstream::new(client);
    let want = crate::topology::ingress_bucket(&config.topology_plan(), subjects::API_KEYS_BUCKET);
    crate::topology::open_bucket(&js, want).await
}

/// Parses a role name for the command line.
pub fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("unknown role `{s}` (submit, read or admin)"))
}

/// A new random key: 32 bytes from the system's generator, URL-safe base64.
fn new_key() -> anyhow::Result<String> {
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| anyhow::anyhow!("no system randomness"))?;
    Ok(format!("rf_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)))
}

/// `retro-fleet keys add ID --tenant T --roles R,... [--max-priority P]
/// [--max-batch-priority P] [--budget-tokens N ...]`: prints the new key once.
pub async fn add(
    config: &Config,
    id: String,
    tenant: String,
    roles: Vec<Role>,
    (max_priority, max_batch_priority): (Option<Priority>, Option<Priority>),
    budget: Option<Budget>,
) -> anyhow::Result<()> {
    if !subjects::is_token(&id) || !subjects::is_token(&tenant) {
        anyhow::bail!("the key id and tenant must be characters from [A-Za-z0-9_-]");
    }
    if roles.is_empty() {
        anyhow::bail!("give the key at least one role: --roles submit,read (or admin)");
    }
    let kv = bucket(config).await?;
    let key = new_key()?;
    let entry = ApiKeyConfig {
        id: id.clone(),
        sha256: hash_key(&key),
        tenant,
        roles,
        max_priority,
        max_batch_priority,
        budget,
    };
    kv.create(&id, Bytes::from(serde_json::to_vec(&entry)?))
        .await
        .with_context(|| format!("key id `{id}` is taken (revoke it first to replace it)"))?;
    println!("{key}");
    eprintln!("added API key `{id}`; the key above is shown only now (the fleet keeps its SHA-256)");
    Ok(())
}

/// `retro-fleet keys budget ID [--budget-tokens N] [--budget-requests N]
/// [--budget-per day|month]`: replaces the key's own budget (none given:
/// removes it), keeping the rest of its entry.
pub async fn set_budget(config: &Config, id: String, budget: Option<Budget>) -> anyhow::Result<()> {
    let kv = bucket(config).await?;
    let Some(entry) = kv.entry(&id).await?.filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put) else {
        anyhow::bail!("no key `{id}` in {} (see `retro-fleet keys list`)", subjects::API_KEYS_BUCKET);
    };
    let mut key: ApiKeyConfig =
        serde_json::from_slice(&entry.value).with_context(|| format!("key `{id}` is unreadable; revoke and add it"))?;
    key.budget = budget;
    kv.update(&id, Bytes::from(serde_json::to_vec(&key)?), entry.revision)
        .await
        .with_context(|| format!("key `{id}` changed meanwhile; run the command again"))?;
    println!("API key `{id}`: {} (ingresses apply it within moments)", describe(budget.as_ref()));
    Ok(())
}

/// A budget as people read it: `1000 tokens, 50 requests per day`.
pub fn describe(budget: Option<&Budget>) -> String {
    let Some(b) = budget else { return "no budget".into() };
    let limits: Vec<String> = [(b.tokens, "token"), (b.requests, "request")]
        .into_iter()
        .filter_map(|(n, what)| n.map(|n| format!("{n} {what}{}", if n == 1 { "" } else { "s" })))
        .collect();
    format!("{} per {}", limits.join(", "), b.per.as_str())
}

/// `retro-fleet keys list`: ids, tenants, roles and budgets (never hashes).
pub async fn list(config: &Config) -> anyhow::Result<()> {
    let kv = bucket(config).await?;
    let mut keys = kv.keys().await?;
    let mut rows = Vec::new();
    while let Some(id) = keys.next().await {
        let id = id?;
        if let Some(v) = kv.get(&id).await? {
            match serde_json::from_slice::<ApiKeyConfig>(&v) {
                Ok(k) => rows.push((
                    k.id,
                    k.tenant,
                    k.roles.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(","),
                    describe(k.budget.as_ref()),
                )),
                Err(e) => rows.push((id, "?".into(), format!("unreadable: {e}"), String::new())),
            }
        }
    }
    rows.sort();
    println!("{:<24} {:<16} {:<20} budget", "id", "tenant", "roles");
    for (id, tenant, roles, budget) in &rows {
        println!("{id:<24} {tenant:<16} {roles:<20} {budget}");
    }
    println!("{} key(s) in {}", rows.len(), subjects::API_KEYS_BUCKET);
    Ok(())
}

/// `retro-fleet keys revoke ID`.
pub async fn revoke(config: &Config, id: String) -> anyhow::Result<()> {
    let kv = bucket(config).await?;
    if kv.get(&id).await?.is_none() {
        anyhow::bail!("no key `{id}` in {} (see `retro-fleet keys list`)", subjects::API_KEYS_BUCKET);
    }
    kv.delete(&id).await.with_context(|| format!("revoking `{id}`"))?;
    println!("revoked API key `{id}`");
    Ok(())
}
