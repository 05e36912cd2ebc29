//! Fair sharing of a worker's slots between tenants, inside each class.
//!
//! Each tenant has its own lane (subject and consumer) per model, so a
//! flood waits in its own lane instead of in front of everyone else. Which
//! lane takes a free slot is start-time fair queueing: every tenant carries
//! a virtual finish time that grows by `1 / weight` per request it starts;
//! the ready tenant with the earliest start (`max(finish, clock)`) goes
//! next. The class clock follows the starts in turn, so an idle tenant
//! cannot bank credit, and a burst slot given out of turn (below) does not
//! move it, so it takes nobody's turn. Over any busy
//! stretch tenants start requests in proportion to their weights.
//!
//! Fair order alone still makes a quiet tenant wait for a slot to free up
//! behind a flood. So a tenant below its share of `max_inflight` (its
//! weight over the weights of the tenants with work here) may also take one
//! of `burst` extra slots: its requests start at once, and the flood takes
//! no slot until the worker runs fewer than `max_inflight` again, so it
//! shrinks back to its share.
//!
//! The state has one owner, the pull loop; tasks report finished requests
//! through the loop's channel ([`Fair::finished`]).

use std::collections::HashMap;

use retro_fleet_schemas::Priority;

/// A lane that has a message ready, as [`Fair::pick`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Ready<'a> {
    /// The tenant of the lane.
    pub tenant: &'a str,
    /// Its class.
    pub priority: Priority,
}

/// Which slot a request takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// One of the worker's `max_inflight`.
    Regular,
    /// One of the extra slots of tenants below their share.
    Burst,
}

#[derive(Debug, Default)]
struct Tenant {
    weight: f64,
    inflight: usize,
    /// Virtual finish time per class.
    finish: [f64; 3],
}

/// The fair-sharing state of one worker.
#[derive(Debug)]
pub struct Fair {
    max_inflight: usize,
    /// Requests running here, all tenants.
    running: usize,
    clock: [f64; 3],
    tenants: HashMap<String, Tenant>,
}

impl Fair {
    /// State for a worker of `max_inflight` slots.
    pub fn new(max_inflight: usize) -> Self {
        Fair { max_inflight, running: 0, clock: [0.0; 3], tenants: HashMap::new() }
    }

    /// Sets `tenant`'s weight (positive; others count 1).
    pub fn set_weight(&mut self, tenant: &str, weight: f64) {
        let weight = if weight.is_finite() && weight > 0.0 { weight } else { 1.0 };
        self.tenant(tenant).weight = weight;
    }

    fn tenant(&mut self, tenant: &str) -> &mut Tenant {
        if !self.tenants.contains_key(tenant) {
            let t = Tenant { weight: 1.0, ..Default::default() };
            self.tenants.insert(tenant.to_string(), t);
        }
        self.tenants.get_mut(tenant).expect("inserted above")
    }

    fn weight(&self, tenant: &str) -> f64 {
        self.tenants.get(tenant).map_or(1.0, |t| t.weight)
    }

    fn inflight(&self, tenant: &str) -> usize {
        self.tenants.get(tenant).map_or(0, |t| t.inflight)
    }

    /// Whether `tenant` runs fewer requests here than its share, counting
    /// as active the tenants running requests and those in `ready`.
    fn under_share(&self, tenant: &str, ready: &[Ready<'_>]) -> bool {
        let mut total = self.weight(tenant);
        for (name, t) in &self.tenants {
            if name != tenant && (t.inflight > 0 || ready.iter().any(|r| r.tenant == name)) {
                total += t.weight;
            }
        }
        for r in ready {
            if r.tenant != tenant && !self.tenants.contains_key(r.tenant) {
                total += 1.0;
            }
        }
        let share = self.max_inflight as f64 * self.weight(tenant) / total;
        (self.inflight(tenant) as f64) < share
    }

    /// Which of `ready` (the lanes of one class with a message here, in
    /// rotation order) takes a slot, and which kind: with a regular slot
    /// free, the earliest start (among tenants below their share while
    /// burst slots are in use); with only a burst slot, the earliest start
    /// among tenants below their share. `None`: nobody may start now.
    pub fn pick(&self, ready: &[Ready<'_>], regular: bool, burst: bool) -> Option<(usize, Slot)> {
        let start = |r: &Ready<'_>| {
            let finish = self.tenants.get(r.tenant).map_or(0.0, |t| t.finish[r.priority.index()]);
            finish.max(self.clock[r.priority.index()])
        };
        let earliest = |allowed: &dyn Fn(&Ready<'_>) -> bool| {
            let mut best: Option<(usize, f64)> = None;
            for (i, r) in ready.iter().enumerate() {
                let s = start(r);
                if allowed(r) && best.is_none_or(|(_, b)| s < b) {
                    best = Some((i, s));
                }
            }
            best.map(|(i, _)| i)
        };
        // above its share, a tenant waits while burst slots are in use, so
        // a flood shrinks back to its share instead of keeping every
        // regular slot beside the burst ones
        if regular {
            let allowed = |r: &Ready<'_>| self.running < self.max_inflight || self.under_share(r.tenant, ready);
            return earliest(&allowed).map(|i| (i, Slot::Regular));
        }
        if burst {
            return earliest(&|r| self.under_share(r.tenant, ready)).map(|i| (i, Slot::Burst));
        }
        None
    }

    /// Records that `tenant` started a request of class `p` in a `slot`
    /// [`Fair::pick`] gave it. A regular slot goes to the earliest start,
    /// which becomes the class clock; a burst slot may go out of turn and
    /// leaves the clock where it was.
    pub fn started(&mut self, tenant: &str, p: Priority, slot: Slot) {
        let i = p.index();
        let clock = self.clock[i];
        let t = self.tenant(tenant);
        let start = t.finish[i].max(clock);
        t.finish[i] = start + 1.0 / t.weight;
        t.inflight += 1;
        self.running += 1;
        if slot == Slot::Regular {
            self.clock[i] = start;
        }
    }

    /// Records that one of `tenant`'s requests finished.
    pub fn finished(&mut self, tenant: &str) {
        if let Some(t) = self.tenants.get_mut(tenant).filter(|t| t.inflight > 0) {
            t.inflight -= 1;
            self.running -= 1;
        }
    }

    /// Forgets tenants with nothing running whose lanes are all closed
    /// (their weights stay), so the map does not grow with every tenant seen.
    pub fn forget_idle(&mut self, open: impl Fn(&str) -> bool) {
        self.tenants.retain(|name, t| t.inflight > 0 || t.weight != 1.0 || open(name));
    }
}

/// Jain's fairness index of `x` (1 when all equal, `1/n` when one has all).
pub fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    if squares == 0.0 {
        return 1.0;
    }
    sum * sum / (x.len() as f64 * squares)
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: Priority = Priority::Normal;

