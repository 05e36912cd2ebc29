//! Fair sharing between tenants inside a class: real nats-server, real
//! `retro-fleet worker` processes, requests published to tenants' lanes.
//!
//! The model is `synthetic` (it sleeps 20 ms per request), so two workers of
//! 8 slots each serve about 800 requests a second and a flood of thousands
//! keeps them busy for seconds.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use retro_fleet_schemas::{codec, subjects, Envelope, InferResult, Priority};
use retro_fleet_worker::fair::jain;

const FLEET: &str = "[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 20\n";

fn config() -> String {
    // `[worker]` is open in the base config: these lines belong to it. A
    // lane takes its turn only with a message here: the default batch (a
    // quarter of it prefetched per lane) covers this turnover.
    format!("max_inflight = 8\nfair_burst = 4\n{FLEET}")
}

/// Publishes request `id` of `tenant` to the tenant's lane.
async fn publish(caller: &Caller, tenant: &str, id: &str) {
    let req = request(id, "slow", "x");
    let h = Envelope::new(id).tenant(tenant).headers();
    let subject = subjects::tenant_request(Priority::Normal, "slow", tenant);
    caller.publish_raw(&subject, id, h, Bytes::from(codec::encode(&req))).await;
}

/// `n` requests of `tenant` (ids `<tenant>-<from + i>`), one every `every`.
async fn steady(caller: &Caller, tenant: &str, from: usize, n: usize, every: Duration) {
    let mut tick = tokio::time::interval(every);
    for i in from..from + n {
        tick.tick().await;
        publish(caller, tenant, &format!("{tenant}-{i}")).await;
    }
}

fn p95(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[((x.len() as f64 * 0.95).ceil() as usize).clamp(1, x.len()) - 1]
}

