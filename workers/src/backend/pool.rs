//! Pooled model instances: up to `max` instances of one model in a worker,
//! loaded at start (`warm`) or on first need, unloaded after an idle time,
//! probed before reuse after a quiet spell, and kept under a worker-wide
//! memory budget by unloading the least recently used idle instances of
//! other models first.
//!
//! Why not deadpool: a deadpool object is checked out by one caller at a
//! time, but one mistral.rs instance batches many sequences at once (up to
//! `max_num_seqs`); checking it out per request would serialize generation.
//! Here an instance is shared by every request routed to it, and the pool
//! decides routing (least in flight, or round robin) and growth: a new
//! instance is loaded only when every loaded one has `grow_at` requests in
//! flight.
//!
//! Instances live in fixed slots, so the circuit breaker wrapped around a
//! slot (see [`crate::breaker`]) keeps its identity across unload and reload.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use futures::future::BoxFuture;
use retro_fleet_schemas::{ErrorCode, InferRequest, Input, SamplingParams};
use serde::{Deserialize, Serialize};

use super::{Backend, BackendError, DeltaSender, Generation};

/// How requests are spread over loaded instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The instance with the fewest requests in flight (ties: round robin).
    #[default]
    LeastBusy,
    /// Each loaded instance in turn.
    RoundRobin,
}

/// Loads one instance.
pub type Loader = Arc<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn Backend>, BackendError>> + Send + Sync>;

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

/// The worker-wide memory budget of loaded instances.
pub struct Budget {
    limit: u64,
    used: Mutex<u64>,
    pools: Mutex<Vec<Weak<Pool>>>,
    metrics: Option<PoolMetrics>,
}

/// `fleet_model_instances{model}` (loaded now), `fleet_model_memory_bytes`
/// (estimated bytes of loaded instances) and `fleet_model_waiting{model}`
/// (requests queued for a place in an engine).
#[derive(Clone)]
struct PoolMetrics {
    instances: prometheus::IntGaugeVec,
    bytes: prometheus::IntGauge,
    waiting: prometheus::IntGaugeVec,
}

impl Budget {
    /// A budget of `limit` bytes (0: unlimited).
    pub fn new(limit: u64) -> Arc<Budget> {
        Arc::new(Budget { limit, used: Mutex::new(0), pools: Mutex::new(Vec::new()), metrics: None })
    }

    /// [`Budget::new`], with the pools' metrics registered on `registry`.
    pub fn with_metrics(limit: u64, registry: &prometheus::Registry) -> prometheus::Result<Arc<Budget>> {
        let m = PoolMetrics {
            instances: prometheus::IntGaugeVec::new(
                prometheus::Opts::new("fleet_model_instances", "Model instances loaded in this worker"),
                &["model"],
            )?,
            bytes: prometheus::IntGauge::new(
                "fleet_model_memory_bytes",
                "Estimated bytes of the loaded model instances (weight files)",
            )?,
            waiting: prometheus::IntGaugeVec::new(
                prometheus::Opts::new(
                    "fleet_model_waiting",
                    "Requests this worker holds waiting for a place in a model's engine (cohort admission)",
                ),
                &["model"],
            )?,
        };
        registry.register(Box::new(m.instances.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.waiting.clone()))?;
        Ok(Arc::new(Budget { limit, used: Mutex::new(0), pools: Mutex::new(Vec::new()), metrics: Some(m) }))
    }

    /// The gauge of requests waiting for `model`'s engines, when metrics are on.
    pub fn waiting_gauge(&self, model: &str) -> Option<prometheus::IntGauge> {
        self.metrics.as_ref().map(|m| m.waiting.with_label_values(&[model]))
    }

    fn observe(&self, pool: &Pool) {
        if let Some(m) = &self.metrics {
            m.instances.with_label_values(&[&pool.name]).set(pool.loaded() as i64);
            m.bytes.set(self.used() as i64);
        }
    }

    /// Bytes held by loaded instances.
    pub fn used(&self) -> u64 {
        *self.used.lock().expect("budget")
    }

