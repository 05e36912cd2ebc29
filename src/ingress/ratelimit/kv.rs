//! Counters shared by every ingress replica in the NATS KV bucket
//! `fleet_ratelimit`.
//!
//! A check reads the counter's entry, applies the algorithm at the wall
//! clock, and writes the new counter only if the entry still has the
//! revision it read (`update` with the revision, `create` for a new key).
//! A replica that lost the race reads again. A refusal writes nothing: the
//! algorithms derive the same state from the old counter and a later time.
//! Entries expire once they would be full again, so idle callers cost no
//! space.
//!
//! One counter takes one write per NATS round trip, so a busy caller's
//! checks are served from a **lease**: this replica takes several units at
//! once from the shared counter (one compare-and-swap) and spends them
//! locally for up to [`LEASE_TTL`]. Lease sizes adapt per counter: they
//! start at the request's own cost (an idle caller is counted exactly, one
//! write per check), double each time a lease is used up before it ends,
//! halve when one ends unused, and never exceed 1/16 of the counter's
//! capacity. Every unit spent was first taken from the shared counter, so
//! the limit holds across replicas (accepted <= limit + burst). What a
//! lease did not spend is lost when it lapses (up to 1/16 of the capacity
//! each time, less as leases halve after a lapse): a bursty caller close
//! to its limit can be refused before it reaches it. Refunding unspent
//! credit is not built. Checks that still contend retry for up to half a
//! second and are then refused (429).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::algo::{self, Algorithm, Counter, Decision, Rule};

/// The bucket's name (part of the NATS topology).
pub const BUCKET: &str = retro_fleet_schemas::subjects::RATELIMIT_BUCKET;

/// How long a check under contention keeps retrying before it refuses.
const MAX_WAIT: Duration = Duration::from_millis(500);
/// How long leased credit may be spent locally.
pub const LEASE_TTL: Duration = Duration::from_millis(250);

/// Units taken ahead from a shared counter, spent in this replica.
struct Lease {
    /// Units left to spend.
    credit: u64,
    /// Units of the last lease taken.
    size: u64,
    /// Spendable until then.
    until: tokio::time::Instant,
    /// The shared counter's answer when it was taken.
    decision: Decision,
}

/// Size of the next lease of a counter of `capacity`, for a check of
/// `cost`, after `last` = (size, credit left, whether it ended) of the
/// previous one: doubles when it was used up in time, halves when it
/// lapsed unspent, within cost..=max(cost, capacity / 16).
pub fn next_lease(last: Option<(u64, u64, bool)>, cost: u64, capacity: u64) -> u64 {
    let max = (capacity / 16).max(cost).max(1);
    let size = match last {
        None => cost,
        Some((size, credit, ended)) if !ended && credit < cost => size.saturating_mul(2),
        Some((size, credit, _)) if credit > 0 => size / 2,
        Some((size, _, _)) => size,
    };
    size.clamp(cost.max(1), max)
}

/// Counters in NATS KV.
pub struct KvStore {
    kv: kv::Store,
    /// One check per counter at a time from this process: concurrent
    /// requests of one caller queue here instead of racing each other's
    /// compare-and-swap (only other replicas can then win a race).
    turns: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Leases per counter.
    leases: std::sync::Mutex<HashMap<String, Lease>>,
}

