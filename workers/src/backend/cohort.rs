//! Admission of requests into one mistral.rs engine in cohorts.
//!
//! Why: without PagedAttention (none on CPU in mistral.rs 0.8.1) the engine
//! only batches sequences of equal length in a step. Its scheduler buckets
//! the running sequences by length and runs one bucket per step, the bucket
//! with the highest summed priority (urgency + log2 of its length). A request
//! that joins while others are generating has a different length: it either
//! runs alone, step after step, while the crowd waits, or (more often) it is
//! outvoted by the crowd and waits until its urgency, one point a step,
//! outweighs the crowd's sum — seconds on a busy engine. Arrivals spread
//! over time (what a queue delivers) thus run in small batches with long
//! stragglers.
//!
//! A cohort gate lets requests in together and no more until they have all
//! finished: they start at the same step, so equal prompts stay one bucket
//! and the engine batches them in every step. A request that finds the
//! engine idle waits `gather` for companions (a worker's pull delivers them
//! within microseconds); requests that arrive while a cohort runs queue
//! here, first in first out, and the next cohort is the first `max` of them.
//!
//! Gathering is adaptive: a request waits for companions only when the last
//! cohort had some. A lone caller's cohorts have one member, so it starts
//! at once and pays nothing for the gate; under load the last cohort was
//! full and the next one gathers as before. The first cohort of a burst
//! after a quiet spell starts with its first request alone (the rest start
//! together when it ends); a gate that has seen no cohort yet gathers.
//!
//! The price: a cohort lasts as long as its longest member, so a request
//! arriving during a long generation waits for it. `continuous` admission
//! (no gate) is the engine's own behaviour, for workloads where that costs
//! more than the stragglers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// Config types of cohort admission live with the rest of the model's settings.
pub use crate::config::Admission;

/// The gate of one engine.
pub struct Gate {
    max: usize,
    gather: Duration,
    state: Mutex<State>,
    /// `fleet_model_waiting{model}`, shared by the model's instances.
    waiting: Option<prometheus::IntGauge>,
}

#[derive(Default)]
struct State {
    /// Members of the current cohort still generating (or gathering).
    running: usize,
    /// While gathering, the time the current cohort starts: newcomers
    /// before it join.
    gather_until: Option<Instant>,
    /// Requests admitted into the current cohort so far.
    members: usize,
    /// Members of the last cohort that ended (`None` before the first):
    /// gathering is worth it only when it had companions.
    last_members: Option<usize>,
    /// Requests waiting for the next cohort, oldest first; each is sent its
    /// place and the time to start.
    queue: VecDeque<oneshot::Sender<(Permit, Instant)>>,
}

impl State {
    /// The oldest waiter whose caller is still there.
    fn next_waiter(&mut self) -> Option<oneshot::Sender<(Permit, Instant)>> {
        while let Some(tx) = self.queue.pop_front() {
            if !tx.is_closed() {
                return Some(tx);
            }
        }
        None
    }

    fn gathering(&self, now: Instant) -> bool {
        self.gather_until.is_some_and(|until| now < until)
    }

    /// Whether a request finding the engine idle should wait for companions.
    fn companions_expected(&self) -> bool {
        self.last_members.is_none_or(|n| n > 1)
    }

    /// The current cohort ended.
    fn ended(&mut self) {
        self.gather_until = None;
        self.last_members = Some(self.members);
        self.members = 0;
    }
}

/// A place in the current cohort; dropping it leaves the cohort.
pub struct Permit {
    gate: Option<Arc<Gate>>,
}

/// Longest gathering (configs are refused beyond it at load).
const MAX_GATHER: Duration = Duration::from_millis(crate::config::MAX_INTERVAL_MS);

impl Gate {
    /// A gate for an engine that batches `max` sequences, waiting `gather`
    /// (at most 10 s) for companions when a request finds the engine idle
    /// and the last cohort had companions;
    /// `waiting` counts the requests queued at it.
    pub fn new(max: usize, gather: Duration, waiting: Option<prometheus::IntGauge>) -> Arc<Gate> {
        let gather = gather.min(MAX_GATHER);
        Arc::new(Gate { max: max.max(1), gather, state: Mutex::new(State::default()), waiting })
    }

