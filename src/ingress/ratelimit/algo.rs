//! The three limiting algorithms as pure functions of a small counter state
//! and the time, so the in-process and the NATS KV backends share them and
//! tests can drive them with any clock. All arithmetic is in integers:
//! boundaries are exact.

use serde::{Deserialize, Serialize};

/// How requests (or tokens) are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// A bucket of `burst` tokens (or `limit` when `burst` is 0) refilled at
    /// `limit` per window: smooth, allows bursts up to the bucket size.
    TokenBucket,
    /// Windows aligned on multiples of the window length; the previous
    /// window's count is weighted by how much of it still overlaps the last
    /// window length (the sliding-window counter).
    SlidingWindow,
    /// At most `limit` in each window aligned on multiples of its length.
    FixedWindow,
}

/// One limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Units per window (0: unlimited).
    pub limit: u64,
    /// Token bucket size (0: `limit`); ignored by the window algorithms.
    pub burst: u64,
    /// Window length in ms.
    pub window_ms: u64,
}

impl Rule {
    /// Largest number of units ever available at once.
    pub fn capacity(&self, alg: Algorithm) -> u64 {
        match alg {
            Algorithm::TokenBucket if self.burst > 0 => self.burst,
            _ => self.limit,
        }
    }
}

/// The state of one counter. Token bucket: `t` = time of the last update,
/// `n` = tokens × `window_ms` (so refilling `limit` per window adds exactly
/// `limit` per ms). Windows: `t` = start of the current window, `n` = its
/// count, `p` = the previous window's count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    /// Time in ms (see the type).
    pub t: u64,
    /// Count (see the type).
    pub n: u64,
    /// Previous window's count (sliding window).
    #[serde(default)]
    pub p: u64,
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the units were granted (and taken).
    pub allowed: bool,
    /// `X-RateLimit-Limit`: the most units available at once.
    pub limit: u64,
    /// `X-RateLimit-Remaining` after this check.
    pub remaining: u64,
    /// ms until the counter is back to full (`X-RateLimit-Reset`).
    pub reset_ms: u64,
    /// When refused: ms until a retry of the same cost can pass.
    pub retry_after_ms: u64,
}

fn div_ceil(a: u128, b: u128) -> u64 {
    if b == 0 {
        return 0;
    }
    a.div_ceil(b).min(u64::MAX as u128) as u64
}

/// Takes `cost` units from `state` (None: never used) at `now_ms`, or
/// refuses and leaves the count as it was. Returns the new state.
pub fn check(alg: Algorithm, rule: Rule, state: Option<Counter>, now_ms: u64, cost: u64) -> (Counter, Decision) {
    let w = rule.window_ms.max(1) as u128;
    let limit = rule.limit as u128;
    let cost = cost as u128;
    match alg {
        Algorithm::TokenBucket => {
            let cap = rule.capacity(alg) as u128 * w;
            let (mut n, t) = match state {
                None => (cap, now_ms),
                Some(c) => {
                    let elapsed = now_ms.saturating_sub(c.t) as u128;
                    ((c.n as u128 + elapsed * limit).min(cap), now_ms.max(c.t))
                }
            };
            let need = cost * w;
            let allowed = n >= need;
            let retry_after_ms = if allowed {
                0
            } else if need > cap {
                // can never pass: tell the caller to wait a whole window
                rule.window_ms
            } else {
                div_ceil(need - n, limit)
            };
            if allowed {
                n -= need;
            }
            let counter = Counter { t, n: n as u64, p: 0 };
            let decision = Decision {
                allowed,
                limit: rule.capacity(alg),
                remaining: (n / w) as u64,
                reset_ms: div_ceil(cap - n, limit),
                retry_after_ms,
            };
            (counter, decision)
        }
        Algorithm::FixedWindow => {
            let start = now_ms - now_ms % w as u64;
            let n = match state {
                Some(c) if c.t == start => c.n as u128,
                _ => 0,
            };
            let reset_ms = start + w as u64 - now_ms;
            let allowed = n + cost <= limit;
            let n = if allowed { n + cost } else { n };
            let retry_after_ms = if allowed { 0 } else { reset_ms };
            let decision =
                Decision { allowed, limit: rule.limit, remaining: (limit - n) as u64, reset_ms, retry_after_ms };
            (Counter { t: start, n: n as u64, p: 0 }, decision)
        }
        Algorithm::SlidingWindow => {
            let start = now_ms - now_ms % w as u64;
            let (n, p) = match state {
                Some(c) if c.t == start => (c.n as u128, c.p as u128),
                Some(c) if c.t + w as u64 == start => (0, c.n as u128),
                _ => (0, 0),
            };
            let into = (now_ms - start) as u128;
            // estimate × w: the previous window weighted by its overlap
            let used = p * (w - into) + n * w;
            let allowed = used + cost * w <= limit * w;
            let n = if allowed { n + cost } else { n };
            let used = p * (w - into) + n * w;
            let remaining = ((limit * w).saturating_sub(used) / w) as u64;
            let reset_ms = (start + w as u64 - now_ms) + if n > 0 { w as u64 } else { 0 };
            let retry_after_ms = if allowed {
                0
            } else if cost > limit {
                rule.window_ms
            } else if n + cost <= limit && p > 0 {
                // wait until enough of the previous window has slid out:
                // p·(w - into - d) + (n + cost)·w ≤ limit·w
                let room = (limit - n - cost) * w;
                let overlap = p * (w - into);
                div_ceil(overlap - room, p)
            } else {
                // this window is full: in the next one it weighs as `p`
                let next_into = if n + cost > limit { div_ceil(n * w + cost * w - limit * w, n.max(1)) } else { 0 };
                (start + w as u64 - now_ms) + next_into
            };
            (
                Counter { t: start, n: n as u64, p: p as u64 },
                Decision { allowed, limit: rule.limit, remaining, reset_ms, retry_after_ms },
            )
        }
    }
}

