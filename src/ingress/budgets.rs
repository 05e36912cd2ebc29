//! Budgets: what a tenant (KV `fleet_tenants`) or an API key (its entry)
//! may use per UTC day or month, counted from the metered usage, the same
//! records `GET /v1/usage` adds up.
//!
//! Every ingress follows `FLEET_USAGE` from the start of the month and
//! keeps, per tenant and per credential, the requests and tokens of the
//! current day and month ([`Budgets::fold`]). A request is admitted when
//! what was used, plus the estimates of this ingress's requests not yet
//! metered ("held"), plus its own estimate stays within every budget that
//! applies; otherwise it is refused with 429 `budget_exceeded` and the time
//! the budget resets. Its usage record, when it arrives, replaces the
//! estimate by the real count, and gives the rate limiter what it needs to
//! settle its up-front charge ([`Settled`]).
//!
//! Each ingress holds only its own requests' estimates, so concurrent
//! requests on several ingresses can pass a budget by what they have in
//! flight together: the overshoot is bounded by one request's tokens per
//! concurrent request, and never grows after the records arrive.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, DeliverPolicy};
use async_nats::jetstream::Context;
use futures::StreamExt;
use retro_fleet_schemas::usage::UsageRecord;
use retro_fleet_schemas::{codec, subjects, Budget, Period, TenantPolicy};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::auth::Principal;
use super::error::{ApiError, IngressCode};

/// An estimate not replaced by its record within this long is dropped (the
/// request was refused after admission, or its record was lost).
const HOLD_TTL: Duration = Duration::from_secs(600);

/// Whose use a budget counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Owner {
    Tenant(String),
    Caller(String),
}

impl Owner {
    fn describe(&self) -> String {
        match self {
            Owner::Tenant(t) => format!("tenant `{t}`"),
            Owner::Caller(c) => format!("credential `{c}`"),
        }
    }
}

/// Requests and tokens of one period.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Tally {
    /// The period's start, unix ms.
    start_ms: u64,
    requests: u64,
    tokens: u64,
}

impl Tally {
    /// Adds `(requests, tokens)` used at `at_ms` in `period`: a later
    /// period starts the tally again, an earlier one is not this one's.
    fn add(&mut self, period: Period, at_ms: u64, requests: u64, tokens: u64) {
        let (start, _) = period.bounds(at_ms);
        if start > self.start_ms {
            *self = Tally { start_ms: start, requests: 0, tokens: 0 };
        }
        if start == self.start_ms {
            self.requests += requests;
            self.tokens += tokens;
        }
    }

    /// `(requests, tokens)` counted in the period holding `now_ms`.
    fn at(&self, period: Period, now_ms: u64) -> (u64, u64) {
        if period.bounds(now_ms).0 == self.start_ms {
            (self.requests, self.tokens)
        } else {
            (0, 0)
        }
    }
}

/// What an owner used this day and this month.
#[derive(Debug, Clone, Copy, Default)]
struct Spent {
    day: Tally,
    month: Tally,
}

impl Spent {
    fn get(&self, period: Period) -> Tally {
        match period {
            Period::Day => self.day,
            Period::Month => self.month,
        }
    }

    fn tally(&mut self, period: Period) -> &mut Tally {
        match period {
            Period::Day => &mut self.day,
            Period::Month => &mut self.month,
        }
    }
}

/// One admitted request's estimate, until its record arrives.
#[derive(Debug, Clone)]
struct Hold {
    owners: Vec<Owner>,
    tokens: u64,
    /// Who was charged for it, for the rate limiter.
    caller: String,
    tenant: String,
    at: tokio::time::Instant,
    at_unix_ms: u64,
}

/// A request's real tokens against the estimate charged when it was
/// admitted: what the rate limiter settles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    /// The credential charged.
    pub caller: String,
    /// Its tenant.
    pub tenant: String,
    /// The estimate charged, tokens.
    pub estimate: u64,
    /// What the request used, tokens.
    pub actual: u64,
    /// When it was charged, unix ms.
    pub charged_at_ms: u64,
}

