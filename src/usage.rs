//! Reading metered usage: the records of `FLEET_USAGE` (one per answered
//! request, see [`retro_fleet_schemas::usage`]) in a range of days, added
//! up by the dimensions asked for. `GET /v1/usage` and `retro-fleet usage`
//! both read through [`read`].
//!
//! It reads every record from the first day on (an ordered consumer
//! filtered by tenant and model): fine for days and thousands of requests
//! a day; a month of a busy fleet takes as long as reading its records.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::jetstream::Context;
use futures::StreamExt;
use retro_fleet_schemas::usage::UsageRecord;
use retro_fleet_schemas::{codec, subjects, CacheTier, Status};
use serde::Serialize;

/// A dimension usage is grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Dim {
    /// The tenant.
    Tenant,
    /// The credential (`key:<id>`, `jwt:...`; empty for NATS publishers).
    Key,
    /// The model.
    Model,
    /// The UTC day.
    Day,
}

impl Dim {
    /// `tenant,key,model,day` (any order, any subset) → dimensions.
    pub fn parse_list(s: &str) -> Result<Vec<Dim>, String> {
        let mut dims = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let dim = match part {
                "tenant" => Dim::Tenant,
                "key" => Dim::Key,
                "model" => Dim::Model,
                "day" => Dim::Day,
                other => return Err(format!("`{other}` is not a dimension: use tenant, key, model, day")),
            };
            if !dims.contains(&dim) {
                dims.push(dim);
            }
        }
        dims.sort();
        Ok(dims)
    }
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Only this tenant.
    pub tenant: Option<String>,
    /// Only this credential.
    pub key: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// First day (UTC), inclusive.
    pub from: Option<time::Date>,
    /// Last day (UTC), inclusive.
    pub to: Option<time::Date>,
    /// Dimensions to group by (none: one row for everything).
    pub group_by: Vec<Dim>,
}

/// Usage added up over one group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Row {
    /// Tenant, when grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Credential, when grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Model, when grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// UTC day (`YYYY-MM-DD`), when grouped by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    /// Requests answered.
    pub requests: u64,
    /// Of which failed.
    pub failed: u64,
    /// Of which answered from a cache (or by sharing an identical request's computation).
    pub cached: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Both.
    pub total_tokens: u64,
}

/// Why usage could not be read.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    /// The stream is missing or did not answer.
    #[error("reading FLEET_USAGE failed: {0} (is metering on? run `retro-fleet topology apply`)")]
    Stream(String),
}

/// `YYYY-MM-DD` → a date.
pub fn parse_day(s: &str) -> Option<time::Date> {
    let mut parts = s.trim().splitn(3, '-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    let month = time::Month::try_from(m.parse::<u8>().ok()?).ok()?;
    time::Date::from_calendar_date(y.parse().ok()?, month, d.parse().ok()?).ok()
}

fn day_of(at_ms: u64) -> time::Date {
    time::OffsetDateTime::from_unix_timestamp((at_ms / 1000) as i64).map_or(time::Date::MIN, |t| t.date())
}

/// The usage `q` asks for, one row per group, in the order of the groups.
pub async fn read(js: &Context, q: &Query) -> Result<Vec<Row>, UsageError> {
    let stream = js.get_stream(subjects::USAGE_STREAM).await.map_err(|e| UsageError::Stream(e.to_string()))?;
    let filter = subjects::usage(q.tenant.as_deref().unwrap_or("*"), q.model.as_deref().unwrap_or("*"));
    let deliver_policy = match q.from {
        // a record is written when its request is answered: a day's records
        // start at its midnight (UTC)
        Some(d) => DeliverPolicy::ByStartTime { start_time: d.midnight().assume_utc() },
        None => DeliverPolicy::All,
    };
    let mut consumer = stream
        .create_consumer(consumer::pull::OrderedConfig { filter_subject: filter, deliver_policy, ..Default::default() })
        .await
        .map_err(|e| UsageError::Stream(e.to_string()))?;
    let mut left = consumer.info().await.map_err(|e| UsageError::Stream(e.to_string()))?.num_pending;
    let mut groups: BTreeMap<[Option<String>; 4], Row> = BTreeMap::new();
    if left > 0 {
        let mut messages = consumer.messages().await.map_err(|e| UsageError::Stream(e.to_string()))?;
        while left > 0 {
            let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
            let msg = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(UsageError::Stream(e.to_string())),
                Ok(None) | Err(_) => return Err(UsageError::Stream("the stream stopped answering".into())),
            };
            left -= 1;
            let Ok(r) = codec::decode::<UsageRecord>(None, &msg.payload) else { continue };
            // the stream's time and a record's `at_ms` may straddle a
            // midnight by the write's milliseconds: the record's day decides
            let day = day_of(r.at_ms);
            let outside = q.from.is_some_and(|f| day < f) || q.to.is_some_and(|t| day > t);
            if outside || q.key.as_deref().is_some_and(|k| k != r.caller) {
                continue;
            }
            add(&mut groups, &q.group_by, &r, day);
        }
    }
    Ok(groups.into_values().collect())
}

fn add(groups: &mut BTreeMap<[Option<String>; 4], Row>, by: &[Dim], r: &UsageRecord, day: time::Date) {
    let pick = |d: Dim, v: String| by.contains(&d).then_some(v);
    let key = [
        pick(Dim::Tenant, r.tenant.clone()),
        pick(Dim::Key, r.caller.clone()),
        pick(Dim::Model, r.model.clone()),
        pick(Dim::Day, day.to_string()),
    ];
    let row = groups.entry(key.clone()).or_default();
    [row.tenant, row.key, row.model, row.day] = key;
    row.requests += 1;
    row.failed += u64::from(r.status == Status::Error);
    row.cached += u64::from(r.cache != CacheTier::None);
    row.prompt_tokens += u64::from(r.prompt_tokens);
    row.completion_tokens += u64::from(r.completion_tokens);
    row.total_tokens += u64::from(r.prompt_tokens) + u64::from(r.completion_tokens);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_and_dimensions_parse_and_bad_ones_say_why() {
        assert_eq!(parse_day("2026-12-03").unwrap().to_string(), "2026-12-03");
        assert!(parse_day("2026-13-01").is_none() && parse_day("yesterday").is_none());
        assert_eq!(Dim::parse_list("day, tenant,day").unwrap(), [Dim::Tenant, Dim::Day]);
        assert!(Dim::parse_list("tenant,colour").unwrap_err().contains("`colour`"));
        assert_eq!(day_of(1_796_256_000_000).to_string(), "2026-12-03");
    }
}