pub(super) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The KV key of a counter key `class.unit.owner`: the owner (an API key id
/// or a token subject, any text) is hashed so every key is a valid KV key.
pub fn kv_key(key: &str) -> String {
    let mut parts = key.splitn(3, '.');
    let (class, unit, owner) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let digest = Sha256::digest(owner.as_bytes());
    format!("{class}.{unit}.{}", crate::ingress::auth::to_hex(&digest[..16]))
}

impl KvStore {
    /// Opens the bucket (see [`crate::topology::ingress_buckets`]),
    /// creating it when missing.
    pub async fn open(js: &async_nats::jetstream::Context, bucket: kv::Config) -> anyhow::Result<KvStore> {
        let kv = crate::topology::open_bucket(js, bucket).await?;
        Ok(KvStore { kv, turns: Default::default(), leases: Default::default() })
    }

    /// Spends `cost` from a live lease of `key`, if it has that much.
    fn spend(&self, key: &str, cost: u64) -> Option<Decision> {
        let mut leases = self.leases.lock().expect("rate-limit leases");
        let l = leases.get_mut(key)?;
        if l.credit < cost || tokio::time::Instant::now() >= l.until {
            return None;
        }
        l.credit -= cost;
        Some(Decision { remaining: l.decision.remaining + l.credit, ..l.decision })
    }

    /// Checks `cost` against `rule` for `key`, across replicas: from this
    /// replica's lease when it has credit, else by taking a new lease (or
    /// exactly `cost` when the counter has less than a lease left).
    pub async fn check(&self, alg: Algorithm, rule: Rule, key: &str, cost: u64) -> anyhow::Result<Decision> {
        let key = kv_key(key);
        if let Some(d) = self.spend(&key, cost) {
            return Ok(d);
        }
        let turn = self.turn(&key);
        let _turn = turn.lock().await;
        // another request of this caller may have taken a lease meanwhile
        if let Some(d) = self.spend(&key, cost) {
            return Ok(d);
        }
        let now = tokio::time::Instant::now();
        let last = self.leases.lock().expect("rate-limit leases").get(&key).map(|l| (l.size, l.credit, now >= l.until));
        let size = next_lease(last, cost, rule.capacity(alg));
        if size > cost {
            let d = self.take(alg, rule, &key, size).await?;
            if d.allowed {
                let lease = Lease { credit: size - cost, size, until: now + LEASE_TTL, decision: d };
                let d = Decision { remaining: d.remaining + lease.credit, ..d };
                self.leases.lock().expect("rate-limit leases").insert(key, lease);
                return Ok(d);
            }
        }
        let d = self.take(alg, rule, &key, cost).await?;
        let mut leases = self.leases.lock().expect("rate-limit leases");
        if leases.len() > 10_000 {
            leases.retain(|_, l| l.until > now);
        }
        leases.insert(key, Lease { credit: 0, size: cost, until: now + LEASE_TTL, decision: d });
        Ok(d)
    }

    fn turn(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().expect("rate-limit turns");
        if turns.len() > 10_000 {
            // drop the locks nobody holds or waits on
            turns.retain(|_, m| Arc::strong_count(m) > 1);
        }
        turns.entry(key.to_string()).or_default().clone()
    }

    /// Takes `cost` units from the shared counter `key` (compare-and-swap).
    async fn take(&self, alg: Algorithm, rule: Rule, key: &str, cost: u64) -> anyhow::Result<Decision> {
        let mut refused = None;
        let written = self
            .swap(key, |state, now| {
                let (counter, decision) = algo::check(alg, rule, state, now, cost);
                refused = (!decision.allowed).then_some(decision);
                decision.allowed.then_some((counter, decision))
            })
            .await?;
        // Could not get a turn: refuse rather than let an unbounded crowd through.
        let busy =
            Decision { allowed: false, limit: rule.capacity(alg), remaining: 0, reset_ms: 1000, retry_after_ms: 1000 };
        Ok(written.or(refused).unwrap_or(busy))
    }

    /// Corrects a charge of `key` made at `charged_ms` by `delta` units
    /// ([`algo::settle`]); a counter no longer stored has nothing to correct.
    pub async fn settle(
        &self,
        alg: Algorithm,
        rule: Rule,
        key: &str,
        charged_ms: u64,
        delta: i64,
    ) -> anyhow::Result<()> {
        let key = kv_key(key);
        self.swap(&key, |state, now| state.map(|c| (algo::settle(alg, rule, c, now, charged_ms, delta), ()))).await?;
        Ok(())
    }

    /// Replaces counter `key` by what `next` makes of it (None: leaves it),
    /// by compare-and-swap, trying again while other replicas write first
    /// (for up to [`MAX_WAIT`]). What `next` returned with the value
    /// written; None when it left the counter or every try lost.
    async fn swap<T>(
        &self,
        key: &str,
        mut next: impl FnMut(Option<Counter>, u64) -> Option<(Counter, T)>,
    ) -> anyhow::Result<Option<T>> {
        let give_up = tokio::time::Instant::now() + MAX_WAIT;
        let mut attempt: u64 = 0;
        while tokio::time::Instant::now() < give_up {
            attempt += 1;
            let entry = self.kv.entry(key).await?;
            let (state, revision) = match entry {
                Some(e) if e.operation == Operation::Put => {
                    (serde_json::from_slice::<Counter>(&e.value).ok(), Some(e.revision))
                }
                _ => (None, None),
            };
            let Some((counter, out)) = next(state, unix_ms()) else { return Ok(None) };
            let value = Bytes::from(serde_json::to_vec(&counter)?);
            let lost = match revision {
                Some(rev) => match self.kv.update(key, value, rev).await {
                    Ok(_) => false,
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => true,
                    Err(e) => return Err(e.into()),
                },
                None => match self.kv.create(key, value).await {
                    Ok(_) => false,
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => true,
                    Err(e) => return Err(e.into()),
                },
            };
            if !lost {
                return Ok(Some(out));
            }
            // another replica wrote first: back off a little, by a varying amount
            let jitter =
                (SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) % 500) as u64;
            tokio::time::sleep(Duration::from_micros(jitter * attempt.min(16))).await;
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::next_lease;

    #[test]
    fn leases_start_exact_grow_when_used_up_and_shrink_when_they_lapse() {
        assert_eq!(next_lease(None, 1, 1000), 1, "a first check is exact");
        assert_eq!(next_lease(Some((1, 0, false)), 1, 1000), 2, "used up in time: double");
        assert_eq!(next_lease(Some((32, 0, false)), 1, 1000), 62, "at most capacity / 16");
        assert_eq!(next_lease(Some((32, 5, true)), 1, 1000), 16, "lapsed unspent: halve");
        assert_eq!(next_lease(Some((32, 0, true)), 1, 1000), 32, "spent, then ended: keep");
        assert_eq!(next_lease(Some((1, 0, true)), 1, 1000), 1);
        assert_eq!(next_lease(Some((300, 0, false)), 300, 200_000), 600, "token costs double too");
        assert_eq!(next_lease(Some((4, 0, false)), 300, 200_000), 300, "never below the cost");
        assert_eq!(next_lease(Some((8, 0, false)), 1, 10), 1, "small capacities stay exact");
    }

    #[test]
    fn kv_keys_are_valid_and_distinct() {
        let a = super::kv_key("submit.req.jwt:user@example.com");
        let b = super::kv_key("submit.req.jwt:user@example.org");
        assert!(a.starts_with("submit.req.") && a.len() == "submit.req.".len() + 32);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'.'));
    }
}