/// Corrects a charge made at `charged_ms` by `delta` units (negative: give
/// back what an estimate took beyond the real cost; positive: take what it
/// fell short), at `now_ms`. A bucket takes and gives within 0..=capacity;
/// a window corrects only the count of the window the charge was made in
/// (a window since ended has nothing left to correct).
pub fn settle(alg: Algorithm, rule: Rule, state: Counter, now_ms: u64, charged_ms: u64, delta: i64) -> Counter {
    let w = rule.window_ms.max(1);
    let moved = |n: u64, units: u64| if delta >= 0 { n.saturating_add(units) } else { n.saturating_sub(units) };
    match alg {
        Algorithm::TokenBucket => {
            let cap = rule.capacity(alg) as u128 * w as u128;
            let elapsed = now_ms.saturating_sub(state.t) as u128;
            let n = (state.n as u128 + elapsed * rule.limit as u128).min(cap);
            let units = delta.unsigned_abs() as u128 * w as u128;
            // a bucket holds tokens: a give-back adds, a shortfall takes
            let n = if delta >= 0 { n.saturating_sub(units) } else { (n + units).min(cap) };
            Counter { t: now_ms.max(state.t), n: n as u64, p: 0 }
        }
        Algorithm::FixedWindow | Algorithm::SlidingWindow => {
            let charged = charged_ms - charged_ms % w;
            if charged == state.t {
                Counter { n: moved(state.n, delta.unsigned_abs()), ..state }
            } else if alg == Algorithm::SlidingWindow && charged + w == state.t {
                Counter { p: moved(state.p, delta.unsigned_abs()), ..state }
            } else {
                state
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `times` checks of cost 1 at `now`; returns how many passed.
    fn burst(alg: Algorithm, rule: Rule, state: &mut Option<Counter>, now: u64, times: u64) -> u64 {
        let mut ok = 0;
        for _ in 0..times {
            let (c, d) = check(alg, rule, *state, now, 1);
            *state = Some(c);
            ok += d.allowed as u64;
        }
        ok
    }

    #[test]
    fn token_bucket_grants_the_burst_then_the_rate_exactly() {
        let rule = Rule { limit: 10, burst: 5, window_ms: 1000 };
        let alg = Algorithm::TokenBucket;
        let mut s = None;
        assert_eq!(burst(alg, rule, &mut s, 1_000, 8), 5, "a full bucket holds `burst`");
        // 10 per second: one token every 100 ms, exactly
        assert_eq!(burst(alg, rule, &mut s, 1_099, 1), 0);
        assert_eq!(burst(alg, rule, &mut s, 1_100, 2), 1);
        let (_, d) = check(alg, rule, s, 1_150, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 50);
        // a long pause refills to the bucket size, not beyond
        assert_eq!(burst(alg, rule, &mut s, 60_000, 100), 5);
        let (_, d) = check(alg, rule, s, 60_000, 1);
        assert_eq!((d.remaining, d.limit, d.reset_ms), (0, 5, 500));
    }

    #[test]
    fn token_bucket_without_burst_holds_one_window() {
        let rule = Rule { limit: 3, burst: 0, window_ms: 60_000 };
        let mut s = None;
        assert_eq!(burst(Algorithm::TokenBucket, rule, &mut s, 0, 10), 3);
        assert_eq!(burst(Algorithm::TokenBucket, rule, &mut s, 19_999, 1), 0);
        assert_eq!(burst(Algorithm::TokenBucket, rule, &mut s, 20_000, 1), 1);
    }

    #[test]
    fn token_costs_above_one_and_above_capacity() {
        let rule = Rule { limit: 100, burst: 0, window_ms: 1000 };
        let (c, d) = check(Algorithm::TokenBucket, rule, None, 0, 60);
        assert!(d.allowed);
        assert_eq!(d.remaining, 40);
        let (_, d) = check(Algorithm::TokenBucket, rule, Some(c), 0, 41);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 10, "one token per 10 ms");
        let (_, d) = check(Algorithm::TokenBucket, rule, None, 0, 101);
        assert!(!d.allowed, "more than the bucket holds never passes");
        assert_eq!(d.retry_after_ms, 1000);
    }

    #[test]
    fn fixed_window_resets_exactly_at_the_boundary() {
        let rule = Rule { limit: 4, burst: 99, window_ms: 1000 };
        let alg = Algorithm::FixedWindow;
        let mut s = None;
        assert_eq!(burst(alg, rule, &mut s, 5_000, 6), 4);
        let (_, d) = check(alg, rule, s, 5_999, 1);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ms, 1);
        assert_eq!(burst(alg, rule, &mut s, 5_999, 1), 0);
        assert_eq!(burst(alg, rule, &mut s, 6_000, 6), 4, "a new window starts at 6000");
        // the known weakness: 4 at the end of one window, 4 at the start of the next
        let mut s = None;
        assert_eq!(burst(alg, rule, &mut s, 7_999, 9) + burst(alg, rule, &mut s, 8_000, 9), 8);
    }

    #[test]
    fn sliding_window_weights_the_previous_window() {
        let rule = Rule { limit: 4, burst: 0, window_ms: 1000 };
        let alg = Algorithm::SlidingWindow;
        let mut s = None;
        assert_eq!(burst(alg, rule, &mut s, 7_999, 9), 4);
        // at 8000 the previous window still weighs 4·1000/1000 = 4: nothing passes
        assert_eq!(burst(alg, rule, &mut s, 8_000, 9), 0);
        let (_, d) = check(alg, rule, s, 8_000, 1);
        assert_eq!(d.retry_after_ms, 250, "4·(1000-250)/1000 = 3 leaves room for one");
        assert_eq!(burst(alg, rule, &mut s, 8_249, 1), 0);
        assert_eq!(burst(alg, rule, &mut s, 8_250, 9), 1);
        // at 8500 the previous window weighs 2, this one has 1: one more
        assert_eq!(burst(alg, rule, &mut s, 8_500, 9), 1);
        // two windows later, the past is gone
        assert_eq!(burst(alg, rule, &mut s, 10_000, 9), 4);
    }

    #[test]
    fn zero_limit_refuses() {
        for alg in [Algorithm::TokenBucket, Algorithm::SlidingWindow, Algorithm::FixedWindow] {
            let (_, d) = check(alg, Rule { limit: 0, burst: 0, window_ms: 1000 }, None, 10, 1);
            assert!(!d.allowed, "{alg:?}");
        }
    }

    #[test]
    fn settling_gives_back_an_overestimate_and_takes_a_shortfall() {
        let rule = Rule { limit: 100, burst: 0, window_ms: 1000 };
        for alg in [Algorithm::TokenBucket, Algorithm::FixedWindow, Algorithm::SlidingWindow] {
            // an estimate of 90 leaves 10; the request used 20: 70 come back
            let (c, d) = check(alg, rule, None, 0, 90);
            assert_eq!(d.remaining, 10, "{alg:?}");
            let c = settle(alg, rule, c, 0, 0, 20 - 90);
            let (_, d) = check(alg, rule, Some(c), 0, 80);
            assert!(d.allowed && d.remaining == 0, "{alg:?}: 80 pass after the give-back");
            // a shortfall is taken: 10 estimated, 40 used, 60 left
            let (c, _) = check(alg, rule, None, 0, 10);
            let c = settle(alg, rule, c, 0, 0, 30);
            assert!(!check(alg, rule, Some(c), 0, 61).1.allowed, "{alg:?}");
            assert!(check(alg, rule, Some(c), 0, 60).1.allowed, "{alg:?}");
        }
        // a bucket never holds more than its capacity
        let (c, _) = check(Algorithm::TokenBucket, rule, None, 0, 10);
        let c = settle(Algorithm::TokenBucket, rule, c, 0, 0, -1000);
        assert_eq!(check(Algorithm::TokenBucket, rule, Some(c), 0, 0).1.remaining, 100);
        // a fixed window already over has nothing to give back
        let (c, _) = check(Algorithm::FixedWindow, rule, None, 1500, 50);
        assert_eq!(settle(Algorithm::FixedWindow, rule, c, 1500, 500, -50), c);
        // a sliding window corrects the previous window's count once it rolled
        let rolled = Counter { t: 1000, n: 5, p: 50 };
        assert_eq!(settle(Algorithm::SlidingWindow, rule, rolled, 1200, 900, -40).p, 10);
    }
}
