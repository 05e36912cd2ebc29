//! The replica recommender: a pure function of the policy, the previous
//! state and one sample of a model's queues. No clock, no I/O: time comes in
//! with the sample, so every behaviour is tested with synthetic series.
//!
//! Per sample it computes the replicas needed to
//! - keep up with arrivals with headroom (`arrival × headroom / μ`), and
//! - drain the priority-weighted backlog within the drain target
//!   (`Σ wₚ·backlogₚ / drain_target / μ`),
//!
//! where μ is one worker's service rate (requests/s). Scaling up is
//! immediate. Scaling down goes to the smallest count that still has
//! `tolerance` spare over the highest need seen within the cool-down window
//! (a stabilisation window, as the Kubernetes HPA has, plus a dead band), so
//! a noisy signal cannot make the count flap. After `idle_to_zero_secs` with
//! no backlog and no arrivals the recommendation is zero; any backlog brings
//! it back to at least `min_replicas` on the next sample.
//!
//! Cold starts: a model that takes time to load (as workers measured it)
//! keeps queueing at the current deficit (arrivals over what the serving
//! workers do) until new workers serve. That growth is counted in the
//! backlog to drain, so the count asked for at a step is the one needed
//! when the workers arrive, rather than one more each sample as the queue
//! builds. Replicas recommended but not yet serving (recommended minus live
//! workers, within the load time of the last scale-up) are coming capacity:
//! the count is not lowered while they load.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// The scaler's settings (`[scaler]`): how the recommender turns load into
/// replicas, and how often and over what window the sampler looks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Time between samples, in ms.
    pub interval_ms: u64,
    /// Window of the lag and latency trends and of the anomaly baseline, in seconds.
    pub window_secs: u64,
    /// Models to recommend for; empty = every model with a worker consumer.
    pub models: Vec<String>,
    /// Fewest replicas while a model has traffic.
    pub min_replicas: u32,
    /// Most replicas ever recommended.
    pub max_replicas: u32,
    /// Capacity kept above the arrival rate (1.25 = 25 % spare).
    pub headroom: f64,
    /// Time within which a backlog should be drained, in seconds.
    pub drain_target_secs: f64,
    /// How long the need must stay lower before scaling down, in seconds.
    pub scale_down_cooldown_secs: f64,
    /// Spare capacity kept over the peak need when scaling down (0.1 = 10 %).
    pub tolerance: f64,
    /// Idle time (no backlog, no arrivals) before zero replicas are
    /// recommended, in seconds; 0 never recommends zero.
    pub idle_to_zero_secs: f64,
    /// Backlog weight of high-priority requests (2 = drained in half the target).
    pub weight_high: f64,
    /// Backlog weight of normal-priority requests.
    pub weight_normal: f64,
    /// Backlog weight of low-priority requests.
    pub weight_low: f64,
    /// One worker's service rate (requests/s) assumed until one is measured
    /// (it is measured whenever requests wait while workers run).
    pub default_service_rate: f64,
    /// Robust z-score above which lag growth or latency is an anomaly.
    pub anomaly_z: f64,
    /// Seconds a new worker takes before it loads its models (scheduling,
    /// image pull, connecting), added to the load time workers measure.
    pub startup_secs: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            interval_ms: 5_000,
            window_secs: 300,
            models: Vec::new(),
            min_replicas: 1,
            max_replicas: 20,
            headroom: 1.25,
            drain_target_secs: 60.0,
            scale_down_cooldown_secs: 300.0,
            tolerance: 0.1,
            idle_to_zero_secs: 900.0,
            weight_high: 2.0,
            weight_normal: 1.0,
            weight_low: 0.5,
            default_service_rate: 10.0,
            anomaly_z: super::stats::ANOMALY_Z,
            startup_secs: 30.0,
        }
    }
}

impl Policy {
    /// The backlog weight of each priority: high, normal, low.
    pub fn priority_weights(&self) -> [f64; 3] {
        [self.weight_high, self.weight_normal, self.weight_low]
    }
}