    /// Reserves `bytes` for a new instance of `for_pool`, unloading idle
    /// instances of the least recently used other pools when needed.
    fn reserve(&self, bytes: u64, for_pool: &Pool) -> Result<(), String> {
        loop {
            {
                let mut used = self.used.lock().expect("budget");
                if self.limit == 0 || *used + bytes <= self.limit {
                    *used += bytes;
                    return Ok(());
                }
            }
            let mut others: Vec<Arc<Pool>> = self
                .pools
                .lock()
                .expect("budget pools")
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|p| !std::ptr::eq(p.as_ref(), for_pool))
                .collect();
            others.sort_by_key(|p| p.last_used());
            if !others.iter().any(|p| p.unload_lru_idle()) {
                return Err(format!(
                    "model memory budget of {} bytes is used up by instances in use ({} bytes held)",
                    self.limit,
                    self.used()
                ));
            }
        }
    }

    fn release(&self, bytes: u64) {
        let mut used = self.used.lock().expect("budget");
        *used = used.saturating_sub(bytes);
    }
}

struct Slot {
    instance: Mutex<Option<Arc<dyn Backend>>>,
    /// Serializes loading this slot.
    loading: tokio::sync::Mutex<()>,
    inflight: AtomicUsize,
    last_used: Mutex<Instant>,
}

/// Instances of one model.
pub struct Pool {
    name: String,
    spec: PoolSpec,
    loader: Loader,
    budget: Arc<Budget>,
    slots: Vec<Slot>,
    /// Slot backends as given to the caller's wrapper (e.g. a breaker).
    handles: Mutex<Vec<Arc<dyn Backend>>>,
    next: AtomicUsize,
    revision: Option<String>,
}

impl Pool {
    /// Builds a pool, loads its `warm` instances, and registers it with the
    /// budget. `wrap` wraps each slot (e.g. in a circuit breaker).
    pub async fn build(
        name: &str,
        spec: PoolSpec,
        loader: Loader,
        budget: Arc<Budget>,
        wrap: impl Fn(usize, Arc<dyn Backend>) -> Arc<dyn Backend>,
    ) -> Result<Arc<Pool>, BackendError> {
        let max = spec.max.max(1);
        let slots = (0..max)
            .map(|_| Slot {
                instance: Mutex::new(None),
                loading: tokio::sync::Mutex::new(()),
                inflight: AtomicUsize::new(0),
                last_used: Mutex::new(Instant::now()),
            })
            .collect();
        let mut pool = Pool {
            name: name.to_string(),
            spec: PoolSpec { max, ..spec },
            loader,
            budget: budget.clone(),
            slots,
            handles: Mutex::new(Vec::new()),
            next: AtomicUsize::new(0),
            revision: None,
        };
        let pool = match pool.spec.revision.clone() {
            Some(r) => {
                pool.revision = Some(r);
                Arc::new(pool)
            }
            None => {
                // the first instance tells the revision, even for a lazy pool
                let first = load_off_runtime((pool.loader)()).await?;
                pool.revision = first.revision();
                let pool = Arc::new(pool);
                budget.reserve(pool.spec.bytes, &pool).map_err(overloaded)?;
                *pool.slots[0].instance.lock().expect("slot") = Some(first);
                if pool.spec.warm == 0 {
                    pool.unload(0);
                }
                pool
            }
        };
        for i in 0..pool.spec.warm.min(max) {
            pool.load(i).await?;
        }
        let handles =
            (0..max).map(|i| wrap(i, Arc::new(SlotHandle { pool: Arc::downgrade(&pool), slot: i }))).collect();
        *pool.handles.lock().expect("handles") = handles;
        budget.pools.lock().expect("budget pools").push(Arc::downgrade(&pool));
        if let Some(idle) = pool.spec.idle_unload {
            tokio::spawn(unload_idle(Arc::downgrade(&pool), idle));
        }
        budget.observe(&pool);
        tracing::info!(model = name, max, loaded = pool.loaded(), "model pool ready");
        Ok(pool)
    }

    /// Instances loaded now.
    pub fn loaded(&self) -> usize {
        self.slots.iter().filter(|s| s.instance.lock().expect("slot").is_some()).count()
    }

