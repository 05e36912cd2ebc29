//! Circuit breakers, one per model instance.
//!
//! A breaker watches the outcomes of its instance's calls. It opens after
//! `consecutive_failures` failures in a row, or when at least `window` calls
//! were seen and the failure fraction of the last `window` reaches
//! `failure_rate`. While open, calls are refused at once (the pool sends
//! them to another instance; with none left the worker naks them with a
//! delay, so other workers or a later attempt take them). After `open_ms`
//! one probe call is let through (half-open): success closes the breaker,
//! failure opens it again.
//!
//! Only model failures count (`backend_error`, `internal`); a request the
//! model rejects as invalid says nothing about the model's health.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::metrics::registered;
use retro_fleet_schemas::{ErrorCode, InferRequest};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::backend::{Attempt, Backend, BackendError, Generating, Generation};

/// When a model instance's breaker opens and how long it stays open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker (0 = never on this rule).
    pub consecutive_failures: u32,
    /// Failure fraction over the last `window` calls that opens it (0..1; 0 = never on this rule).
    pub failure_rate: f64,
    /// Calls the failure rate is measured over (and the fewest before it applies).
    pub window: u32,
    /// How long an open breaker refuses calls before one probe, in ms.
    pub open_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { consecutive_failures: 5, failure_rate: 0.5, window: 20, open_ms: 5_000 }
    }
}

/// A breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Calls pass.
    Closed,
    /// One probe call is allowed.
    HalfOpen,
    /// Calls are refused.
    Open,
}

impl State {
    /// Gauge value: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open => 2,
        }
    }

    /// Name in logs, metrics and health.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }
}

/// Pure state machine of one breaker (no clock of its own: `now` is passed in).
#[derive(Debug)]
pub struct Machine {
    cfg: BreakerConfig,
    state: State,
    /// Last outcomes, `true` = failure.
    recent: VecDeque<bool>,
    consecutive: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// Time left until a probe is allowed.
    pub retry_in: Duration,
}

impl Machine {
    /// A closed breaker.
    pub fn new(cfg: BreakerConfig) -> Self {
        Machine { cfg, state: State::Closed, recent: VecDeque::new(), consecutive: 0, open_until: None, probing: false }
    }

    /// Current state (an open breaker whose time is up reports half-open).
    pub fn state(&self, now: Instant) -> State {
        match (self.state, self.open_until) {
            (State::Open, Some(t)) if now >= t => State::HalfOpen,
            (s, _) => s,
        }
    }

    /// Whether a call would be admitted now.
    pub fn would_admit(&self, now: Instant) -> bool {
        match self.state(now) {
            State::Closed => true,
            State::HalfOpen => !self.probing,
            State::Open => false,
        }
    }

    /// Admits a call or refuses it. Returns whether the admitted call is the
    /// half-open probe.
    pub fn admit(&mut self, now: Instant) -> Result<bool, Refused> {
        match self.state(now) {
            State::Closed => Ok(false),
            State::HalfOpen if !self.probing => {
                self.state = State::HalfOpen;
                self.probing = true;
                Ok(true)
            }
            State::HalfOpen => Err(Refused { retry_in: Duration::from_millis(self.cfg.open_ms.min(1_000)) }),
            State::Open => {
                let until = self.open_until.unwrap_or(now);
                Err(Refused { retry_in: until.saturating_duration_since(now) })
            }
        }
    }

    /// Records the outcome of an admitted call; returns the new state when it changed.
    pub fn record(&mut self, now: Instant, failed: bool, probe: bool) -> Option<State> {
        let before = self.state;
        if probe {
            self.probing = false;
        }
        if failed {
            self.consecutive += 1;
        } else {
            self.consecutive = 0;
        }
        let window = self.cfg.window.max(1) as usize;
        self.recent.push_back(failed);
        while self.recent.len() > window {
            self.recent.pop_front();
        }
        match self.state {
            State::HalfOpen | State::Open if probe => {
                if failed {
                    self.open(now);
                } else {
                    self.state = State::Closed;
                    self.open_until = None;
                    self.recent.clear();
                }
            }
            State::Closed => {
                let by_streak = self.cfg.consecutive_failures > 0 && self.consecutive >= self.cfg.consecutive_failures;
                let failures = self.recent.iter().filter(|f| **f).count();
                let by_rate = self.cfg.failure_rate > 0.0
                    && self.recent.len() >= window
                    && failures as f64 >= self.cfg.failure_rate * window as f64;
                if by_streak || by_rate {
                    self.open(now);
                }
            }
            // a late outcome of a call admitted before the breaker opened
            _ => {}
        }
        (self.state != before).then_some(self.state)
    }

    /// A probe that ended without an outcome (cancelled) frees the probe slot.
    pub fn abandon_probe(&mut self) {
        self.probing = false;
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open;
        self.open_until = Some(now + Duration::from_millis(self.cfg.open_ms));
        self.probing = false;
    }