    fn ready(tenants: &[&'static str]) -> Vec<Ready<'static>> {
        tenants.iter().map(|t| Ready { tenant: t, priority: N }).collect()
    }

    /// Both tenants always have work: every slot goes by weight.
    fn served(fair: &mut Fair, rounds: usize) -> HashMap<&'static str, usize> {
        let lanes = ready(&["a", "b"]);
        let mut served = HashMap::new();
        for _ in 0..rounds {
            let (i, slot) = fair.pick(&lanes, true, false).expect("a slot is free");
            assert_eq!(slot, Slot::Regular);
            fair.started(lanes[i].tenant, N, slot);
            fair.finished(lanes[i].tenant);
            *served.entry(lanes[i].tenant).or_default() += 1;
        }
        served
    }

    #[test]
    fn equal_weights_alternate() {
        let mut fair = Fair::new(4);
        let s = served(&mut fair, 1000);
        assert_eq!((s["a"], s["b"]), (500, 500));
        assert!(jain(&[s["a"] as f64, s["b"] as f64]) > 0.999);
    }

    #[test]
    fn weights_three_to_one() {
        let mut fair = Fair::new(4);
        fair.set_weight("a", 3.0);
        let s = served(&mut fair, 1000);
        assert_eq!((s["a"], s["b"]), (750, 250));
    }

    #[test]
    fn an_idle_tenant_banks_no_credit() {
        let mut fair = Fair::new(4);
        for _ in 0..100 {
            fair.started("a", N, Slot::Regular);
            fair.finished("a");
        }
        // b arrives after a ran 100 alone: they alternate from here, b does
        // not get 100 in a row
        let s = served(&mut fair, 10);
        assert_eq!((s["a"], s["b"]), (5, 5));
    }

    #[test]
    fn burst_slots_go_only_to_tenants_below_their_share() {
        let mut fair = Fair::new(4);
        for _ in 0..4 {
            fair.started("a", N, Slot::Regular);
        }
        // every regular slot is a's: a quiet b may still start at once
        assert_eq!(fair.pick(&ready(&["a", "b"]), false, true), Some((1, Slot::Burst)));
        assert_eq!(fair.pick(&ready(&["a"]), false, true), None);
        fair.started("b", N, Slot::Burst);
        fair.started("b", N, Slot::Burst);
        // b holds its share (2 of 4): no more burst slots for it
        assert_eq!(fair.pick(&ready(&["a", "b"]), false, true), None);
        assert_eq!(fair.pick(&ready(&["b"]), false, false), None);
    }

    #[test]
    fn a_burst_slot_out_of_turn_takes_nobodys_turn() {
        let mut fair = Fair::new(8);
        served(&mut fair, 10);
        for _ in 0..4 {
            fair.started("a", N, Slot::Regular);
        }
        // a holds its share: b takes ten burst slots out of turn...
        for _ in 0..10 {
            assert_eq!(fair.pick(&ready(&["a", "b"]), false, true), Some((1, Slot::Burst)));
            fair.started("b", N, Slot::Burst);
            fair.finished("b");
        }
        for _ in 0..4 {
            fair.finished("a");
        }
        // ...and a's turns are still a's: the next six regular slots
        let s = served(&mut fair, 6);
        assert_eq!(s.get("a"), Some(&6), "{s:?}");
    }

    #[test]
    fn a_flood_waits_while_burst_slots_are_in_use() {
        let mut fair = Fair::new(4);
        for _ in 0..4 {
            fair.started("a", N, Slot::Regular);
        }
        fair.started("b", N, Slot::Burst);
        fair.finished("a");
        // a regular slot is free, but with b's burst slot 4 run: a is above
        // its share (2) and waits; b, below it, may take the slot
        assert_eq!(fair.pick(&ready(&["a"]), true, false), None);
        assert_eq!(fair.pick(&ready(&["a", "b"]), true, false), Some((1, Slot::Regular)));
        fair.finished("b");
        assert_eq!(fair.pick(&ready(&["a"]), true, false), Some((0, Slot::Regular)));
    }

    #[test]
    fn classes_keep_their_own_clocks() {
        let mut fair = Fair::new(4);
        for _ in 0..10 {
            fair.started("a", Priority::High, Slot::Regular);
            fair.finished("a");
        }
        let lanes = [Ready { tenant: "a", priority: N }, Ready { tenant: "b", priority: N }];
        // a's high work does not push back its normal work
        assert_eq!(fair.pick(&lanes, true, false), Some((0, Slot::Regular)));
    }

    #[test]
    fn jain_index() {
        assert!((jain(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert!((jain(&[1.0, 0.0]) - 0.5).abs() < 1e-12);
    }
}
