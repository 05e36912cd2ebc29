//! `retro-fleet submit`: one request over NATS, its result printed.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use retro_fleet_schemas::{
    codec, headers, subjects, Envelope, InferRequest, InferResult, Input, Priority, SamplingParams,
};

use crate::config::Config;

/// `retro-fleet submit`.
pub async fn submit(
    config: &Config,
    model: String,
    priority: Priority,
    max_tokens: Option<u32>,
    timeout: u64,
    prompt: String,
) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "submit").await?;
    let js = async_nats::jetstream::new(client.clone());
    let req = InferRequest {
        v: retro_fleet_schemas::SCHEMA_VERSION,
        id: ulid::Ulid::new().to_string(),
        model,
        adapter: None,
        input: Input::Completion { prompt },
        params: SamplingParams { max_tokens, ..Default::default() },
        stream: false,
        cache: Default::default(),
        tenant: None,
        metadata: Default::default(),
    };
    let reply = client.new_inbox();
    let mut sub = client.subscribe(reply.clone()).await?;
    // past the wait, a worker answers `deadline_exceeded` instead of running it
    let deadline = retro_fleet_worker::unix_ms() + timeout.saturating_mul(1000);
    let h = Envelope::new(req.id.as_str()).reply(reply.as_str()).deadline_ms(deadline).headers();
    js.publish_with_headers(subjects::request(priority, &req.model), h, codec::encode(&req).into())
        .await?
        .await
        .context("the request streams refused the request (run `retro-fleet topology apply`?)")?;
    let wait = async {
        while let Some(m) = sub.next().await {
            let kind = m.headers.as_ref().and_then(|h| h.get(headers::KIND)).map(|v| v.as_str().to_string());
            if kind.as_deref() == Some(headers::KIND_RESULT) {
                return codec::decode::<InferResult>(None, &m.payload).map_err(anyhow::Error::from);
            }
        }
        anyhow::bail!("subscription closed")
    };
    let result = tokio::time::timeout(Duration::from_secs(timeout), wait)
        .await
        .with_context(|| format!("no result within {timeout} s for request {} (is a worker running?)", req.id))??;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}