/// One observation of one model's queues.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// Seconds since any fixed origin (only differences matter).
    pub t: f64,
    /// Waiting plus unacknowledged requests per priority: high, normal, low.
    pub backlog: [u64; 3],
    /// Requests arriving per second since the previous sample.
    pub arrival_rate: f64,
    /// Requests completed per second since the previous sample.
    pub completion_rate: f64,
    /// Live workers serving the model.
    pub workers: u32,
    /// Measured service rate of one worker (requests/s), when the workers
    /// were saturated long enough to measure it.
    pub service_rate: Option<f64>,
    /// How long a worker takes to load the model, in seconds, as workers
    /// measured it (`None`: not known yet, taken as instant).
    pub load_secs: Option<f64>,
}

impl Sample {
    /// Total backlog over all priorities.
    pub fn total_backlog(&self) -> u64 {
        self.backlog.iter().sum()
    }
}

/// What the recommender remembers between samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// The current recommendation.
    pub replicas: u32,
    /// Within the cool-down window: (t, replicas the load needs, floor).
    window: VecDeque<(f64, f64, u32)>,
    /// Since when the model has had no backlog and no arrivals.
    idle_since: Option<f64>,
    /// Last measured service rate of one worker, smoothed.
    service_rate: Option<f64>,
    /// When the recommendation was last raised.
    raised_at: Option<f64>,
    /// The model's load time, last reported (kept while no worker runs it).
    load_secs: Option<f64>,
    /// The previous sample's arrival rate.
    last_arrival: f64,
}

/// Why the recommendation is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Unchanged: the desired count is within the tolerance or cooling down.
    Stable,
    /// Raised to meet arrivals and drain the backlog.
    ScaleUp,
    /// Lowered after the cool-down window.
    ScaleDown,
    /// Idle long enough: zero replicas.
    Idle,
    /// Clamped by `max_replicas`.
    AtMax,
    /// Held while recommended workers are still loading the model.
    Loading,
}

/// One recommendation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    /// Replicas to run.
    pub replicas: u32,
    /// What this sample alone asks for (before cool-down), clamped.
    pub desired: u32,
    /// Service rate of one worker used (requests/s).
    pub service_rate: f64,
    /// Priority-weighted backlog.
    pub weighted_backlog: f64,
    /// Seconds to drain the backlog with the recommended replicas at the
    /// service rate, net of arrivals; `None` if they cannot keep up.
    pub drain_secs_at_recommended: Option<f64>,
    /// Why.
    pub reason: Reason,
}

/// Weight given to a new service-rate measurement.
const SERVICE_RATE_SMOOTHING: f64 = 0.5;