/// Why a request is refused: the first budget it would pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    owner: String,
    what: &'static str,
    limit: u64,
    used: u64,
    asked: u64,
    per: Period,
    reset_ms: u64,
    now_ms: u64,
}

impl Exceeded {
    /// The 429 `budget_exceeded`, with `Retry-After` and `X-Budget-Reset`
    /// at the next period's start.
    pub fn refusal(&self) -> ApiError {
        let reset = reset_time(self.reset_ms);
        let message = format!(
            "{} has used {} of its budget of {} {} per {} (UTC), and this request needs {} more: the budget resets at \
             {reset} (or ask an operator for a larger one)",
            self.owner,
            self.used,
            self.limit,
            self.what,
            self.per.as_str(),
            self.asked
        );
        ApiError::new(IngressCode::BudgetExceeded, message)
            .retry_after(self.reset_ms.saturating_sub(self.now_ms).div_ceil(1000).max(1))
            .header("x-budget-reset", reset)
    }
}

/// `2027-01-01T00:00:00Z`: a period boundary (always a UTC midnight).
fn reset_time(ms: u64) -> String {
    let date = time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64).map_or(time::Date::MIN, |t| t.date());
    format!("{date}T00:00:00Z")
}

#[derive(Debug, Default)]
struct Books {
    spent: HashMap<Owner, Spent>,
    /// Estimates held per owner: (requests, tokens).
    held: HashMap<Owner, (u64, u64)>,
    /// By usage message id (`<tenant>/<request id>`).
    holds: HashMap<String, Hold>,
}

impl Books {
    fn unhold(&mut self, key: &str) -> Option<Hold> {
        let h = self.holds.remove(key)?;
        for o in &h.owners {
            if let Some(held) = self.held.get_mut(o) {
                held.0 = held.0.saturating_sub(1);
                held.1 = held.1.saturating_sub(h.tokens);
                if *held == (0, 0) {
                    self.held.remove(o);
                }
            }
        }
        Some(h)
    }
}

/// The ledger of one ingress.
#[derive(Debug, Default)]
pub struct Budgets {
    books: Mutex<Books>,
    tenants: Mutex<HashMap<String, Budget>>,
}

impl Budgets {
    /// An empty ledger.
    pub fn new() -> Budgets {
        Budgets::default()
    }

    /// Sets (or with `None` removes) a tenant's budget.
    pub fn set_tenant(&self, tenant: &str, budget: Option<Budget>) {
        let mut t = self.tenants.lock().expect("tenant budgets");
        match budget {
            Some(b) => t.insert(tenant.to_string(), b),
            None => t.remove(tenant),
        };
    }

    /// Admits `items` (`(request id, estimated tokens)`, each metered as a
    /// request of `tenant`) sent by `who` at `now_ms`, holding their
    /// estimates, or says which budget they would pass.
    pub fn admit(&self, who: &Principal, tenant: &str, items: &[(String, u64)], now_ms: u64) -> Result<(), Exceeded> {
        let requests = items.len() as u64;
        let tokens = items.iter().fold(0u64, |s, (_, t)| s.saturating_add(*t));
        let tenant_budget = self.tenants.lock().expect("tenant budgets").get(tenant).copied();
        let owners = owners(who, tenant);
        let budgets = [(&owners[0], tenant_budget), (&owners[1], who.budget)];
        let mut books = self.books.lock().expect("budget books");
        for (owner, budget) in budgets.iter().filter_map(|(o, b)| b.map(|b| (*o, b))) {
            let spent = books.spent.get(owner).copied().unwrap_or_default();
            let (used_requests, used_tokens) = spent.get(budget.per).at(budget.per, now_ms);
            let (held_requests, held_tokens) = books.held.get(owner).copied().unwrap_or_default();
            let checks = [
                (budget.requests, "requests", used_requests + held_requests, requests),
                (budget.tokens, "tokens", used_tokens + held_tokens, tokens),
            ];
            for (limit, what, used, asked) in checks {
                if let Some(limit) = limit.filter(|&l| used.saturating_add(asked) > l) {
                    let reset_ms = budget.per.bounds(now_ms).1;
                    let owner = owner.describe();
                    return Err(Exceeded { owner, what, limit, used, asked, per: budget.per, reset_ms, now_ms });
                }
            }
        }
        let at = tokio::time::Instant::now();
        for (id, est) in items {
            let key = subjects::usage_msg_id(tenant, id);
            if books.holds.contains_key(&key) {
                // the same request again (a retry within the duplicate
                // window): metered once, held once
                continue;
            }
            for o in &owners {
                let held = books.held.entry(o.clone()).or_default();
                held.0 += 1;
                held.1 += est;
            }
            let hold = Hold {
                owners: owners.clone(),
                tokens: *est,
                caller: who.id.clone(),
                tenant: tenant.to_string(),
                at,
                at_unix_ms: now_ms,
            };
            books.holds.insert(key, hold);
        }
        Ok(())
    }

