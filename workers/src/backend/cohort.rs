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
//! The price: a cohort lasts as long as its longest member, so a request
//! arriving during a long generation waits for it. `continuous` admission
//! (no gate) is the engine's own behaviour, for workloads where that costs
//! more than the stragglers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// How requests enter a mistral.rs engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Together, in cohorts of at most `max_num_seqs` (see the module docs).
    #[default]
    Cohort,
    /// As they come: the engine's own scheduling.
    Continuous,
}

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
    /// Requests waiting for the next cohort, oldest first.
    queue: VecDeque<oneshot::Sender<Permit>>,
}

/// A place in the current cohort; dropping it leaves the cohort.
pub struct Permit {
    gate: Option<Arc<Gate>>,
}

impl Gate {
    /// A gate for an engine that batches `max` sequences, waiting `gather`
    /// for companions when a request finds the engine idle; `waiting`
    /// counts the requests queued at it.
    pub fn new(max: usize, gather: Duration, waiting: Option<prometheus::IntGauge>) -> Arc<Gate> {
        Arc::new(Gate { max: max.max(1), gather, state: Mutex::new(State::default()), waiting })
    }

    /// Waits for a place in a cohort. Cancel-safe: a dropped waiter is
    /// skipped, and a place it was given is handed back.
    pub async fn enter(self: &Arc<Gate>) -> Permit {
        match self.admit() {
            Ok((permit, start)) => {
                // holding the permit: a caller that gives up while gathering
                // hands its place back
                tokio::time::sleep_until(start).await;
                permit
            }
            Err(rx) => match rx.await {
                Ok(permit) => permit,
                // the gate is dropped only with its engine; nothing to wait for
                Err(_) => Permit { gate: None },
            },
        }
    }

    /// A place in the cohort that is gathering (or opens one on an idle
    /// engine), with the time it starts; or a place in the queue.
    fn admit(self: &Arc<Gate>) -> Result<(Permit, Instant), oneshot::Receiver<Permit>> {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        if s.running == 0 && s.queue.is_empty() {
            s.running = 1;
            s.gather_until = Some(now + self.gather);
        } else if s.gather_until.is_some_and(|until| now < until) && s.running < self.max {
            s.running += 1;
        } else {
            let (tx, rx) = oneshot::channel();
            s.queue.push_back(tx);
            if let Some(g) = &self.waiting {
                g.inc();
            }
            return Err(rx);
        }
        let start = s.gather_until.unwrap_or(now);
        drop(s);
        Ok((self.permit(), start))
    }

    fn permit(self: &Arc<Gate>) -> Permit {
        Permit { gate: Some(self.clone()) }
    }

    /// One member finished: when it was the last, the next cohort starts.
    fn leave(self: &Arc<Gate>) {
        let next: Vec<oneshot::Sender<Permit>> = {
            let mut s = self.state.lock().unwrap();
            s.running -= 1;
            if s.running > 0 {
                return;
            }
            let n = s.queue.len().min(self.max);
            s.running = n;
            s.gather_until = None;
            if let Some(g) = &self.waiting {
                g.sub(n as i64);
            }
            s.queue.drain(..n).collect()
        };
        // outside the lock: a waiter that is gone drops its permit, which
        // calls `leave` again
        for tx in next {
            let _ = tx.send(self.permit());
        }
    }

    /// Members of the current cohort and requests waiting for the next.
    pub fn load(&self) -> (usize, usize) {
        let s = self.state.lock().unwrap();
        (s.running, s.queue.len())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(gate) = self.gate.take() {
            gate.leave();
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
}