    /// Waits for a place in a cohort. Cancel-safe: a caller that gives up
    /// while queued is skipped, and a place it held goes back to the gate
    /// (to the oldest waiter while its cohort still gathers).
    pub async fn enter(self: &Arc<Gate>) -> Permit {
        let (permit, start) = match self.admit() {
            Ok(place) => place,
            Err(rx) => {
                let _counted = Queued::count(self.waiting.as_ref());
                match rx.await {
                    Ok(place) => place,
                    // the gate is dropped only with its engine; nothing to wait for
                    Err(_) => return Permit { gate: None },
                }
            }
        };
        // holding the permit: giving up while gathering hands the place back
        tokio::time::sleep_until(start).await;
        permit
    }

    /// A place in the cohort that is gathering (or opens one on an idle
    /// engine), with the time it starts; or a place in the queue. Nobody
    /// joins past a waiter: the queue is first in, first out.
    fn admit(self: &Arc<Gate>) -> Result<(Permit, Instant), oneshot::Receiver<(Permit, Instant)>> {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        s.queue.retain(|tx| !tx.is_closed());
        if s.running == 0 && s.queue.is_empty() {
            s.running = 1;
            s.members = 1;
            s.gather_until = s.companions_expected().then_some(now + self.gather);
        } else if s.gathering(now) && s.running < self.max && s.queue.is_empty() {
            s.running += 1;
            s.members += 1;
        } else {
            let (tx, rx) = oneshot::channel();
            s.queue.push_back(tx);
            return Err(rx);
        }
        let start = s.gather_until.unwrap_or(now);
        drop(s);
        Ok((self.permit(), start))
    }

    fn permit(self: &Arc<Gate>) -> Permit {
        Permit { gate: Some(self.clone()) }
    }

    /// `k` places were given up. When the cohort is then empty, the next one
    /// starts with the oldest waiters; while it still gathers, waiters take
    /// the free places. Loops rather than recursing when a waiter turns out
    /// to be gone after all.
    fn release(self: &Arc<Gate>, mut k: usize) {
        // the first pass: members left; later ones: waiters handed a place
        // were gone, and were never members
        let mut left = true;
        while k > 0 {
            let (next, start) = {
                let mut s = self.state.lock().unwrap();
                let now = Instant::now();
                s.running -= k;
                if !left {
                    s.members -= k;
                }
                let (free, start) = if s.running == 0 {
                    if left {
                        s.ended();
                    } else {
                        // the cohort that ended is recorded already
                        s.gather_until = None;
                    }
                    (self.max, now)
                } else if s.gathering(now) {
                    (self.max - s.running, s.gather_until.unwrap_or(now))
                } else {
                    return;
                };
                let mut next = Vec::new();
                while next.len() < free {
                    match s.next_waiter() {
                        Some(tx) => next.push(tx),
                        None => break,
                    }
                }
                s.running += next.len();
                s.members += next.len();
                (next, start)
            };
            // outside the lock; a waiter gone since is handed no place
            (k, left) = (0, false);
            for tx in next {
                if let Err((mut unused, _)) = tx.send((self.permit(), start)) {
                    unused.gate = None;
                    k += 1;
                }
            }
        }
    }

    /// Members of the current cohort and requests waiting for the next.
    pub fn load(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.running, s.queue.iter().filter(|tx| !tx.is_closed()).count())
    }
}

/// One request counted in `fleet_model_waiting` while it is queued.
struct Queued(Option<prometheus::IntGauge>);