    /// Failures in a row so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }
}

/// The breakers of one worker: metrics, and a snapshot for `/health/ready`.
#[derive(Clone)]
pub struct Board {
    cfg: BreakerConfig,
    breakers: Arc<Mutex<Vec<Arc<Breaker>>>>,
    state_gauge: IntGaugeVec,
    transitions: IntCounterVec,
    refused: IntCounterVec,
}

/// One breaker as `/health/ready` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Model name.
    pub model: String,
    /// Instance index within the model's pool.
    pub instance: usize,
    /// Current state.
    pub state: State,
    /// Failures in a row.
    pub consecutive_failures: u32,
}

impl Board {
    /// A board whose breakers use `cfg`, with metrics registered on `registry`.
    pub fn new(cfg: BreakerConfig, registry: &Registry) -> prometheus::Result<Board> {
        Ok(Board {
            cfg,
            breakers: Default::default(),
            state_gauge: registered(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "fleet_breaker_state",
                        "Circuit breaker state per model instance: 0 closed, 1 half-open, 2 open",
                    ),
                    &["model", "instance"],
                )?,
            )?,
            transitions: registered(
                registry,
                IntCounterVec::new(
                    Opts::new("fleet_breaker_transitions_total", "Circuit breaker state changes, by new state"),
                    &["model", "state"],
                )?,
            )?,
            refused: registered(
                registry,
                IntCounterVec::new(
                    Opts::new("fleet_breaker_refused_total", "Calls refused because the instance's breaker was open"),
                    &["model"],
                )?,
            )?,
        })
    }

    /// A board without metrics (for tests and tools).
    pub fn unregistered(cfg: BreakerConfig) -> Board {
        Board::new(cfg, &Registry::new()).expect("fresh registry")
    }

    /// Wraps `inner`, instance `instance` of `model`, in a new breaker.
    pub fn guard(&self, model: &str, instance: usize, inner: Arc<dyn Backend>) -> Arc<dyn Backend> {
        Arc::new(Guarded { inner, breaker: self.breaker(model, instance) })
    }

    /// A new breaker for instance `instance` of `model`, closed, listed on
    /// this board (a pool's slot owns it; see [`Breaker::call`]).
    pub fn breaker(&self, model: &str, instance: usize) -> Arc<Breaker> {
        let breaker = Arc::new(Breaker {
            model: model.to_string(),
            instance,
            machine: Mutex::new(Machine::new(self.cfg.clone())),
            board: self.clone(),
        });
        self.state_gauge.with_label_values(&[model, &instance.to_string()]).set(0);
        self.breakers.lock().expect("breaker list").push(breaker.clone());
        breaker
    }

    /// Every breaker's state.
    pub fn snapshot(&self) -> Vec<Snapshot> {
        let now = Instant::now();
        let list = self.breakers.lock().expect("breaker list").clone();
        list.iter()
            .map(|b| {
                let m = b.machine.lock().expect("breaker");
                Snapshot {
                    model: b.model.clone(),
                    instance: b.instance,
                    state: m.state(now),
                    consecutive_failures: m.consecutive_failures(),
                }
            })
            .collect()
    }
}

/// The breaker of one model instance.
pub struct Breaker {
    model: String,
    instance: usize,
    machine: Mutex<Machine>,
    board: Board,
}

impl Breaker {
    /// Whether a call now would be admitted (false while open).
    pub fn available(&self) -> bool {
        self.machine.lock().expect("breaker").would_admit(Instant::now())
    }

    /// Runs the call `run` starts if the breaker admits it, and records its
    /// outcome; a refused call fails at once, retryably, and `run` is never
    /// called.
    pub async fn call<F, G>(&self, run: F) -> Result<Generation, BackendError>
    where
        F: FnOnce() -> G,
        G: Future<Output = Result<Generation, BackendError>>,
    {
        let probe = self.admit()?;
        let mut guard = ProbeGuard { breaker: self, armed: probe };
        let out = run().await;
        guard.armed = false;
        let failed = matches!(&out, Err(e) if matches!(e.code, ErrorCode::BackendError | ErrorCode::Internal));
        let change = self.machine.lock().expect("breaker").record(Instant::now(), failed, probe);
        if let Some(state) = change {
            let why = match &out {
                Err(e) => e.message.clone(),
                Ok(_) => String::new(),
            };
            self.changed(state, &why);
        }
        out
    }

