//! Failed credentials per peer address: the guard refuses an address that
//! sent too many in the current minute, before any credential is checked.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// Failed credentials per peer address, counted in aligned one-minute
/// windows: past the limit, the address is refused until its window ends.
pub struct FailedLogins {
    per_minute: u32,
    seen: Mutex<HashMap<IpAddr, (u64, u32)>>,
}

const MINUTE_MS: u64 = 60_000;
/// Addresses remembered before the stale ones are swept.
const SWEEP_AT: usize = 10_000;

impl FailedLogins {
    /// At most `per_minute` failures per address (0: no limit).
    pub fn new(per_minute: u32) -> FailedLogins {
        FailedLogins { per_minute, seen: Mutex::new(HashMap::new()) }
    }

    /// Seconds until `peer` may try again, when it is over its limit.
    pub fn blocked(&self, peer: IpAddr, now_ms: u64) -> Option<u64> {
        if self.per_minute == 0 {
            return None;
        }
        let window = now_ms / MINUTE_MS;
        match self.seen.lock().expect("failed logins lock").get(&peer) {
            Some(&(w, n)) if w == window && n >= self.per_minute => {
                Some(((window + 1) * MINUTE_MS - now_ms).div_ceil(1000))
            }
            _ => None,
        }
    }

    /// Counts a failure from `peer`.
    pub fn failed(&self, peer: IpAddr, now_ms: u64) {
        if self.per_minute == 0 {
            return;
        }
        let window = now_ms / MINUTE_MS;
        let mut seen = self.seen.lock().expect("failed logins lock");
        if seen.len() >= SWEEP_AT {
            seen.retain(|_, (w, _)| *w == window);
        }
        let entry = seen.entry(peer).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_its_failures_until_the_minute_ends() {
        let f = FailedLogins::new(3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t = 7 * MINUTE_MS + 15_000;
        for _ in 0..3 {
            assert_eq!(f.blocked(a, t), None);
            f.failed(a, t);
        }
        assert_eq!(f.blocked(a, t), Some(45), "refused for the rest of its minute");
        assert_eq!(f.blocked(b, t), None, "another address is not");
        assert_eq!(f.blocked(a, 8 * MINUTE_MS), None, "a new minute starts over");
        let off = FailedLogins::new(0);
        (0..100).for_each(|_| off.failed(a, t));
        assert_eq!(off.blocked(a, t), None);
    }
}
