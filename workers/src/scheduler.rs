//! Priority scheduling of free worker slots.
//!
//! NATS has no per-message priority, so each class has its own stream and the
//! worker decides which to pull from. Free slots go to high, then normal, then
//! low, except for a guaranteed share that normal and low earn every round:
//! under sustained high load, low still gets about `low_share` of the slots.
//! Shares accrue as fractional credit, so they hold even with one slot per
//! round; unused credit is capped at one round's share plus one slot so an idle class cannot
//! bank a burst.

use retro_fleet_schemas::Priority;

/// Decides, for each pull round, how many slots each priority may take.
#[derive(Debug, Clone)]
pub struct Scheduler {
    share: [f64; 3],
    credit: [f64; 3],
}

impl Scheduler {
    /// `normal_share` and `low_share` are fractions of slots (each clamped to 0..=0.5).
    pub fn new(normal_share: f64, low_share: f64) -> Self {
        let clamp = |s: f64| if s.is_finite() { s.clamp(0.0, 0.5) } else { 0.0 };
        Scheduler { share: [0.0, clamp(normal_share), clamp(low_share)], credit: [0.0; 3] }
    }

    /// The order in which to offer `slots` free slots: reserved shares
    /// first (low, then normal), then everyone in strict priority order.
    /// Each entry is a class and the most it may take at that step.
    pub fn plan(&mut self, slots: usize) -> Vec<(Priority, usize)> {
        let mut plan = Vec::with_capacity(5);
        let mut left = slots;
        for p in [Priority::Low, Priority::Normal] {
            let i = p.index();
            let earned = slots as f64 * self.share[i];
            self.credit[i] = (self.credit[i] + earned).min(earned + 1.0);
            // the epsilon keeps 10 × 0.1 from flooring to 0
            let reserved = ((self.credit[i] + 1e-9).floor() as usize).min(left);
            if reserved > 0 {
                plan.push((p, reserved));
                left -= reserved;
            }
        }
        for p in Priority::ALL {
            plan.push((p, slots));
        }
        plan
    }

    /// Records that `taken` slots went to class `p`.
    pub fn took(&mut self, p: Priority, taken: usize) {
        let i = p.index();
        self.credit[i] = (self.credit[i] - taken as f64).max(0.0);
    }
}

/// Runs one round of `plan` against per-class availability, the way the
/// worker does: each step takes `min(step cap, slots left, available)`.
/// Returns what each class got. Used by tests and by the worker's doc example.
pub fn simulate_round(s: &mut Scheduler, slots: usize, available: &mut [usize; 3]) -> [usize; 3] {
    let mut got = [0usize; 3];
    let mut left = slots;
    for (p, cap) in s.plan(slots) {
        let n = cap.min(left).min(available[p.index()]);
        available[p.index()] -= n;
        got[p.index()] += n;
        left -= n;
        s.took(p, n);
        if left == 0 {
            break;
        }
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &mut Scheduler, rounds: usize, slots: usize, available: [usize; 3]) -> [usize; 3] {
        let mut total = [0; 3];
        for _ in 0..rounds {
            let mut avail = available;
            let got = simulate_round(s, slots, &mut avail);
            for i in 0..3 {
                total[i] += got[i];
            }
        }
        total
    }

    #[test]
    fn high_first_when_lower_classes_have_no_share() {
        let mut s = Scheduler::new(0.0, 0.0);
        assert_eq!(run(&mut s, 10, 8, [100, 100, 100]), [80, 0, 0]);
    }

    #[test]
    fn low_gets_its_share_under_sustained_high_load() {
        let mut s = Scheduler::new(0.2, 0.1);
        let total = run(&mut s, 1000, 64, [usize::MAX / 4; 3]);
        let all: usize = total.iter().sum();
        assert_eq!(all, 64_000);
        let low = total[2] as f64 / all as f64;
        let normal = total[1] as f64 / all as f64;
        assert!((0.09..=0.11).contains(&low), "low share {low}");
        assert!((0.19..=0.21).contains(&normal), "normal share {normal}");
    }

    #[test]
    fn share_holds_with_one_slot_per_round() {
        let mut s = Scheduler::new(0.0, 0.1);
        let total = run(&mut s, 1000, 1, [usize::MAX / 4; 3]);
        assert_eq!(total[0] + total[2], 1000);
        assert!((95..=105).contains(&total[2]), "low got {}", total[2]);
    }

    #[test]
    fn unused_share_goes_to_others() {
        let mut s = Scheduler::new(0.2, 0.1);
        // nothing low or normal waiting: high takes every slot
        assert_eq!(run(&mut s, 10, 10, [1000, 0, 0]), [100, 0, 0]);
        // nothing high waiting: low takes every slot
        assert_eq!(run(&mut s, 10, 10, [0, 0, 1000]), [0, 0, 100]);
    }

    #[test]
    fn idle_class_cannot_bank_a_burst() {
        let mut s = Scheduler::new(0.0, 0.5);
        run(&mut s, 100, 4, [1000, 0, 0]);
        // 100 idle rounds earned low no more than one round's share plus a slot
        let mut avail = [1000, 0, 1000];
        assert_eq!(simulate_round(&mut s, 4, &mut avail), [1, 0, 3]);
        assert_eq!(simulate_round(&mut s, 4, &mut avail), [2, 0, 2]);
    }

    #[test]
    fn strict_order_among_the_rest() {
        let mut s = Scheduler::new(0.0, 0.0);
        let mut avail = [3, 3, 3];
        assert_eq!(simulate_round(&mut s, 5, &mut avail), [3, 2, 0]);
    }
}