    /// Admits a call (true: it is the half-open probe) or refuses it with
    /// the error the caller gets.
    fn admit(&self) -> Result<bool, BackendError> {
        let admitted = {
            let mut m = self.machine.lock().expect("breaker");
            let was = m.state;
            let admitted = m.admit(Instant::now());
            if admitted == Ok(true) && was == State::Open {
                drop(m);
                self.changed(State::HalfOpen, "open time elapsed");
            }
            admitted
        };
        admitted.map_err(|r| {
            self.board.refused.with_label_values(&[&self.model]).inc();
            BackendError {
                code: ErrorCode::BackendError,
                message: format!(
                    "model `{}` instance {} is failing (circuit open); retry in {} ms",
                    self.model,
                    self.instance,
                    r.retry_in.as_millis()
                ),
                retryable: true,
            }
        })
    }

    fn changed(&self, state: State, why: &str) {
        let instance = self.instance.to_string();
        self.board.state_gauge.with_label_values(&[&self.model, &instance]).set(state.gauge());
        self.board.transitions.with_label_values(&[&self.model, state.as_str()]).inc();
        match state {
            State::Open => {
                tracing::warn!(model = %self.model, instance = self.instance, %why, "circuit breaker opened")
            }
            State::HalfOpen => {
                tracing::info!(model = %self.model, instance = self.instance, "circuit breaker half-open: probing")
            }
            State::Closed => tracing::info!(model = %self.model, instance = self.instance, "circuit breaker closed"),
        }
    }
}

/// A backend behind its breaker.
struct Guarded {
    inner: Arc<dyn Backend>,
    breaker: Arc<Breaker>,
}

/// Frees the half-open probe slot when a probe call is dropped unfinished.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.machine.lock().expect("breaker").abandon_probe();
        }
    }
}

impl Backend for Guarded {
    fn revision(&self) -> Option<String> {
        self.inner.revision()
    }

    fn available(&self) -> bool {
        self.breaker.available()
    }

    fn generate<'a>(&'a self, req: &'a InferRequest, attempt: Attempt) -> Generating<'a> {
        Box::pin(self.breaker.call(move || self.inner.generate(req, attempt)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig { consecutive_failures: 3, failure_rate: 0.5, window: 10, open_ms: 1_000 }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_then_a_probe_closes() {
        let mut m = Machine::new(cfg());
        let t0 = Instant::now();
        assert_eq!(m.record(t0, true, false), None);
        assert_eq!(m.record(t0, true, false), None);
        assert_eq!(m.record(t0, true, false), Some(State::Open));
        assert_eq!(m.admit(t0), Err(Refused { retry_in: Duration::from_secs(1) }));
        assert!(!m.would_admit(t0 + Duration::from_millis(999)));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(m.state(later), State::HalfOpen);
        assert_eq!(m.admit(later), Ok(true), "one probe");
        assert!(m.admit(later).is_err(), "only one probe at a time");
        assert_eq!(m.record(later, false, true), Some(State::Closed));
        assert_eq!(m.admit(later), Ok(false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_an_abandoned_one_frees_the_slot() {
        let mut m = Machine::new(cfg());
        let t0 = Instant::now();
        for _ in 0..3 {
            m.record(t0, true, false);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(m.admit(t1), Ok(true));
        m.abandon_probe();
        assert_eq!(m.admit(t1), Ok(true), "abandoned probe slot is free again");
        assert_eq!(m.record(t1, true, true), Some(State::Open));
        assert!(m.admit(t1 + Duration::from_millis(500)).is_err());
        assert_eq!(m.state(t1 + Duration::from_secs(1)), State::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_opens_only_over_a_full_window() {
        let mut m = Machine::new(cfg());
        let t = Instant::now();
        // alternate: never 3 in a row, 50% failures
        for i in 0..9 {
            assert_eq!(m.record(t, i % 2 == 0, false), None, "call {i}: window not full yet");
        }
        // 10th call: 5 failures of 10
        assert_eq!(m.record(t, false, false), Some(State::Open));
    }

    #[tokio::test(start_paused = true)]
    async fn successes_keep_it_closed() {
        let mut m = Machine::new(cfg());
        let t = Instant::now();
        for i in 0..100 {
            // one failure in five: below both thresholds
            assert_eq!(m.record(t, i % 5 == 0, false), None);
        }
        assert_eq!(m.state(t), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_guarded_backend_refuses_fast_while_open_and_recovers() {
        use crate::backend::synthetic::Synthetic;
        let board = Board::unregistered(cfg());
        let failing = Arc::new(Synthetic::new(Duration::from_millis(10), 1, None, None).with_fail_rate(1.0));
        let b = board.guard("m", 0, failing);
        let req = crate::backend::tests_support::request("x");
        for _ in 0..3 {
            let e = b.generate(&req, Attempt::default()).await.unwrap_err();
            assert!(e.message.contains("synthetic failure"), "{e}");
        }
        assert!(!b.available());
        let e = b.generate(&req, Attempt::default()).await.unwrap_err();
        assert!(e.message.contains("circuit open") && e.retryable, "{e}");
        assert_eq!(board.snapshot()[0].state, State::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(board.snapshot()[0].state, State::HalfOpen);
        assert!(b.available());
    }
}
