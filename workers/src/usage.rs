//! Metering: the one place an answered request's usage is written to
//! `FLEET_USAGE` (see [`retro_fleet_schemas::usage`]) and counted in
//! `fleet_tokens_total`. Workers meter the results they store; an ingress
//! the answers it gives from its memory. In one process (`up`) both share
//! one [`Meter`].

use std::collections::HashSet;
use std::sync::Mutex;

use async_nats::jetstream::context::PublishError;
use prometheus::{IntCounterVec, Opts, Registry};
use retro_fleet_schemas::usage::{self, UsageRecord};
use retro_fleet_schemas::{CacheTier, InferResult};

use crate::metrics::registered;

/// The `tenant` label of tenants past the cap.
pub const OTHER_TENANTS: &str = "other";

/// Writes usage records and counts their tokens.
pub struct Meter {
    js: async_nats::jetstream::Context,
    /// `fleet_tokens_total{tenant,model,kind}`: `kind` is `prompt` or
    /// `completion` for computed answers, `cached` for both of an answer
    /// from a cache.
    tokens: IntCounterVec,
    tenants: TenantLabels,
}

/// The `tenant` label of each tenant: its own for the first `max` seen,
/// [`OTHER_TENANTS`] for the rest (the label cap of `fleet_tokens_total`).
struct TenantLabels {
    seen: Mutex<HashSet<String>>,
    max: usize,
}

impl TenantLabels {
    fn label<'a>(&self, tenant: &'a str) -> &'a str {
        let mut seen = self.seen.lock().expect("tenant labels");
        if seen.contains(tenant) {
            return tenant;
        }
        if seen.len() < self.max {
            seen.insert(tenant.to_string());
            return tenant;
        }
        OTHER_TENANTS
    }
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").field("max_tenants", &self.tenants.max).finish_non_exhaustive()
    }
}

impl Meter {
    /// A meter writing through `js`, its counter on `registry`; the first
    /// `max_tenants` tenants it sees get a label each, the rest share
    /// [`OTHER_TENANTS`].
    pub fn new(
        js: async_nats::jetstream::Context,
        registry: &Registry,
        max_tenants: usize,
    ) -> prometheus::Result<Meter> {
        let tokens = registered(
            registry,
            IntCounterVec::new(
                Opts::new("fleet_tokens_total", "Tokens of answered requests, metered once per request"),
                &["tenant", "model", "kind"],
            )?,
        )?;
        Ok(Meter { js, tokens, tenants: TenantLabels { seen: Mutex::new(HashSet::new()), max: max_tenants } })
    }

    /// Writes the usage record of `result`, answered to `caller` in
    /// `tenant`, and waits until it is stored; its tokens are counted when
    /// it is the request's first record.
    pub async fn record(&self, result: &InferResult, tenant: &str, caller: Option<&str>) -> Result<(), PublishError> {
        let record = UsageRecord::of(result, tenant, caller, crate::clock::unix_ms());
        if usage::publish(&self.js, &record).await? {
            self.count(&record);
        }
        Ok(())
    }

    fn count(&self, r: &UsageRecord) {
        let tenant = self.tenants.label(&r.tenant);
        let add = |kind: &str, n: u32| {
            if n > 0 {
                self.tokens.with_label_values(&[tenant, &r.model, kind]).inc_by(u64::from(n));
            }
        };
        match r.cache {
            CacheTier::None => {
                add("prompt", r.prompt_tokens);
                add("completion", r.completion_tokens);
            }
            _ => add("cached", r.prompt_tokens.saturating_add(r.completion_tokens)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_past_the_cap_share_one_label() {
        let tenants = TenantLabels { seen: Mutex::new(HashSet::new()), max: 2 };
        let labels: Vec<_> = ["a", "b", "c", "a", "d"].iter().map(|t| tenants.label(t).to_string()).collect();
        assert_eq!(labels, ["a", "b", "other", "a", "other"]);
    }
}