impl Queued {
    fn count(gauge: Option<&prometheus::IntGauge>) -> Queued {
        if let Some(g) = gauge {
            g.inc();
        }
        Queued(gauge.cloned())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.release(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_cohort_gathers_then_admits_no_one_until_it_is_done() {
        let gate = Gate::new(3, Duration::from_millis(2), None);
        let first = tokio::spawn({
            let g = gate.clone();
            async move { g.enter().await }
        });
        tokio::task::yield_now().await;
        // joins while the first gathers
        let second = gate.enter().await;
        let first = first.await.unwrap();
        assert_eq!(gate.load(), (2, 0));
        // after the gathering, newcomers queue even with room left
        let third = tokio::spawn({
            let g = gate.clone();
            async move { g.enter().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(gate.load(), (2, 1));
        drop(first);
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "admitted while the cohort still runs");
        drop(second);
        let third = third.await.unwrap();
        assert_eq!(gate.load(), (1, 0));
        drop(third);
        assert_eq!(gate.load(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_cohort_is_the_oldest_waiters_up_to_the_limit() {
        let waiting = prometheus::IntGauge::new("waiting", "waiting").unwrap();
        let gate = Gate::new(2, Duration::ZERO, Some(waiting.clone()));
        let holder = gate.enter().await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..5 {
            let (g, order) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = g.enter().await;
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
                drop(p);
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!((gate.load(), waiting.get()), ((1, 5), 5));
        drop(holder);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!((gate.load(), waiting.get()), ((0, 0), 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_loses_no_place() {
        let gate = Gate::new(1, Duration::ZERO, None);
        let holder = gate.enter().await;
        let quitter = tokio::spawn({
            let g = gate.clone();
            async move { g.enter().await }
        });
        tokio::task::yield_now().await;
        let patient = tokio::spawn({
            let g = gate.clone();
            async move { g.enter().await }
        });
        tokio::task::yield_now().await;
        quitter.abort();
        let _ = quitter.await;
        drop(holder);
        let p = tokio::time::timeout(Duration::from_secs(1), patient).await.expect("the gate stuck").unwrap();
        assert_eq!(gate.load(), (1, 0));
        drop(p);
        assert_eq!(gate.load(), (0, 0));
    }

    fn spawn_enter(gate: &Arc<Gate>) -> tokio::task::JoinHandle<Permit> {
        let g = gate.clone();
        tokio::spawn(async move { g.enter().await })
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_that_gave_up_take_no_place_in_the_next_cohort() {
        let waiting = prometheus::IntGauge::new("waiting", "waiting").unwrap();
        let gate = Gate::new(2, Duration::ZERO, Some(waiting.clone()));
        let holder = gate.enter().await;
        // the quitter is first in line: the next cohort must not be only
        // the one live waiter behind it
        let quitter = spawn_enter(&gate);
        tokio::task::yield_now().await;
        let patient = [spawn_enter(&gate), spawn_enter(&gate)];
        tokio::task::yield_now().await;
        assert_eq!(waiting.get(), 3);
        quitter.abort();
        let _ = quitter.await;
        assert_eq!((gate.load(), waiting.get()), ((1, 2), 2), "the gauge counts only callers still waiting");
        drop(holder);
        let [a, b] = patient;
        let (a, b) = (a.await.unwrap(), b.await.unwrap());
        assert_eq!((gate.load(), waiting.get()), ((2, 0), 0), "both live waiters form the next cohort");
        drop((a, b));
        assert_eq!(gate.load(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_caller_waits_for_companions_only_after_a_cohort_that_had_some() {
        let gather = Duration::from_millis(10);
        let gate = Gate::new(4, gather, None);
        let entered_after = |gate: &Arc<Gate>| {
            let g = gate.clone();
            async move {
                let t = Instant::now();
                let p = g.enter().await;
                (p, t.elapsed())
            }
        };
        // no cohort seen yet: gathers
        let (p, waited) = entered_after(&gate).await;
        assert_eq!(waited, gather);
        drop(p);
        // the last cohort was alone: no wait, again and again
        for _ in 0..3 {
            let (p, waited) = entered_after(&gate).await;
            assert_eq!(waited, Duration::ZERO);
            drop(p);
        }
        // two arrive together: the first starts alone, the second queues and
        // forms the next cohort with the one behind it
        let (first, _) = entered_after(&gate).await;
        let (second, third) = (spawn_enter(&gate), spawn_enter(&gate));
        tokio::task::yield_now().await;
        assert_eq!(gate.load(), (1, 2));
        drop(first);
        drop((second.await.unwrap(), third.await.unwrap()));
        // that cohort had companions: the next lone request gathers
        let (p, waited) = entered_after(&gate).await;
        assert_eq!(waited, gather);
        drop(p);
        let (p, waited) = entered_after(&gate).await;
        assert_eq!(waited, Duration::ZERO);
        drop(p);
    }

    #[tokio::test(start_paused = true)]
    async fn a_place_freed_while_gathering_goes_to_the_oldest_waiter() {
        let gate = Gate::new(2, Duration::from_millis(10), None);
        let first = spawn_enter(&gate);
        tokio::task::yield_now().await;
        let second = spawn_enter(&gate);
        tokio::task::yield_now().await;
        let oldest = spawn_enter(&gate);
        tokio::task::yield_now().await;
        assert_eq!(gate.load(), (2, 1));
        first.abort();
        let _ = first.await;
        // the freed place is the oldest waiter's, not a newcomer's
        assert_eq!(gate.load(), (2, 0));
        let newcomer = spawn_enter(&gate);
        tokio::task::yield_now().await;
        assert_eq!(gate.load(), (2, 1));
        let (second, oldest) = (second.await.unwrap(), oldest.await.unwrap());
        assert!(!newcomer.is_finished());
        drop((second, oldest));
        drop(newcomer.await.unwrap());
        assert_eq!(gate.load(), (0, 0));
    }
}
