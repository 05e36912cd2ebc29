//! Cache purges: a new generation per model in the KV bucket `fleet_models`,
//! which every worker follows (`retro-fleet cache purge` and the admin API).

use anyhow::Context as _;
use bytes::Bytes;
use retro_fleet_schemas::subjects;

/// Gives each of `models` (every `configured` model when it is empty) a new
/// cache generation: every worker stops serving the model's earlier answers
/// at once (they age out of memory and disk). Returns each model with its
/// new generation.
pub async fn purge(
    js: &async_nats::jetstream::Context,
    configured: &std::collections::BTreeSet<String>,
    models: Vec<String>,
) -> anyhow::Result<Vec<(String, String)>> {
    let models = if models.is_empty() { configured.iter().cloned().collect() } else { models };
    if let Some(m) = models.iter().find(|m| !configured.contains(*m)) {
        anyhow::bail!("model `{m}` is not configured; configured: {configured:?}");
    }
    let kv = js.get_key_value(subjects::MODELS_BUCKET).await.with_context(|| {
        format!("KV bucket {} is missing (run `retro-fleet topology apply`)", subjects::MODELS_BUCKET)
    })?;
    let mut out = Vec::new();
    for m in models {
        let generation = ulid::Ulid::new().to_string();
        kv.put(&m, Bytes::from(generation.clone())).await.with_context(|| format!("purging `{m}`"))?;
        out.push((m, generation));
    }
    Ok(out)
}
