//! One place for an instance in a pool. A slot keeps its identity across
//! unload and reload, and so does the circuit breaker it owns.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::Backend;
use crate::breaker::Breaker;

/// A place for one instance: the instance when loaded, its use, its breaker.
pub(super) struct Slot {
    state: Mutex<State>,
    /// Serializes loading this slot.
    pub(super) loading: tokio::sync::Mutex<()>,
    inflight: AtomicUsize,
    /// Set when the pool is built with breakers (a pool that fails to load
    /// registers none).
    pub(super) breaker: Option<Arc<Breaker>>,
}

/// What the slot's one lock guards.
struct State {
    instance: Option<Arc<dyn Backend>>,
    last_used: Instant,
}

impl Slot {
    /// An empty slot, last used now.
    pub(super) fn new() -> Slot {
        Slot {
            state: Mutex::new(State { instance: None, last_used: Instant::now() }),
            loading: tokio::sync::Mutex::new(()),
            inflight: AtomicUsize::new(0),
            breaker: None,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("slot")
    }

    /// The loaded instance.
    pub(super) fn instance(&self) -> Option<Arc<dyn Backend>> {
        self.state().instance.clone()
    }

    /// Whether an instance is loaded.
    pub(super) fn is_loaded(&self) -> bool {
        self.state().instance.is_some()
    }

    /// Puts a freshly loaded instance in, used now.
    pub(super) fn put(&self, instance: Arc<dyn Backend>) {
        let mut s = self.state();
        s.instance = Some(instance);
        s.last_used = Instant::now();
    }

    /// Puts the first instance in (loaded by the pool's build), leaving its
    /// time of use alone.
    pub(super) fn put_first(&self, instance: Arc<dyn Backend>) {
        self.state().instance = Some(instance);
    }

    /// Takes the instance out (unloading it when nothing else holds it).
    pub(super) fn take(&self) -> Option<Arc<dyn Backend>> {
        self.state().instance.take()
    }

    /// When the slot last served.
    pub(super) fn last_used(&self) -> Instant {
        self.state().last_used
    }

    /// Marks the slot used now.
    pub(super) fn touch(&self) {
        self.state().last_used = Instant::now();
    }

    /// Marks the slot used now for a new request: how long it had been idle,
    /// and its instance.
    pub(super) fn start(&self) -> (Duration, Option<Arc<dyn Backend>>) {
        let mut s = self.state();
        let idle_for = s.last_used.elapsed();
        s.last_used = Instant::now();
        (idle_for, s.instance.clone())
    }

    /// Requests in flight.
    pub(super) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Whether requests are in flight (an acquiring read, to decide an unload).
    pub(super) fn busy(&self) -> bool {
        self.inflight.load(Ordering::Acquire) > 0
    }

    /// Counts one more request in flight until the guard is dropped.
    pub(super) fn enter(&self) -> InFlight<'_> {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        InFlight(&self.inflight)
    }

    /// When the slot went idle, if it holds an instance and no request.
    pub(super) fn idle_since(&self) -> Option<Instant> {
        let s = self.state();
        (s.instance.is_some() && !self.busy()).then_some(s.last_used)
    }

    /// Whether its breaker (if any) admits calls now.
    pub(super) fn available(&self) -> bool {
        self.breaker.as_ref().is_none_or(|b| b.available())
    }
}

/// One request counted in flight on a slot.
pub(super) struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