    /// Drops the estimates of requests that were admitted but never sent.
    pub fn release(&self, tenant: &str, ids: &[&str]) {
        let mut books = self.books.lock().expect("budget books");
        for id in ids {
            books.unhold(&subjects::usage_msg_id(tenant, id));
        }
    }

    /// Counts one usage record; the settlement of its estimate when this
    /// ingress admitted it.
    pub fn fold(&self, r: &UsageRecord) -> Option<Settled> {
        let tokens = u64::from(r.prompt_tokens) + u64::from(r.completion_tokens);
        let mut books = self.books.lock().expect("budget books");
        let mut owners = vec![Owner::Tenant(r.tenant.clone())];
        if !r.caller.is_empty() {
            owners.push(Owner::Caller(r.caller.clone()));
        }
        for o in owners {
            let spent = books.spent.entry(o).or_default();
            for period in [Period::Day, Period::Month] {
                spent.tally(period).add(period, r.at_ms, 1, tokens);
            }
        }
        let h = books.unhold(&subjects::usage_msg_id(&r.tenant, &r.id))?;
        Some(Settled {
            caller: h.caller,
            tenant: h.tenant,
            estimate: h.tokens,
            actual: tokens,
            charged_at_ms: h.at_unix_ms,
        })
    }

    /// Drops estimates held longer than [`HOLD_TTL`].
    fn expire(&self) {
        let mut books = self.books.lock().expect("budget books");
        let stale: Vec<String> =
            books.holds.iter().filter(|(_, h)| h.at.elapsed() > HOLD_TTL).map(|(k, _)| k.clone()).collect();
        for k in stale {
            books.unhold(&k);
        }
    }
}

/// The owners a request is counted against: its tenant, then its
/// credential (as its usage record names them).
fn owners(who: &Principal, tenant: &str) -> Vec<Owner> {
    vec![Owner::Tenant(tenant.to_string()), Owner::Caller(who.id.clone())]
}

/// Why the ledger could not start.
#[derive(Debug, thiserror::Error)]
#[error("reading FLEET_USAGE for budgets failed: {0}")]
pub struct LedgerError(String);

/// Reads this month's usage records into `budgets`, then spawns the task
/// that follows the stream (and `fleet_tenants` for tenants' budgets) until
/// `stop`, sending each settlement to `settle`. Returns once the month so
/// far is counted.
pub async fn start(
    js: Context,
    budgets: std::sync::Arc<Budgets>,
    settle: mpsc::UnboundedSender<Settled>,
    stop: CancellationToken,
) -> Result<(), LedgerError> {
    let (tx, mut policies) = mpsc::unbounded_channel::<(String, TenantPolicy)>();
    tokio::spawn(retro_fleet_worker::tenants::follow(js.clone(), tx, stop.clone()));
    let tenants = budgets.clone();
    tokio::spawn(async move {
        while let Some((tenant, p)) = policies.recv().await {
            tenants.set_tenant(&tenant, p.budget);
        }
    });
    let now = retro_fleet_worker::unix_ms();
    let month = Period::Month.bounds(now).0;
    let start =
        time::OffsetDateTime::from_unix_timestamp((month / 1000) as i64).map_err(|e| LedgerError(e.to_string()))?;
    let mut reader = Reader { js, policy: DeliverPolicy::ByStartTime { start_time: start }, last_seq: 0 };
    let started = std::time::Instant::now();
    let read = reader.catch_up(&budgets, &settle).await?;
    tracing::info!(records = read, ms = started.elapsed().as_millis() as u64, "budgets: this month's usage counted");
    tokio::spawn(async move {
        tokio::select! {
            _ = reader.follow(&budgets, &settle) => {}
            _ = stop.cancelled() => {}
        }
    });
    Ok(())
}

