//! Pooled model instances: up to `max` instances of one model in a worker,
//! loaded at start (`warm`) or on first need, unloaded after an idle time,
//! and probed before reuse after a quiet spell.
//!
//! Why not deadpool: a deadpool object is checked out by one caller at a
//! time, but one mistral.rs instance batches many sequences at once (up to
//! `max_num_seqs`); checking it out per request would serialize generation.
//! Here an instance is shared by every request routed to it, and the pool
//! decides routing (least in flight, or round robin) and growth: a new
//! instance is loaded only when every loaded one has `grow_at` requests in
//! flight.
//!
//! - `budget`: the worker-wide memory budget; loading past it first
//!   unloads idle instances of the least recently used other models.
//! - `slot`: one place for an instance, with the circuit breaker it owns
//!   (see [`crate::breaker`]), which keeps its identity across unload and
//!   reload.
//! - `loader`: how instances are loaded, and on which runtime.

mod budget;
mod loader;
mod slot;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use retro_fleet_schemas::{ErrorCode, InferRequest, Input, SamplingParams};
use tokio::time::Instant;

use super::{Attempt, Backend, BackendError, Generating, Generation};
use crate::breaker::Board;
use budget::Evictable;
use slot::Slot;

pub use crate::config::Balance;
pub use budget::Budget;
pub use loader::{LoadOn, Loader, LoaderRuntime};

/// How a pool behaves.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Most instances.
    pub max: usize,
    /// Instances loaded when the pool is built (0: the first request loads one).
    pub warm: usize,
    /// Requests in flight on every loaded instance before another is loaded.
    pub grow_at: usize,
    /// Unload an instance idle this long (None: never).
    pub idle_unload: Option<Duration>,
    /// Probe an instance idle this long before giving it a request.
    pub probe_after: Duration,
    /// Request routing.
    pub balance: Balance,
    /// Estimated memory of one instance, in bytes (for the budget).
    pub bytes: u64,
    /// The model's revision when known without loading it (else the first
    /// instance is loaded at build to tell it).
    pub revision: Option<String>,
}

/// Instances of one model.
pub struct Pool {
    name: String,
    /// Before `load_on`: instances are dropped before the runtime that
    /// loaded them may shut down.
    slots: Vec<Slot>,
    spec: PoolSpec,
    loader: Loader,
    load_on: LoadOn,
    budget: Arc<Budget>,
    next: AtomicUsize,
    revision: Option<String>,
}

impl Pool {
    /// Builds a pool, loads its `warm` instances, and registers it with the
    /// budget. With `breakers`, each slot gets a circuit breaker on that
    /// board; loads run where `load_on` says.
    pub async fn build(
        name: &str,
        spec: PoolSpec,
        loader: Loader,
        load_on: LoadOn,
        budget: Arc<Budget>,
        breakers: Option<&Board>,
    ) -> Result<Arc<Pool>, BackendError> {
        let max = spec.max.max(1);
        let mut pool = Pool {
            name: name.to_string(),
            slots: (0..max).map(|_| Slot::new()).collect(),
            revision: spec.revision.clone(),
            spec: PoolSpec { max, ..spec },
            loader,
            load_on,
            budget: budget.clone(),
            next: AtomicUsize::new(0),
        };
        if pool.revision.is_none() {
            // the first instance tells the revision, even for a lazy pool
            pool.revision = pool.load_first().await?;
        }
        for i in 0..pool.spec.warm.min(max) {
            pool.load(i).await?;
        }
        if let Some(board) = breakers {
            for (i, slot) in pool.slots.iter_mut().enumerate() {
                slot.breaker = Some(board.breaker(name, i));
            }
        }
        let pool = Arc::new(pool);
        budget.enroll(Arc::downgrade(&pool) as Weak<dyn Evictable>);
        if let Some(idle) = pool.spec.idle_unload {
            tokio::spawn(unload_idle(Arc::downgrade(&pool), idle));
        }
        pool.observe();
        tracing::info!(model = name, max, loaded = pool.loaded(), "model pool ready");
        Ok(pool)
    }

    /// Loads the first instance into slot 0 for its revision, and unloads
    /// it again when the pool is lazy.
    async fn load_first(&self) -> Result<Option<String>, BackendError> {
        let first = self.load_on.run((self.loader)()).await?;
        let revision = first.revision();
        self.budget.reserve(self.spec.bytes, self).map_err(overloaded)?;
        self.slots[0].put_first(first);
        if self.spec.warm == 0 {
            self.unload(0);
        }
        Ok(revision)
    }

    /// Instances loaded now.
    pub fn loaded(&self) -> usize {
        self.slots.iter().filter(|s| s.is_loaded()).count()
    }

    /// Requests in flight per slot.
    pub fn loads(&self) -> Vec<usize> {
        self.slots.iter().map(Slot::inflight).collect()
    }

    fn observe(&self) {
        self.budget.observe(&self.name, self.loaded());
    }