/// Computes the recommendation for `sample` and updates `state`.
pub fn recommend(policy: &Policy, state: &mut State, sample: &Sample) -> Recommendation {
    if let Some(mu) = sample.service_rate.filter(|m| m.is_finite() && *m > 0.0) {
        state.service_rate = Some(match state.service_rate {
            Some(old) => old + SERVICE_RATE_SMOOTHING * (mu - old),
            None => mu,
        });
    }
    let mu = state.service_rate.unwrap_or(policy.default_service_rate).max(1e-9);
    let arrival = sample.arrival_rate.max(0.0);
    let weighted: f64 =
        sample.backlog.iter().zip(policy.priority_weights()).map(|(&b, w)| b as f64 * w.max(0.0)).sum::<f64>();
    let backlog = sample.total_backlog();

    // recommended replicas still within the time a new worker takes to
    // serve (start-up plus the model's load time) are coming; until they
    // (or any asked for now) serve, the queue grows at the deficit, at the
    // arrival rate two samples in a row have seen (a one-off burst is
    // backlog, not a rate to project)
    if let Some(load) = sample.load_secs.filter(|l| l.is_finite() && *l >= 0.0) {
        state.load_secs = Some(load);
    }
    let to_serve = state.load_secs.map(|l| l + policy.startup_secs.max(0.0));
    let loading_for = match (state.raised_at, to_serve) {
        (Some(at), Some(wait)) if sample.workers < state.replicas => (at + wait - sample.t).max(0.0),
        _ => 0.0,
    };
    let until_served = if loading_for > 0.0 { loading_for } else { to_serve.unwrap_or(0.0) };
    let steady_arrival = arrival.min(std::mem::replace(&mut state.last_arrival, arrival));
    let deficit = (steady_arrival - sample.workers as f64 * mu).max(0.0);
    let mean_weight = if backlog > 0 { weighted / backlog as f64 } else { policy.weight_normal.max(0.0) };
    let to_drain = weighted + deficit * until_served * mean_weight;
    let needed = arrival * policy.headroom.max(1.0) / mu + to_drain / policy.drain_target_secs.max(1e-3) / mu;
    // A few thousandths over an integer is float noise, not a replica.
    let raw = (needed - 1e-6).ceil().max(0.0);
    let max = policy.max_replicas.max(policy.min_replicas);
    let busy = backlog > 0 || arrival > 0.0;
    let mut desired = if busy { (raw as u32).max(policy.min_replicas.max(1)) } else { raw as u32 };
    let mut at_max = false;
    if desired > max {
        desired = max;
        at_max = true;
    }

    // idle tracking: scale to zero only after a long quiet spell
    if busy {
        state.idle_since = None;
    } else if state.idle_since.is_none() {
        state.idle_since = Some(sample.t);
    }
    let idle_for = state.idle_since.map(|s| sample.t - s).unwrap_or(0.0);
    let quiet_floor = policy.min_replicas.min(max);
    if !busy {
        // no traffic: hold at least the floor until idle long enough
        desired = desired.max(quiet_floor);
    }

    let floor = if busy { policy.min_replicas.max(1).min(max) } else { quiet_floor };
    state.window.push_back((sample.t, needed, floor));
    let horizon = sample.t - policy.scale_down_cooldown_secs.max(0.0);
    while state.window.front().is_some_and(|&(t, _, _)| t < horizon) {
        state.window.pop_front();
    }
    let peak_need = state.window.iter().map(|&(_, n, _)| n).fold(0.0, f64::max);
    let peak_floor = state.window.iter().map(|&(_, _, f)| f).max().unwrap_or(floor);
    let down_to =
        ((peak_need * (1.0 + policy.tolerance.max(0.0)) - 1e-6).ceil().max(0.0) as u32).max(peak_floor).min(max);

    let prev = state.replicas;
    let (replicas, reason) = if policy.idle_to_zero_secs > 0.0 && !busy && idle_for >= policy.idle_to_zero_secs {
        (0, if prev == 0 { Reason::Stable } else { Reason::Idle })
    } else if desired > prev {
        if loading_for == 0.0 {
            state.raised_at = Some(sample.t);
        }
        (desired, if at_max { Reason::AtMax } else { Reason::ScaleUp })
    } else if loading_for > 0.0 {
        (prev, Reason::Loading)
    } else if down_to < prev {
        (down_to, Reason::ScaleDown)
    } else if at_max {
        (prev, Reason::AtMax)
    } else {
        (prev, Reason::Stable)
    };
    state.replicas = replicas;

    let capacity = replicas as f64 * mu;
    let drain = if backlog == 0 {
        Some(0.0)
    } else if capacity > arrival {
        Some(backlog as f64 / (capacity - arrival))
    } else {
        None
    };
    Recommendation {
        replicas,
        desired,
        service_rate: mu,
        weighted_backlog: weighted,
        drain_secs_at_recommended: drain,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min_replicas: 1,
            max_replicas: 50,
            headroom: 1.25,
            drain_target_secs: 60.0,
            scale_down_cooldown_secs: 60.0,
            tolerance: 0.1,
            idle_to_zero_secs: 120.0,
            weight_high: 2.0,
            weight_normal: 1.0,
            weight_low: 0.5,
            default_service_rate: 10.0,
            ..Policy::default()
        }
    }

    fn sample(t: f64, arrival: f64, backlog: u64) -> Sample {
        Sample {
            t,
            backlog: [0, backlog, 0],
            arrival_rate: arrival,
            completion_rate: arrival,
            workers: 1,
            service_rate: Some(10.0),
            load_secs: None,
        }
    }

    /// Runs a series every 5 s; returns the recommendations.
    fn run(p: &Policy, series: impl IntoIterator<Item = (f64, u64)>) -> Vec<Recommendation> {
        let mut st = State::default();
        series
            .into_iter()
            .enumerate()
            .map(|(i, (arr, backlog))| recommend(p, &mut st, &sample(i as f64 * 5.0, arr, backlog)))
            .collect()
    }

    #[test]
    fn steady_load_gives_a_stable_count() {
        // 40 req/s at 10 req/s per worker with 25 % headroom: 5 workers
        let recs = run(&policy(), std::iter::repeat_n((40.0, 0), 100));
        assert!(recs.iter().all(|r| r.replicas == 5), "{:?}", recs.iter().map(|r| r.replicas).collect::<Vec<_>>());
        assert!(recs[1..].iter().all(|r| r.reason == Reason::Stable));
    }

    #[test]
    fn step_up_scales_within_two_samples() {
        let series: Vec<_> = (0..20).map(|i| if i < 10 { (10.0, 0) } else { (80.0, 0) }).collect();
        let recs = run(&policy(), series);
        assert_eq!(recs[9].replicas, 2);
        // the step is seen in the first sample after it (rates are deltas)
        let first_high = (10..20).find(|&i| recs[i].replicas >= 10).expect("scaled up");
        assert!(first_high <= 11, "scaled up only at sample {first_high}");
        assert_eq!(recs[10].reason, Reason::ScaleUp);
        assert_eq!(recs[19].replicas, 10);
    }

    #[test]
    fn backlog_drain_target_is_honoured() {
        let p = policy();
        for (backlog, arrival) in [(600u64, 0.0), (6_000, 0.0), (12_000, 30.0), (1, 0.0)] {
            let mut st = State::default();
            let r = recommend(&p, &mut st, &sample(0.0, arrival, backlog));
            let drain = r.drain_secs_at_recommended.expect("recommended replicas keep up");
            assert!(drain <= p.drain_target_secs + 1e-9, "backlog {backlog}: drains in {drain} s");
            // and not grossly over-provisioned: one replica fewer would miss the target
            if r.replicas > p.min_replicas {
                let fewer = (r.replicas - 1) as f64 * 10.0 - arrival * p.headroom;
                assert!(fewer <= 0.0 || backlog as f64 / fewer > p.drain_target_secs, "backlog {backlog}: {r:?}");
            }
        }
    }

    #[test]
    fn high_priority_backlog_weighs_more() {
        let p = policy();
        let mut a = State::default();
        let mut b = State::default();
        let high = Sample { backlog: [3_000, 0, 0], ..sample(0.0, 0.0, 0) };
        let low = Sample { backlog: [0, 0, 3_000], ..sample(0.0, 0.0, 0) };
        let rh = recommend(&p, &mut a, &high);
        let rl = recommend(&p, &mut b, &low);
        assert_eq!(rh.replicas, 10, "{rh:?}");
        assert_eq!(rl.replicas, 3, "{rl:?}");
    }

    #[test]
    fn noisy_input_does_not_flap() {
        // 40 req/s ± 25 % pseudo-random noise, backlog jitter
        let mut x: u64 = 0x9E3779B97F4A7C15;
        let series: Vec<_> = (0..400)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x % 10_000) as f64 / 10_000.0;
                (40.0 * (0.75 + 0.5 * u), x % 50)
            })
            .collect();
        // with the shipped cool-down (300 s = 60 samples); with 60 s, twelve
        // quiet samples in a row happen about once in 400 and cost one step
        let recs = run(&Policy { scale_down_cooldown_secs: 300.0, ..policy() }, series);
        let counts: Vec<u32> = recs.iter().map(|r| r.replicas).collect();
        let desired: Vec<u32> = recs.iter().map(|r| r.desired).collect();
        let desired_changes = desired.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(desired_changes > 50, "the input is really noisy ({desired_changes} changes of the raw desire)");
        let downs = counts.windows(2).filter(|w| w[1] < w[0]).count();
        let ups = counts.windows(2).filter(|w| w[1] > w[0]).count();
        assert_eq!(downs, 0, "scaled down under stationary load: {counts:?}");
        assert!(ups <= 3, "only the first peaks raise it: {counts:?}");
        // and it covers the peaks: never below what the mean needs
        assert!(counts[10..].iter().all(|&c| c >= 5), "{counts:?}");
    }

    #[test]
    fn scale_down_waits_for_the_cooldown() {
        let p = policy();
        let series: Vec<_> = (0..40).map(|i| if i < 10 { (80.0, 0) } else { (20.0, 0) }).collect();
        let recs = run(&p, series);
        assert_eq!(recs[9].replicas, 10);
        // 60 s cool-down at 5 s samples: still 10 for 12 samples after the drop
        for r in &recs[10..22] {
            assert_eq!(r.replicas, 10, "{r:?}");
        }
        let down = (22..40).find(|&i| recs[i].replicas < 10).expect("scaled down");
        assert!(down <= 23, "scaled down only at {down}");
        assert_eq!(recs[down].reason, Reason::ScaleDown);
        assert_eq!(recs[39].replicas, 3);
    }

    #[test]
    fn small_drops_within_tolerance_are_ignored() {
        let p = Policy { tolerance: 0.2, ..policy() };
        // 10 workers, then a desire of 9 (a 10 % drop): stays at 10
        let series: Vec<_> = (0..60).map(|i| if i < 5 { (80.0, 0) } else { (72.0, 0) }).collect();
        let recs = run(&p, series);
        assert!(recs[5..].iter().all(|r| r.replicas == 10));
    }

    #[test]
    fn scales_to_zero_when_idle_and_back() {
        let p = policy();
        let mut st = State::default();
        let mut t = 0.0;
        let mut step = |arr: f64, backlog: u64, st: &mut State| {
            t += 5.0;
            recommend(&p, st, &sample(t, arr, backlog))
        };
        for _ in 0..5 {
            step(20.0, 0, &mut st);
        }
        assert_eq!(st.replicas, 3);
        // idle: cooled down to min, then zero after idle_to_zero (120 s)
        let idle: Vec<_> = (0..40).map(|_| step(0.0, 0, &mut st)).collect();
        let zero_at = idle.iter().position(|r| r.replicas == 0).expect("scaled to zero");
        assert!((zero_at + 1) as f64 * 5.0 >= p.idle_to_zero_secs, "zero too early, after {} samples", zero_at + 1);
        assert!((zero_at as f64) * 5.0 <= p.idle_to_zero_secs + 5.0, "zero too late");
        assert_eq!(idle[zero_at].reason, Reason::Idle);
        assert!(idle[..zero_at].iter().all(|r| r.replicas >= 1));
        assert!(idle[zero_at..].iter().all(|r| r.replicas == 0));
        // a backlog appears with no workers: back up at once
        let back = recommend(&p, &mut st, &Sample { workers: 0, ..sample(t + 5.0, 0.0, 1_200) });
        assert_eq!(back.replicas, 2, "{back:?}");
        assert_eq!(back.reason, Reason::ScaleUp);
        // one request is enough to leave zero
        let mut st = State { replicas: 0, ..Default::default() };
        assert_eq!(recommend(&p, &mut st, &Sample { workers: 0, ..sample(0.0, 0.0, 1) }).replicas, 1);
    }

    #[test]
    fn never_zero_when_idle_to_zero_is_off() {
        let p = Policy { idle_to_zero_secs: 0.0, ..policy() };
        let recs = run(&p, std::iter::repeat_n((0.0, 0), 200));
        assert!(recs.iter().all(|r| r.replicas == 1), "min_replicas holds");
    }

    #[test]
    fn clamped_to_max() {
        let p = Policy { max_replicas: 4, ..policy() };
        let recs = run(&p, [(1_000.0, 100_000)]);
        assert_eq!(recs[0].replicas, 4);
        assert_eq!(recs[0].reason, Reason::AtMax);
        assert_eq!(recs[0].drain_secs_at_recommended, None, "4 workers cannot keep up with 1000/s");
    }

    #[test]
    fn service_rate_is_learned_and_smoothed() {
        let p = policy();
        let mut st = State::default();
        let mut s = sample(0.0, 100.0, 0);
        s.service_rate = None;
        assert_eq!(recommend(&p, &mut st, &s).service_rate, 10.0, "default until measured");
        s.service_rate = Some(50.0);
        s.t = 5.0;
        assert_eq!(recommend(&p, &mut st, &s).service_rate, 50.0);
        s.service_rate = Some(30.0);
        s.t = 10.0;
        assert_eq!(recommend(&p, &mut st, &s).service_rate, 40.0);
        s.service_rate = None;
        s.t = 15.0;
        let r = recommend(&p, &mut st, &s);
        assert_eq!(r.service_rate, 40.0, "kept while not measurable");
        assert_eq!(r.desired, 4, "100/s × 1.25 / 40");
        // nonsense measurements are ignored
        s.service_rate = Some(f64::NAN);
        assert_eq!(recommend(&p, &mut st, &s).service_rate, 40.0);
        s.service_rate = Some(0.0);
        assert_eq!(recommend(&p, &mut st, &s).service_rate, 40.0);
    }

    /// A model whose workers take 40 s to load, under a step from 10 to 60
    /// req/s at t = 50 s, with the scaler told the load time (`known`) or
    /// not. Returns each sample's recommendation and backlog.
    fn cold_start(known: bool) -> Vec<(u32, u64)> {
        let p = Policy { startup_secs: 0.0, ..policy() };
        let mut st = State::default();
        let mut coming: Vec<(f64, u32)> = Vec::new(); // (serving from, count)
        let (mut workers, mut backlog, mut last) = (2u32, 0f64, 0u32);
        let mut out = Vec::new();
        for i in 0..60 {
            let t = i as f64 * 5.0;
            let arrival = if t < 50.0 { 10.0 } else { 60.0 };
            coming.retain(|&(at, n)| {
                if at <= t {
                    workers = workers.max(n);
                }
                at > t
            });
            backlog = (backlog + 5.0 * (arrival - workers as f64 * 10.0)).max(0.0);
            let s = Sample {
                t,
                backlog: [0, backlog as u64, 0],
                arrival_rate: arrival,
                completion_rate: arrival.min(workers as f64 * 10.0),
                workers,
                service_rate: Some(10.0),
                load_secs: known.then_some(40.0),
            };
            let r = recommend(&p, &mut st, &s);
            if r.replicas > last {
                coming.push((t + 40.0, r.replicas));
            }
            last = r.replicas;
            out.push((r.replicas, backlog as u64));
        }
        out
    }

    #[test]
    fn a_slow_loading_model_gets_the_count_it_needs_at_once() {
        let (blind, aware) = (cold_start(false), cold_start(true));
        let replicas = |r: &[(u32, u64)]| r.iter().map(|r| r.0).collect::<Vec<_>>();
        // once the step is seen twice (sample 11) it asks for what it needs
        // when the new workers serve: 60 req/s with 25 % headroom is 7.5
        // workers, plus the queue that builds over the load (2 workers
        // serve 20 of the 60 req/s) drained within the 60 s target: 11
        assert_eq!(aware[11].0, 11, "{:?}", replicas(&aware));
        // and holds it while they load, instead of one more each sample
        assert!(aware[11..18].iter().all(|r| r.0 == 11), "{:?}", replicas(&aware));
        // blind to the load time, it asks for less and climbs as the queue builds
        assert!(blind[11].0 < aware[11].0 && blind[17].0 > blind[11].0, "{:?}", replicas(&blind));
        // not over-scaled: no more than the blind scaler reaches late
        let peak = |r: &[(u32, u64)]| r.iter().map(|r| r.0).max().unwrap();
        assert!(peak(&aware) <= peak(&blind) + 1, "{:?}\n{:?}", replicas(&aware), replicas(&blind));
        // so the queue is gone sooner
        let drained = |r: &[(u32, u64)]| (11..r.len()).find(|&i| r[i].1 == 0).unwrap();
        assert!(drained(&aware) < drained(&blind), "aware {aware:?}\nblind {blind:?}");
    }

    #[test]
    fn a_burst_is_not_projected_and_a_load_time_outlives_the_workers() {
        let p = Policy { startup_secs: 0.0, max_replicas: 500, ..policy() };
        let s = |t: f64, arrival: f64, backlog: u64, workers: u32, load: Option<f64>| Sample {
            t,
            backlog: [0, backlog, 0],
            arrival_rate: arrival,
            completion_rate: 0.0,
            workers,
            service_rate: Some(10.0),
            load_secs: load,
        };
        // a batch of 2,000 lands in one interval: 400 req/s for one sample;
        // draining it takes 2000 / 60 / 10 = 3.3 workers, plus the rate
        // with headroom (50), not 390 req/s over capacity projected over a
        // 40 s load (26 more)
        let mut st = State::default();
        recommend(&p, &mut st, &s(0.0, 0.0, 0, 1, Some(40.0)));
        let r = recommend(&p, &mut st, &s(5.0, 400.0, 2000, 1, Some(40.0)));
        assert_eq!(r.replicas, 54, "{r:?}");
        // scaled to zero, the model's load time is still known from before
        let mut st = State::default();
        recommend(&p, &mut st, &s(0.0, 10.0, 0, 2, Some(40.0)));
        recommend(&p, &mut st, &s(5.0, 60.0, 100, 0, None));
        let r = recommend(&p, &mut st, &s(10.0, 60.0, 400, 0, None));
        // 7.5 + (400 + 60 req/s x the 30 s left of the load) / 60 / 10 =
        // 11.2; with the load time forgotten it would stay at 9
        assert_eq!(r.replicas, 12, "{r:?}");
    }

    #[test]
    fn workers_still_loading_are_not_scaled_down() {
        let p = Policy { scale_down_cooldown_secs: 0.0, startup_secs: 0.0, ..policy() };
        let mut st = State::default();
        let s = |t: f64, arrival: f64, backlog: u64, workers: u32| Sample {
            t,
            backlog: [0, backlog, 0],
            arrival_rate: arrival,
            completion_rate: 0.0,
            workers,
            service_rate: Some(10.0),
            load_secs: Some(40.0),
        };
        // 80 req/s with headroom is 10 workers
        assert_eq!(recommend(&p, &mut st, &s(0.0, 80.0, 0, 1)).replicas, 10);
        // the burst stopped, the 10 are still loading: held, not lowered
        let r = recommend(&p, &mut st, &s(5.0, 5.0, 0, 1));
        assert_eq!((r.replicas, r.reason), (10, Reason::Loading));
        // loaded (or their load time is over): lowered as usual
        let r = recommend(&p, &mut st, &s(45.0, 5.0, 0, 10));
        assert_eq!((r.replicas, r.reason), (1, Reason::ScaleDown));
    }
}
