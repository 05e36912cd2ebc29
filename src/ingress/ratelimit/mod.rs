//! Rate limits per caller and route class, in requests and in tokens per
//! window, kept in process or shared by every ingress through NATS KV.
//!
//! - [`algo`]: token bucket, sliding window and fixed window as pure
//!   functions of a counter and the time.
//! - [`kv`]: counters in the KV bucket `fleet_ratelimit`, updated with
//!   compare-and-swap on the entry's revision, so replicas share one limit.
//! - [`logins`]: failed credentials per peer address (in process).
//! - this file: settings, the in-process store, and the headers.
//!
//! The caller is the credential (`key:<id>`, `jwt:<sub>`) or its tenant
//! (`key_by`). Request limits are checked before the body is read; token
//! limits when the request is known, with an estimate of its tokens (prompt
//! bytes / 4 + `max_tokens`, or the model's default when unset), charged
//! up front.

pub mod algo;
pub mod kv;
pub mod logins;

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::{HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};

pub use algo::{Algorithm, Counter, Decision, Rule};

use super::auth::Principal;
use super::error::{ApiError, IngressCode};

/// Route classes, each with its own limits (and role).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    /// Sending requests.
    Submit,
    /// Reading results and models.
    Read,
    /// Admin routes.
    Admin,
}

impl RouteClass {
    /// As used in counter keys.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteClass::Submit => "submit",
            RouteClass::Read => "read",
            RouteClass::Admin => "admin",
        }
    }
}

/// Where counters live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// In this process: each ingress replica limits on its own.
    Local,
    /// In the NATS KV bucket `fleet_ratelimit`, shared by every replica.
    Nats,
}

/// Who a counter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyBy {
    /// Each API key or token subject.
    Credential,
    /// All credentials of a tenant together.
    Tenant,
}

/// Limits of one route class; 0 turns a limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassLimits {
    /// Requests per window.
    pub requests: u64,
    /// Token bucket size for requests (0: `requests`).
    pub burst: u64,
    /// Estimated tokens per window (prompt bytes / 4 + max_tokens).
    pub tokens: u64,
}

impl Default for ClassLimits {
    fn default() -> Self {
        ClassLimits { requests: 0, burst: 0, tokens: 0 }
    }
}

/// `[ingress.rate_limit]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Whether limits apply.
    pub enabled: bool,
    /// `token_bucket`, `sliding_window` or `fixed_window`.
    pub algorithm: Algorithm,
    /// `local` (per process) or `nats` (shared through KV `fleet_ratelimit`).
    pub backend: Backend,
    /// `credential` or `tenant`.
    pub key_by: KeyBy,
    /// Window length in seconds (60: the limits are per minute).
    pub window_secs: u64,
    /// Token estimate for a request that sets no `max_tokens`, to a model
    /// without a default of its own (echo); other models' defaults are
    /// their `default_max_tokens`.
    pub default_max_tokens: u64,
    /// Sending requests.
    pub submit: ClassLimits,
    /// Reading results and models.
    pub read: ClassLimits,
    /// Admin routes.
    pub admin: ClassLimits,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: false,
            algorithm: Algorithm::TokenBucket,
            backend: Backend::Local,
            key_by: KeyBy::Credential,
            window_secs: 60,
            default_max_tokens: 256,
            submit: ClassLimits { requests: 600, burst: 100, tokens: 200_000 },
            read: ClassLimits { requests: 6_000, burst: 1_000, tokens: 0 },
            admin: ClassLimits { requests: 600, burst: 100, tokens: 0 },
        }
    }
}

impl RateLimitConfig {
    /// How long an idle counter must be kept: until it would be full again.
    pub fn max_age_secs(&self) -> u64 {
        let windows = [self.submit, self.read, self.admin]
            .iter()
            .filter(|l| l.requests > 0)
            .map(|l| l.burst.div_ceil(l.requests))
            .max()
            .unwrap_or(0)
            .max(2);
        self.window_secs.max(1) * windows
    }
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Requests.
    Requests,
    /// Estimated tokens.
    Tokens,
}

impl Unit {
    fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "req",
            Unit::Tokens => "tok",
        }
    }
}

/// Counters in this process, with a clock that tokio can pause in tests.
pub struct LocalStore {
    counters: Mutex<HashMap<String, Counter>>,
    epoch: tokio::time::Instant,
}

/// More counters than this and idle ones are dropped.
const LOCAL_MAX_KEYS: usize = 100_000;