/// An ordered consumer over `FLEET_USAGE`, started again after the last
/// record read when it fails.
struct Reader {
    js: Context,
    policy: DeliverPolicy,
    last_seq: u64,
}

impl Reader {
    async fn consumer(&self) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>, LedgerError> {
        let stream = self.js.get_stream(subjects::USAGE_STREAM).await.map_err(|e| LedgerError(e.to_string()))?;
        let deliver_policy = match self.last_seq {
            0 => self.policy,
            seq => DeliverPolicy::ByStartSequence { start_sequence: seq + 1 },
        };
        stream
            .create_consumer(consumer::pull::OrderedConfig { deliver_policy, ..Default::default() })
            .await
            .map_err(|e| LedgerError(e.to_string()))
    }

    fn take(
        &mut self,
        msg: &async_nats::jetstream::Message,
        budgets: &Budgets,
        settle: &mpsc::UnboundedSender<Settled>,
    ) {
        if let Ok(info) = msg.info() {
            self.last_seq = info.stream_sequence;
        }
        if let Ok(r) = codec::decode::<UsageRecord>(None, &msg.payload) {
            if let Some(s) = budgets.fold(&r) {
                let _ = settle.send(s);
            }
        }
    }

    /// Reads every record stored now; how many.
    async fn catch_up(
        &mut self,
        budgets: &Budgets,
        settle: &mpsc::UnboundedSender<Settled>,
    ) -> Result<u64, LedgerError> {
        let mut consumer = self.consumer().await?;
        let pending = consumer.info().await.map_err(|e| LedgerError(e.to_string()))?.num_pending;
        if pending == 0 {
            return Ok(0);
        }
        let mut messages = consumer.messages().await.map_err(|e| LedgerError(e.to_string()))?;
        for _ in 0..pending {
            match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Ok(Some(Ok(m))) => self.take(&m, budgets, settle),
                Ok(Some(Err(e))) => return Err(LedgerError(e.to_string())),
                Ok(None) | Err(_) => return Err(LedgerError("the stream stopped answering".into())),
            }
        }
        Ok(pending)
    }

    /// Follows new records for as long as the task runs.
    async fn follow(&mut self, budgets: &Budgets, settle: &mpsc::UnboundedSender<Settled>) {
        let mut sweep = tokio::time::interval(Duration::from_secs(30));
        loop {
            match self.consumer().await {
                Ok(consumer) => match consumer.messages().await {
                    Ok(mut messages) => loop {
                        tokio::select! {
                            next = messages.next() => match next {
                                Some(Ok(m)) => self.take(&m, budgets, settle),
                                Some(Err(e)) => {
                                    tracing::warn!(error = %e, "budgets: reading usage failed; starting again");
                                    break;
                                }
                                None => break,
                            },
                            _ = sweep.tick() => budgets.expire(),
                        }
                    },
                    Err(e) => tracing::warn!(error = %e, "budgets: reading usage failed; retrying"),
                },
                Err(e) => tracing::warn!(error = %e, "budgets: no usage stream; retrying"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use retro_fleet_schemas::{CacheTier, Status};

    const DEC3: u64 = 1_796_282_700_000; // 2026-12-03T07:25:00Z
    const DAY: u64 = 86_400_000;

    fn record(id: &str, tenant: &str, caller: &str, at_ms: u64, tokens: u32) -> UsageRecord {
        UsageRecord {
            v: 1,
            id: id.into(),
            tenant: tenant.into(),
            caller: caller.into(),
            model: "tiny".into(),
            at_ms,
            status: Status::Ok,
            cache: CacheTier::None,
            prompt_tokens: tokens / 2,
            completion_tokens: tokens - tokens / 2,
        }
    }

    fn who(id: &str, budget: Option<Budget>) -> Principal {
        Principal { budget, ..Principal::new(id, "acme", Default::default()) }
    }

    fn items(ids: &[(&str, u64)]) -> Vec<(String, u64)> {
        ids.iter().map(|(i, t)| (i.to_string(), *t)).collect()
    }

    #[test]
    fn a_tenant_budget_counts_records_and_held_estimates_and_says_when_it_resets() {
        let b = Budgets::new();
        b.set_tenant("acme", Some(Budget { tokens: Some(100), requests: None, per: Period::Day }));
        let app = who("key:app", None);
        // yesterday's use is not today's
        b.fold(&record("old", "acme", "key:app", DEC3 - DAY, 90));
        b.fold(&record("r1", "acme", "key:app", DEC3, 60));
        assert!(b.admit(&app, "acme", &items(&[("r2", 30)]), DEC3).is_ok(), "60 + 30 ≤ 100");
        // r2 is held at its estimate until its record arrives
        let e = b.admit(&app, "acme", &items(&[("r3", 20)]), DEC3).unwrap_err();
        assert_eq!((e.used, e.asked, e.limit, e.what), (90, 20, 100, "tokens"));
        assert_eq!(reset_time(e.reset_ms), "2026-12-04T00:00:00Z");
        let refusal = e.refusal();
        assert_eq!(refusal.code.as_str(), "budget_exceeded");
        assert!(refusal.message.contains("tenant `acme` has used 90 of its budget of 100 tokens per day"));
        // r2 used 5 of its 30: the limiter gets the difference, the budget the real count
        let s = b.fold(&record("r2", "acme", "key:app", DEC3, 5)).unwrap();
        assert_eq!((s.estimate, s.actual, s.caller.as_str()), (30, 5, "key:app"));
        assert!(b.admit(&app, "acme", &items(&[("r3", 20)]), DEC3).is_ok(), "65 + 20 ≤ 100");
        // another tenant is not counted; tomorrow starts again
        assert!(b.admit(&who("key:x", None), "globex", &items(&[("g", 1000)]), DEC3).is_ok());
        assert!(b.admit(&app, "acme", &items(&[("r4", 80)]), DEC3 + DAY).is_ok());
    }

    #[test]
    fn a_key_budget_in_requests_per_month_and_holds_released_or_repeated() {
        let b = Budgets::new();
        let key = who("key:small", Some(Budget { tokens: None, requests: Some(2), per: Period::Month }));
        assert!(b.admit(&key, "acme", &items(&[("a", 1), ("b", 1), ("c", 1)]), DEC3).is_err(), "3 > 2 at once");
        assert!(b.admit(&key, "acme", &items(&[("a", 1)]), DEC3).is_ok());
        assert!(b.admit(&key, "acme", &items(&[("a", 1)]), DEC3).is_ok(), "the same id again is held once");
        assert!(b.admit(&key, "acme", &items(&[("b", 1)]), DEC3).is_ok());
        let e = b.admit(&key, "acme", &items(&[("c", 1)]), DEC3).unwrap_err();
        assert_eq!((e.what, e.owner.as_str()), ("requests", "credential `key:small`"));
        assert_eq!(reset_time(e.reset_ms), "2027-01-01T00:00:00Z");
        b.release("acme", &["b"]);
        assert!(b.admit(&key, "acme", &items(&[("c", 1)]), DEC3).is_ok(), "b was never sent");
        // another key of the same tenant has no budget of its own
        assert!(b.admit(&who("key:big", None), "acme", &items(&[("d", 1)]), DEC3).is_ok());
    }
}
