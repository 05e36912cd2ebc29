//! The recommender on synthetic series (see `recommend`).

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