impl LocalStore {
    /// An empty store; its clock starts now.
    pub fn new() -> LocalStore {
        LocalStore { counters: Mutex::new(HashMap::new()), epoch: tokio::time::Instant::now() }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Checks `cost` against `rule` for `key`.
    pub fn check(&self, alg: Algorithm, rule: Rule, key: &str, cost: u64) -> Decision {
        let now = self.now_ms();
        let mut map = self.counters.lock().expect("rate-limit counters");
        if map.len() >= LOCAL_MAX_KEYS && !map.contains_key(key) {
            // anything untouched for two windows is full (or empty) again
            map.retain(|_, c| c.t + 2 * rule.window_ms > now);
        }
        match map.get_mut(key) {
            Some(c) => {
                let (counter, decision) = algo::check(alg, rule, Some(*c), now, cost);
                *c = counter;
                decision
            }
            None => {
                let (counter, decision) = algo::check(alg, rule, None, now, cost);
                map.insert(key.to_string(), counter);
                decision
            }
        }
    }
}

impl LocalStore {
    /// Corrects the charge of `key` made at `charged_unix_ms` by `delta`.
    fn settle(&self, alg: Algorithm, rule: Rule, key: &str, charged_unix_ms: u64, delta: i64) {
        let now = self.now_ms();
        // this store's clock starts at its creation: place the charge on it
        let ago = kv::unix_ms().saturating_sub(charged_unix_ms);
        let mut map = self.counters.lock().expect("rate-limit counters");
        if let Some(c) = map.get_mut(key) {
            *c = algo::settle(alg, rule, *c, now, now.saturating_sub(ago), delta);
        }
    }
}

impl Default for LocalStore {
    fn default() -> Self {
        LocalStore::new()
    }
}

enum Store {
    Local(LocalStore),
    Nats(kv::KvStore),
}

/// The ingress's limiter.
pub struct Limiter {
    cfg: RateLimitConfig,
    store: Store,
}

impl Limiter {
    /// A limiter with counters in this process.
    pub fn local(cfg: RateLimitConfig) -> Limiter {
        Limiter { cfg, store: Store::Local(LocalStore::new()) }
    }

    /// The configured limiter (opens `bucket` for the `nats` backend).
    pub async fn new(
        cfg: RateLimitConfig,
        js: &async_nats::jetstream::Context,
        bucket: async_nats::jetstream::kv::Config,
    ) -> anyhow::Result<Limiter> {
        let store = match cfg.backend {
            Backend::Local => Store::Local(LocalStore::new()),
            Backend::Nats if cfg.enabled => Store::Nats(kv::KvStore::open(js, bucket).await?),
            Backend::Nats => Store::Local(LocalStore::new()),
        };
        Ok(Limiter { cfg, store })
    }

    /// Whether limits apply.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// Token estimate for a request without `max_tokens`.
    pub fn default_max_tokens(&self) -> u64 {
        self.cfg.default_max_tokens
    }

    fn rule(&self, class: RouteClass, unit: Unit) -> Option<Rule> {
        let l = match class {
            RouteClass::Submit => self.cfg.submit,
            RouteClass::Read => self.cfg.read,
            RouteClass::Admin => self.cfg.admin,
        };
        let (limit, burst) = match unit {
            Unit::Requests => (l.requests, l.burst),
            Unit::Tokens => (l.tokens, 0),
        };
        (limit > 0).then_some(Rule { limit, burst, window_ms: self.cfg.window_secs.max(1) * 1000 })
    }

    /// Takes `cost` units for `who` on `class`. `None` when no limit
    /// applies; a refusal is returned as a decision with `allowed` false.
    pub async fn check(&self, who: &Principal, class: RouteClass, unit: Unit, cost: u64) -> Option<Decision> {
        if !self.cfg.enabled {
            return None;
        }
        let rule = self.rule(class, unit)?;
        let key = self.key(class, unit, &who.id, &who.tenant);
        match &self.store {
            Store::Local(s) => Some(s.check(self.cfg.algorithm, rule, &key, cost)),
            Store::Nats(s) => match s.check(self.cfg.algorithm, rule, &key, cost).await {
                Ok(d) => Some(d),
                Err(e) => {
                    // NATS trouble must not take the API down with it; the
                    // request is let through and the failure logged.
                    tracing::warn!(error = %e, "distributed rate limit unavailable; request let through");
                    None
                }
            },
        }
    }
}

impl Limiter {
    /// The counter of `class` and `unit` for a caller: by credential or by
    /// tenant (`key_by`).
    fn key(&self, class: RouteClass, unit: Unit, caller: &str, tenant: &str) -> String {
        let owner = match self.cfg.key_by {
            KeyBy::Credential => caller,
            KeyBy::Tenant => tenant,
        };
        format!("{}.{}.{owner}", class.as_str(), unit.as_str())
    }

