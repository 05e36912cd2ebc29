//! Metered usage against what was stored: tallies per tenant of the
//! distinct results in `FLEET_RESULTS` and of `GET /v1/usage` rows.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use retro_fleet_schemas::{codec, subjects, InferResult};
use serde_json::Value;

/// `(requests, tokens)` per tenant.
pub type Tally = BTreeMap<String, (u64, u64)>;

/// Counts one request of `tokens` for `tenant`.
pub fn tally(t: &mut Tally, tenant: &str, tokens: u64) {
    let e = t.entry(tenant.to_string()).or_default();
    e.0 += 1;
    e.1 += tokens;
}

/// Every distinct result in `FLEET_RESULTS`, added up per tenant.
pub async fn stored(js: &async_nats::jetstream::Context) -> Tally {
    let stream = js.get_stream(subjects::RESULTS_STREAM).await.unwrap();
    let consumer =
        stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await.unwrap();
    let mut left = stream.get_info().await.unwrap().state.messages;
    let mut messages = consumer.messages().await.unwrap();
    let mut t = Tally::new();
    while left > 0 {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.unwrap().unwrap().unwrap();
        left -= 1;
        let tenant = m.subject.split('.').nth(2).unwrap().to_string();
        let r: InferResult = codec::decode(None, &m.payload).unwrap();
        tally(&mut t, &tenant, r.usage.map_or(0, |u| u64::from(u.total_tokens)));
    }
    t
}

/// `GET /v1/usage?group_by=tenant` as `(requests, tokens)` per tenant.
pub fn rows(v: &Value) -> Tally {
    let rows = v["data"].as_array().unwrap_or_else(|| panic!("{v}"));
    rows.iter()
        .map(|r| {
            let n = |f: &str| r[f].as_u64().unwrap();
            (r["tenant"].as_str().unwrap().to_string(), (n("requests"), n("total_tokens")))
        })
        .collect()
}
