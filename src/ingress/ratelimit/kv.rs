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
//! One counter takes one write per NATS round trip: a single caller with
//! many requests in flight gets a few thousand checks per second; beyond
//! that, checks retry for up to half a second and are then refused (429).

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

/// Counters in NATS KV.
pub struct KvStore {
    kv: kv::Store,
    /// One check per counter at a time from this process: concurrent
    /// requests of one caller queue here instead of racing each other's
    /// compare-and-swap (only other replicas can then win a race).
    turns: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn unix_ms() -> u64 {
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
        Ok(KvStore { kv: crate::topology::open_bucket(js, bucket).await?, turns: Default::default() })
    }

    /// Checks `cost` against `rule` for `key`, atomically across replicas.
    pub async fn check(&self, alg: Algorithm, rule: Rule, key: &str, cost: u64) -> anyhow::Result<Decision> {
        let key = kv_key(key);
        let turn = {
            let mut turns = self.turns.lock().expect("rate-limit turns");
            if turns.len() > 10_000 {
                // drop the locks nobody holds or waits on
                turns.retain(|_, m| Arc::strong_count(m) > 1);
            }
            turns.entry(key.clone()).or_default().clone()
        };
        let _turn = turn.lock().await;
        let give_up = tokio::time::Instant::now() + MAX_WAIT;
        let mut attempt: u64 = 0;
        while tokio::time::Instant::now() < give_up {
            attempt += 1;
            let entry = self.kv.entry(key.as_str()).await?;
            let (state, revision) = match entry {
                Some(e) if e.operation == Operation::Put => {
                    (serde_json::from_slice::<Counter>(&e.value).ok(), Some(e.revision))
                }
                _ => (None, None),
            };
            let (counter, decision) = algo::check(alg, rule, state, unix_ms(), cost);
            if !decision.allowed {
                return Ok(decision);
            }
            let value = Bytes::from(serde_json::to_vec(&counter)?);
            let lost = match revision {
                Some(rev) => match self.kv.update(key.as_str(), value, rev).await {
                    Ok(_) => false,
                    Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => true,
                    Err(e) => return Err(e.into()),
                },
                None => match self.kv.create(key.as_str(), value).await {
                    Ok(_) => false,
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => true,
                    Err(e) => return Err(e.into()),
                },
            };
            if !lost {
                return Ok(decision);
            }
            // another replica wrote first: back off a little, by a varying amount
            let jitter =
                (SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) % 500) as u64;
            tokio::time::sleep(Duration::from_micros(jitter * attempt.min(16))).await;
        }
        // Could not get a turn: refuse rather than let an unbounded crowd through.
        Ok(Decision { allowed: false, limit: rule.capacity(alg), remaining: 0, reset_ms: 1000, retry_after_ms: 1000 })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kv_keys_are_valid_and_distinct() {
        let a = super::kv_key("submit.req.jwt:user@example.com");
        let b = super::kv_key("submit.req.jwt:user@example.org");
        assert!(a.starts_with("submit.req.") && a.len() == "submit.req.".len() + 32);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'.'));
    }
}