    /// Settles a request's up-front token charge, made at `charged_at_ms`
    /// (unix), to what it really used: gives back an overestimate, takes a
    /// shortfall (as far as the counter allows).
    pub async fn settle(&self, caller: &str, tenant: &str, charged_at_ms: u64, estimate: u64, actual: u64) {
        let delta = actual as i64 - estimate as i64;
        let Some(rule) = self.rule(RouteClass::Submit, Unit::Tokens).filter(|_| self.cfg.enabled && delta != 0) else {
            return;
        };
        let key = self.key(RouteClass::Submit, Unit::Tokens, caller, tenant);
        match &self.store {
            Store::Local(s) => s.settle(self.cfg.algorithm, rule, &key, charged_at_ms, delta),
            Store::Nats(s) => {
                if let Err(e) = s.settle(self.cfg.algorithm, rule, &key, charged_at_ms, delta).await {
                    tracing::warn!(error = %e, "settling a token charge failed; the estimate stands");
                }
            }
        }
    }
}

/// `X-RateLimit-*` headers of a decision (`Reset` in seconds from now).
pub fn headers(d: &Decision, unit: Unit) -> [(&'static str, String); 3] {
    let prefix = match unit {
        Unit::Requests => ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"],
        Unit::Tokens => ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"],
    };
    [
        (prefix[0], d.limit.to_string()),
        (prefix[1], d.remaining.to_string()),
        (prefix[2], d.reset_ms.div_ceil(1000).to_string()),
    ]
}

/// Adds the headers of `d` to a response.
pub fn add_headers(h: &mut HeaderMap, d: &Decision, unit: Unit) {
    for (name, value) in headers(d, unit) {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
}

/// The 429 of a refusal: `Retry-After` in whole seconds (at least 1).
pub fn refusal(d: &Decision, unit: Unit) -> ApiError {
    let what = match unit {
        Unit::Requests => "requests",
        Unit::Tokens => "tokens",
    };
    let secs = d.retry_after_ms.div_ceil(1000).max(1);
    let mut e = ApiError::new(
        IngressCode::RateLimited,
        format!("rate limit of {} {what} exceeded; retry in {secs} s", d.limit),
    )
    .retry_after(secs);
    for (name, value) in headers(d, unit) {
        e = e.header(name, value);
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::auth::Roles;

    fn who(id: &str, tenant: &str) -> Principal {
        Principal::new(id, tenant, Roles::ALL)
    }

    fn cfg(alg: Algorithm, key_by: KeyBy) -> RateLimitConfig {
        RateLimitConfig {
            enabled: true,
            algorithm: alg,
            key_by,
            window_secs: 10,
            submit: ClassLimits { requests: 5, burst: 2, tokens: 100 },
            read: ClassLimits { requests: 0, burst: 0, tokens: 0 },
            ..Default::default()
        }
    }

    async fn passes(l: &Limiter, p: &Principal, class: RouteClass, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            if l.check(p, class, Unit::Requests, 1).await.is_none_or(|d| d.allowed) {
                ok += 1;
            }
        }
        ok
    }

    #[tokio::test(start_paused = true)]
    async fn local_token_bucket_on_a_paused_clock() {
        let l = Limiter::local(cfg(Algorithm::TokenBucket, KeyBy::Credential));
        let a = who("key:a", "t");
        assert_eq!(passes(&l, &a, RouteClass::Submit, 10).await, 2, "the burst");
        // 5 per 10 s: one every 2 s
        tokio::time::advance(std::time::Duration::from_millis(1_999)).await;
        assert_eq!(passes(&l, &a, RouteClass::Submit, 3).await, 0);
        tokio::time::advance(std::time::Duration::from_millis(1)).await;
        assert_eq!(passes(&l, &a, RouteClass::Submit, 3).await, 1);
        // another credential has its own bucket; a class without limits is unlimited
        assert_eq!(passes(&l, &who("key:b", "t"), RouteClass::Submit, 10).await, 2);
        assert_eq!(passes(&l, &a, RouteClass::Read, 50).await, 50);
    }

    #[tokio::test(start_paused = true)]
    async fn local_fixed_window_by_tenant() {
        let l = Limiter::local(cfg(Algorithm::FixedWindow, KeyBy::Tenant));
        let (a, b) = (who("key:a", "t"), who("key:b", "t"));
        assert_eq!(passes(&l, &a, RouteClass::Submit, 3).await + passes(&l, &b, RouteClass::Submit, 3).await, 5);
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        assert_eq!(passes(&l, &b, RouteClass::Submit, 9).await, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn token_limits_count_tokens_and_refuse_with_retry_after() {
        let l = Limiter::local(cfg(Algorithm::SlidingWindow, KeyBy::Credential));
        let a = who("key:a", "t");
        assert!(l.check(&a, RouteClass::Submit, Unit::Tokens, 60).await.unwrap().allowed);
        let d = l.check(&a, RouteClass::Submit, Unit::Tokens, 41).await.unwrap();
        assert!(!d.allowed);
        assert_eq!(d.remaining, 40);
        let e = refusal(&d, Unit::Tokens);
        assert_eq!(e.http_status(), 429);
        assert_eq!(e.retry_after, Some(11), "the next window, once 1 of the 60 has slid out");
        assert!(l.check(&a, RouteClass::Submit, Unit::Tokens, 40).await.unwrap().allowed);
    }

    #[tokio::test]
    async fn disabled_limits_nothing() {
        let l = Limiter::local(RateLimitConfig::default());
        assert_eq!(passes(&l, &who("key:a", "t"), RouteClass::Submit, 1000).await, 1000);
    }
}
