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
#[path = "recommend_tests.rs"]
mod tests;