    async fn load(&self, i: usize) -> Result<Arc<dyn Backend>, BackendError> {
        let slot = &self.slots[i];
        let _one = slot.loading.lock().await;
        if let Some(b) = slot.instance() {
            return Ok(b);
        }
        self.budget.reserve(self.spec.bytes, self).map_err(overloaded)?;
        match self.load_on.run((self.loader)()).await {
            Ok(b) => {
                tracing::info!(model = %self.name, instance = i, "model instance loaded");
                slot.put(b.clone());
                self.observe();
                Ok(b)
            }
            Err(e) => {
                self.budget.release(self.spec.bytes);
                Err(e)
            }
        }
    }

    fn unload(&self, i: usize) -> bool {
        let dropped = self.slots[i].take().is_some();
        if dropped {
            self.budget.release(self.spec.bytes);
            self.observe();
        }
        dropped
    }

    /// The slot for the next request: a loaded instance by the balance rule
    /// (preferring slots whose breaker admits calls), or an empty slot when
    /// every loaded instance has `grow_at` requests in flight.
    fn pick(&self) -> usize {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let available = |i: usize| self.slots[i].available();
        let load = |i: usize| self.slots[i].inflight();
        let order = || (0..n).map(move |k| (start + k) % n);
        // a slot being loaded for a request counts as loaded: later requests join it
        let active = |i: usize| self.slots[i].is_loaded() || self.slots[i].busy();
        let saturated = order().filter(|&i| active(i)).all(|i| load(i) >= self.spec.grow_at.max(1));
        if saturated {
            if let Some(empty) = order().find(|&i| !active(i) && available(i)) {
                return empty;
            }
        }
        // among loaded slots that admit calls, else loaded ones, else any
        let choose = |keep: &dyn Fn(usize) -> bool| {
            let mut candidates = order().filter(|&i| keep(i));
            match self.spec.balance {
                Balance::RoundRobin => candidates.next(),
                Balance::LeastBusy => candidates.min_by_key(|&i| load(i)),
            }
        };
        choose(&|i| active(i) && available(i)).or_else(|| choose(&active)).unwrap_or(start)
    }

    /// Runs `req` on slot `i` through the slot's breaker.
    async fn run(&self, i: usize, req: &InferRequest, attempt: Attempt) -> Result<Generation, BackendError> {
        match &self.slots[i].breaker {
            Some(breaker) => breaker.call(|| self.run_on(i, req, attempt)).await,
            None => self.run_on(i, req, attempt).await,
        }
    }

    /// Runs `req` on slot `i`, loading (or probing) its instance first.
    async fn run_on(&self, i: usize, req: &InferRequest, attempt: Attempt) -> Result<Generation, BackendError> {
        let slot = &self.slots[i];
        let _inflight = slot.enter();
        let (idle_for, current) = slot.start();
        let instance = match current {
            Some(b) if idle_for >= self.spec.probe_after => match b.generate(&probe(), Attempt::default()).await {
                Ok(_) => b,
                Err(e) => {
                    tracing::warn!(model = %self.name, instance = i, error = %e, "probe failed; reloading the instance");
                    self.unload(i);
                    self.load(i).await?
                }
            },
            Some(b) => b,
            None => self.load(i).await?,
        };
        let out = instance.generate(req, attempt).await;
        slot.touch();
        out
    }
}

impl Evictable for Pool {
    fn last_used(&self) -> Instant {
        self.slots.iter().map(Slot::last_used).max().unwrap_or_else(Instant::now)
    }

    fn unload_lru_idle(&self) -> bool {
        let idle = (0..self.slots.len())
            .filter_map(|i| self.slots[i].idle_since().map(|since| (i, since)))
            .min_by_key(|&(_, since)| since);
        match idle {
            Some((i, _)) => {
                tracing::info!(model = %self.name, instance = i, "unloading an idle instance to make room for another model");
                self.unload(i)
            }
            None => false,
        }
    }
}

impl Backend for Pool {
    fn revision(&self) -> Option<String> {
        self.revision.clone()
    }

    fn available(&self) -> bool {
        self.slots.iter().any(Slot::available)
    }

    fn generate<'a>(&'a self, req: &'a InferRequest, attempt: Attempt) -> Generating<'a> {
        let i = self.pick();
        Box::pin(self.run(i, req, attempt))
    }
}

/// The cheapest request: one greedy token.
fn probe() -> InferRequest {
    InferRequest {
        v: retro_fleet_schemas::SCHEMA_VERSION,
        id: "probe".into(),
        model: String::new(),
        adapter: None,
        input: Input::Completion { prompt: "ping".into() },
        params: SamplingParams { max_tokens: Some(1), temperature: Some(0.0), ..Default::default() },
        stream: false,
        cache: Default::default(),
        tenant: None,
        metadata: Default::default(),
    }
}

fn overloaded(message: String) -> BackendError {
    BackendError { code: ErrorCode::Overloaded, message, retryable: true }
}

async fn unload_idle(pool: Weak<Pool>, idle: Duration) {
    let every = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        for (i, slot) in pool.slots.iter().enumerate() {
            let quiet = slot.last_used().elapsed() >= idle;
            if quiet && !slot.busy() && pool.unload(i) {
                tracing::info!(model = %pool.name, instance = i, ?idle, "unloaded an idle instance");
            }
        }
    }
}