    /// Requests in flight per slot.
    pub fn loads(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.inflight.load(Ordering::Relaxed)).collect()
    }

    fn last_used(&self) -> Instant {
        self.slots.iter().map(|s| *s.last_used.lock().expect("slot")).max().unwrap_or_else(Instant::now)
    }

    fn is_loaded(&self, i: usize) -> bool {
        self.slots[i].instance.lock().expect("slot").is_some()
    }

    async fn load(&self, i: usize) -> Result<Arc<dyn Backend>, BackendError> {
        let slot = &self.slots[i];
        let _one = slot.loading.lock().await;
        if let Some(b) = slot.instance.lock().expect("slot").clone() {
            return Ok(b);
        }
        self.budget.reserve(self.spec.bytes, self).map_err(overloaded)?;
        match load_off_runtime((self.loader)()).await {
            Ok(b) => {
                tracing::info!(model = %self.name, instance = i, "model instance loaded");
                *slot.instance.lock().expect("slot") = Some(b.clone());
                *slot.last_used.lock().expect("slot") = Instant::now();
                self.budget.observe(self);
                Ok(b)
            }
            Err(e) => {
                self.budget.release(self.spec.bytes);
                Err(e)
            }
        }
    }

    fn unload(&self, i: usize) -> bool {
        let dropped = self.slots[i].instance.lock().expect("slot").take().is_some();
        if dropped {
            self.budget.release(self.spec.bytes);
            self.budget.observe(self);
        }
        dropped
    }

    /// Unloads this pool's least recently used idle instance; false if none is idle.
    fn unload_lru_idle(&self) -> bool {
        let idle = (0..self.slots.len())
            .filter(|&i| self.is_loaded(i) && self.slots[i].inflight.load(Ordering::Acquire) == 0)
            .min_by_key(|&i| *self.slots[i].last_used.lock().expect("slot"));
        match idle {
            Some(i) => {
                tracing::info!(model = %self.name, instance = i, "unloading an idle instance to make room for another model");
                self.unload(i)
            }
            None => false,
        }
    }

    /// The slot for the next request: a loaded instance by the balance rule
    /// (preferring slots whose wrapper admits calls), or an empty slot when
    /// every loaded instance has `grow_at` requests in flight.
    fn pick(&self) -> usize {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let handles = self.handles.lock().expect("handles");
        let available = |i: usize| handles.get(i).is_none_or(|h| h.available());
        let load = |i: usize| self.slots[i].inflight.load(Ordering::Relaxed);
        let order = || (0..n).map(move |k| (start + k) % n);
        // a slot being loaded for a request counts as loaded: later requests join it
        let active = |i: usize| self.is_loaded(i) || self.slots[i].inflight.load(Ordering::Acquire) > 0;
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

    /// Runs `req` on slot `i`, loading (or probing) its instance first.
    async fn run_on(
        &self,
        i: usize,
        req: &InferRequest,
        deltas: Option<DeltaSender>,
    ) -> Result<Generation, BackendError> {
        let slot = &self.slots[i];
        slot.inflight.fetch_add(1, Ordering::AcqRel);
        let _guard = InFlight(&slot.inflight);
        let idle_for = slot.last_used.lock().expect("slot").elapsed();
        *slot.last_used.lock().expect("slot") = Instant::now();
        let current = slot.instance.lock().expect("slot").clone();
        let instance = match current {
            Some(b) if idle_for >= self.spec.probe_after => match b.generate(&probe(), None).await {
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
        let out = instance.generate(req, deltas).await;
        *slot.last_used.lock().expect("slot") = Instant::now();
        out
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

static LOADS_OFF_RUNTIME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on model loads run on a runtime of their own ("model-loader"):
/// for a process whose runtime has one thread (`retro-fleet worker`), where
/// reading and converting weights (seconds to minutes) would otherwise hold
/// up its messages, heartbeats and in-progress acks.
pub fn load_models_off_runtime() {
    LOADS_OFF_RUNTIME.store(true, Ordering::Relaxed);
}

/// Runs a model load, on the loader runtime if [`load_models_off_runtime`]
/// was called, else in place.
async fn load_off_runtime(
    load: BoxFuture<'static, Result<Arc<dyn Backend>, BackendError>>,
) -> Result<Arc<dyn Backend>, BackendError> {
    if !LOADS_OFF_RUNTIME.load(Ordering::Relaxed) {
        return load.await;
    }
    static LOADER: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    let rt = LOADER.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("model-loader")
            .enable_all()
            .build()
            .expect("the model loader runtime")
    });
    rt.spawn(load).await.unwrap_or_else(|e| {
        Err(BackendError {
            code: retro_fleet_schemas::ErrorCode::Internal,
            message: format!("loading the model failed: {e}"),
            retryable: true,
        })
    })
}

async fn unload_idle(pool: Weak<Pool>, idle: Duration) {
    let every = (idle / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else { return };
        for (i, slot) in pool.slots.iter().enumerate() {
            let quiet = slot.last_used.lock().expect("slot").elapsed() >= idle;
            if quiet && slot.inflight.load(Ordering::Acquire) == 0 && pool.unload(i) {
                tracing::info!(model = %pool.name, instance = i, ?idle, "unloaded an idle instance");
            }
        }
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One slot as a backend (what the breaker wraps).
struct SlotHandle {
    pool: Weak<Pool>,
    slot: usize,
}

impl Backend for SlotHandle {
    fn revision(&self) -> Option<String> {
        self.pool.upgrade().and_then(|p| p.revision.clone())
    }

    fn generate<'a>(
        &'a self,
        req: &'a InferRequest,
        deltas: Option<DeltaSender>,
    ) -> BoxFuture<'a, Result<Generation, BackendError>> {
        Box::pin(async move {
            let pool = self.pool.upgrade().ok_or_else(|| overloaded("model pool is shutting down".into()))?;
            pool.run_on(self.slot, req, deltas).await
        })
    }
}

impl Backend for Pool {
    fn revision(&self) -> Option<String> {
        self.revision.clone()
    }

    fn available(&self) -> bool {
        self.handles.lock().expect("handles").iter().any(|h| h.available())
    }

    fn generate<'a>(
        &'a self,
        req: &'a InferRequest,
        deltas: Option<DeltaSender>,
    ) -> BoxFuture<'a, Result<Generation, BackendError>> {
        let i = self.pick();
        let handle = self.handles.lock().expect("handles")[i].clone();
        Box::pin(async move { handle.generate(req, deltas).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::synthetic::Synthetic;
    use crate::backend::tests_support::request;

    fn spec(max: usize, warm: usize) -> PoolSpec {
        PoolSpec {
            max,
            warm,
            grow_at: 2,
            idle_unload: None,
            probe_after: Duration::from_secs(3600),
            balance: Balance::LeastBusy,
            bytes: 100,
            revision: None,
        }
    }

    /// A loader of synthetic instances (1 s per request) that counts loads.
    fn loader(loads: Arc<AtomicUsize>, fail_rate: f64) -> Loader {
        Arc::new(move || {
            let loads = loads.clone();
            Box::pin(async move {
                loads.fetch_add(1, Ordering::SeqCst);
                let b = Synthetic::new(Duration::from_secs(1), 1, None, Some("r1".into())).with_fail_rate(fail_rate);
                Ok(Arc::new(b) as Arc<dyn Backend>)
            })
        })
    }

    async fn pool(name: &str, s: PoolSpec, budget: &Arc<Budget>, loads: &Arc<AtomicUsize>) -> Arc<Pool> {
        Pool::build(name, s, loader(loads.clone(), 0.0), budget.clone(), |_, b| b).await.unwrap()
    }

    async fn burst(p: &Arc<Pool>, n: usize) -> Vec<tokio::task::JoinHandle<Result<Generation, BackendError>>> {
        let mut tasks = Vec::new();
        for k in 0..n {
            let p = p.clone();
            tasks.push(tokio::spawn(async move { p.generate(&request(&format!("r{k}")), None).await }));
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        tasks
    }

    #[tokio::test(start_paused = true)]
    async fn lazy_pools_load_on_first_need_and_grow_only_when_saturated() {
        let (budget, loads) = (Budget::new(0), Arc::new(AtomicUsize::new(0)));
        let p = pool("m", spec(3, 0), &budget, &loads).await;
        assert_eq!((p.loaded(), p.revision().as_deref()), (0, Some("r1")), "lazy, but the revision is known");
        let tasks = burst(&p, 2).await;
        assert_eq!(p.loaded(), 1, "two requests fit one instance (grow_at 2)");
        let more = burst(&p, 2).await;
        assert_eq!(p.loaded(), 2, "a saturated instance makes the pool grow");
        assert_eq!(p.loads().iter().filter(|n| **n == 2).count(), 2, "two each");
        for t in tasks.into_iter().chain(more) {
            t.await.unwrap().unwrap();
        }
        let wide = burst(&p, 20).await;
        assert_eq!(p.loaded(), 3, "never more than max");
        assert_eq!(p.loads().iter().sum::<usize>(), 20);
        for t in wide {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn least_busy_and_round_robin_spread_requests() {
        let (budget, loads) = (Budget::new(0), Arc::new(AtomicUsize::new(0)));
        let p = pool("m", PoolSpec { grow_at: 100, ..spec(3, 3) }, &budget, &loads).await;
        let tasks = burst(&p, 6).await;
        assert_eq!(p.loads(), vec![2, 2, 2]);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let rr =
            pool("r", PoolSpec { grow_at: 100, balance: Balance::RoundRobin, ..spec(2, 2) }, &budget, &loads).await;
        let tasks = burst(&rr, 4).await;
        assert_eq!(rr.loads(), vec![2, 2]);
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_instances_are_unloaded_and_come_back_on_demand() {
        let (budget, loads) = (Budget::new(0), Arc::new(AtomicUsize::new(0)));
        let p = pool("m", PoolSpec { idle_unload: Some(Duration::from_secs(10)), ..spec(2, 2) }, &budget, &loads).await;
        assert_eq!((p.loaded(), budget.used()), (2, 200));
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!((p.loaded(), budget.used()), (0, 0));
        let before = loads.load(Ordering::SeqCst);
        p.generate(&request("x"), None).await.unwrap();
        assert_eq!((p.loaded(), loads.load(Ordering::SeqCst)), (1, before + 1));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_unloads_the_least_recently_used_idle_model() {
        let (budget, loads) = (Budget::new(250), Arc::new(AtomicUsize::new(0)));
        let a = pool("a", spec(1, 1), &budget, &loads).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = pool("b", spec(1, 1), &budget, &loads).await;
        b.generate(&request("b1"), None).await.unwrap();
        let c = pool("c", PoolSpec { revision: Some("r1".into()), ..spec(1, 0) }, &budget, &loads).await;
        assert_eq!((a.loaded(), b.loaded(), c.loaded()), (1, 1, 0));
        c.generate(&request("c1"), None).await.unwrap();
        assert_eq!((a.loaded(), b.loaded(), c.loaded()), (0, 1, 1), "a was used least recently");
        // nothing idle to unload: a clear, retryable refusal
        let busy = burst(&b, 1).await;
        let busy_c = burst(&c, 1).await;
        let err = a.generate(&request("a1"), None).await.unwrap_err();
        assert_eq!((err.code, err.retryable), (ErrorCode::Overloaded, true));
        assert!(err.message.contains("memory budget"), "{}", err.message);
        for t in busy.into_iter().chain(busy_c) {
            t.await.unwrap().unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn loaded_instances_and_bytes_are_metrics() {
        let registry = prometheus::Registry::new();
        let budget = Budget::with_metrics(0, &registry).unwrap();
        let loads = Arc::new(AtomicUsize::new(0));
        let p = pool("m", PoolSpec { idle_unload: Some(Duration::from_secs(5)), ..spec(2, 2) }, &budget, &loads).await;
        let gauge = |name: &str| {
            registry.gather().iter().find(|f| f.name() == name).map(|f| f.get_metric()[0].get_gauge().get_value())
        };
        assert_eq!((gauge("fleet_model_instances"), gauge("fleet_model_memory_bytes")), (Some(2.0), Some(200.0)));
        tokio::time::sleep(Duration::from_secs(7)).await;
        assert_eq!(p.loaded(), 0);
        assert_eq!((gauge("fleet_model_instances"), gauge("fleet_model_memory_bytes")), (Some(0.0), Some(0.0)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_probe_reloads_the_instance() {
        let budget = Budget::new(0);
        let loads = Arc::new(AtomicUsize::new(0));
        // every instance fails every call: the probe fails, the slot is reloaded
        let l = loader(loads.clone(), 1.0);
        let s = PoolSpec { probe_after: Duration::from_secs(5), ..spec(1, 1) };
        let p = Pool::build("m", s, l, budget.clone(), |_, b| b).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(p.generate(&request("x"), None).await.is_err());
        assert_eq!(loads.load(Ordering::SeqCst), 2, "the instance was reloaded after its probe failed");
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_with_an_open_breaker_gets_no_requests() {
        use crate::breaker::{Board, BreakerConfig};
        let board =
            Board::unregistered(BreakerConfig { consecutive_failures: 2, open_ms: 60_000, ..Default::default() });
        // slot 0 fails every call, slot 1 never
        let n = Arc::new(AtomicUsize::new(0));
        let l: Loader = Arc::new(move || {
            let k = n.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let rate = if k == 0 { 1.0 } else { 0.0 };
                Ok(Arc::new(Synthetic::new(Duration::ZERO, 1, None, None).with_fail_rate(rate)) as Arc<dyn Backend>)
            })
        });
        let s = PoolSpec { grow_at: 100, ..spec(2, 2) };
        let p = Pool::build("m", s, l, Budget::new(0), |i, b| board.guard("m", i, b)).await.unwrap();
        let mut failures = 0;
        for k in 0..20 {
            if p.generate(&request(&format!("q{k}")), None).await.is_err() {
                failures += 1;
            }
        }
        assert_eq!(failures, 2, "only the calls that opened the sick instance's breaker failed");
        assert!(p.available());
    }
}