/// The queue waits of `tenant`'s results, in ms.
fn waits(results: &[(String, InferResult)], tenant: &str) -> Vec<f64> {
    let prefix = format!("{tenant}-");
    results.iter().filter(|(id, _)| id.starts_with(&prefix)).map(|(_, r)| r.timings.queued_ms).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_in_one_lane_does_not_delay_a_steady_tenant() {
    let s = setup(&config());
    let (_w1, _) = worker(&s.config).await;
    let (_w2, _) = worker(&s.config).await;
    let mut caller = Caller::connect(&s.nats.url()).await;
    let flooder = Caller::connect(&s.nats.url()).await;

    // b alone: 100 requests at 50 a second
    steady(&caller, "b", 0, 100, Duration::from_millis(20)).await;
    let (alone, dups) = caller.collect(100, Duration::from_secs(30)).await;
    assert_eq!((alone.len(), dups), (100, 0));
    let alone = p95(waits(&alone, "b"));

    // a floods 5,000; b sends 200 more at the same pace meanwhile
    let flood = tokio::spawn(async move {
        for i in 0..5_000 {
            publish(&flooder, "a", &format!("a-{i}")).await;
        }
        flooder
    });
    let js = async_nats::jetstream::new(caller.client.clone());
    while stream_len(&js, subjects::request_stream(Priority::Normal)).await < 500 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    steady(&caller, "b", 100, 200, Duration::from_millis(20)).await;
    let mut flooder = flood.await.unwrap();
    let (b, dups) = caller.collect(200, Duration::from_secs(60)).await;
    assert_eq!((b.len(), dups), (200, 0), "b lost or duplicated requests");
    let a_left = stream_len(&js, subjects::request_stream(Priority::Normal)).await;
    let flooded = p95(waits(&b, "b"));
    println!(
        "b's p95 queue wait: alone {alone:.1} ms, beside a's flood {flooded:.1} ms; a's backlog after b: {a_left}"
    );
    assert!(a_left > 0, "the flood was over before b finished: the test measured nothing");
    // a few ms of scheduling noise on a loaded machine are not unfairness:
    // without lanes b would wait behind thousands of a's requests (seconds)
    assert!(flooded <= 2.0 * alone.max(5.0), "b waited {flooded:.1} ms beside the flood, {alone:.1} ms alone");

    let (a, dups) = flooder.collect(5_000, Duration::from_secs(60)).await;
    assert_eq!((a.len(), dups), (5_000, 0), "a lost or duplicated requests");
}

/// Queues 1,500 requests each of `a` and `c` with weights `wa` and `wc`,
/// then starts two workers: returns how many of each the first 1,000
/// results served (both tenants saturate throughout).
async fn first_thousand(wa: f64, wc: f64) -> [f64; 2] {
    let s = setup(&config());
    for (tenant, w) in [("a", wa), ("c", wc)] {
        let out = cli(&s.config, &["tenants", "set", tenant, "--weight", &w.to_string()], &[]);
        assert!(out.status.success(), "tenants set: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut caller = Caller::connect(&s.nats.url()).await;
    // both backlogs are queued before any worker runs, so both saturate
    for i in 0..1_500 {
        publish(&caller, "a", &format!("a-{i}")).await;
        publish(&caller, "c", &format!("c-{i}")).await;
    }
    let (_w1, _) = worker(&s.config).await;
    let (_w2, _) = worker(&s.config).await;
    let (first, _) = caller.collect(1_000, Duration::from_secs(60)).await;
    let served = [waits(&first, "a").len() as f64, waits(&first, "c").len() as f64];
    let (rest, dups) = caller.collect(2_000, Duration::from_secs(60)).await;
    assert_eq!((rest.len(), dups), (2_000, 0));
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturating_tenants_are_served_equally() {
    let served = first_thousand(1.0, 1.0).await;
    let index = jain(&served);
    println!("equal weights, first 1,000 served: a {}, c {}; Jain's index {index:.3}", served[0], served[1]);
    assert!(index >= 0.9, "served {served:?}: Jain's index {index:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_three_to_one_serve_three_to_one() {
    let served = first_thousand(3.0, 1.0).await;
    let ratio = served[0] / served[1];
    let index = jain(&[served[0] / 3.0, served[1]]);
    println!(
        "weights 3:1, first 1,000 served: a {}, c {}; ratio {ratio:.2}, Jain's index per weight {index:.3}",
        served[0], served[1]
    );
    assert!((2.7..=3.3).contains(&ratio), "served {served:?}: ratio {ratio:.2}, not 3 ± 0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_worker_during_a_flood_loses_and_duplicates_nothing() {
    let s = setup(&config());
    let caller = common::chaos::Chaos::connect(&s.nats.url()).await;
    let mut workers = [worker(&s.config).await.0, worker(&s.config).await.0];
    let a: Vec<String> = (0..2_000).map(|i| format!("a-{i}")).collect();
    let b: Vec<String> = (0..200).map(|i| format!("b-{i}")).collect();
    for id in &a {
        caller.publish_as(Priority::Normal, "a", &request(id, "slow", "x")).await;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for (i, id) in b.iter().enumerate() {
        tick.tick().await;
        caller.publish_as(Priority::Normal, "b", &request(id, "slow", "x")).await;
        if i == 100 {
            // both tenants' lanes have requests in flight and prefetched here
            workers[0].kill9();
        }
    }
    caller.wait_replies(&a, Duration::from_secs(60)).await;
    caller.wait_replies(&b, Duration::from_secs(30)).await;
    let ra = caller.report("kill -9 during a flood: tenant a", "a", &a, true).await;
    let rb = caller.report("kill -9 during a flood: tenant b", "b", &b, true).await;
    // deliveries beyond one per request: what the kill took down in flight
    let mut deliveries = 0;
    for tenant in ["a", "b"] {
        let stream = caller.js.get_stream(subjects::request_stream(Priority::Normal)).await.unwrap();
        let name = subjects::tenant_consumer("slow", tenant);
        let mut c = stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>(&name).await.unwrap();
        deliveries += c.info().await.unwrap().delivered.consumer_sequence;
    }
    let redelivered = deliveries - (a.len() + b.len()) as u64;
    println!("  redeliveries after the kill: {redelivered}");
    ra.assert_clean();
    rb.assert_clean();
    assert!(redelivered > 0, "the kill hit requests in flight");
    assert_eq!((ra.errors, rb.errors), (0, 0), "every request computed, none given up");
    workers[1].terminate();
}
