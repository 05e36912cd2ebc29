//! A load ramp on the synthetic-latency backend (real nats-server, worker
//! and scaler processes): one worker cannot keep up, the lag grows and the
//! recommendation rises above one; a second worker starts and the lag falls.
//! Each worker serves 2 requests at a time of 50 ms each (40/s); requests
//! arrive at 60/s throughout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::{ModelScaling, Priority};

const CONFIG: &str = r#"max_inflight = 4
batch_size = 4
heartbeat_ms = 200
[scaler]
interval_ms = 250
window_secs = 10
drain_target_secs = 10.0
default_service_rate = 1000.0
[models.slow]
backend = "synthetic"
latency_ms = 50
concurrency = 2
"#;

async fn report(base: &str) -> Option<ModelScaling> {
    let v: serde_json::Value = reqwest::get(format!("{base}/v1/scaling")).await.ok()?.json().await.ok()?;
    serde_json::from_value::<Vec<ModelScaling>>(v["models"].clone()).ok()?.into_iter().find(|m| m.model == "slow")
}

async fn wait_for(base: &str, what: &str, within: Duration, pred: impl Fn(&ModelScaling) -> bool) -> ModelScaling {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Some(m) = report(base).await {
            if pred(&m) {
                return m;
            }
            last = Some(m);
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}; last report {last:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn backlog(m: &ModelScaling) -> u64 {
    m.backlog.high + m.backlog.normal + m.backlog.low
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_raises_the_recommendation_and_a_second_worker_drains_the_lag() {
    let s = setup(CONFIG);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut scaler = Proc::start(&s.config, &["scaler", "--listen", &format!("127.0.0.1:{port}")], &[]);
    wait_ready(&format!("{base}/health/ready"), &mut scaler).await;
    let _w1 = start_worker(&s.config, &["--id", "ramp-1"]).await;

    // open loop: 60 requests/s until told to stop
    let caller = Caller::connect(&s.nats.url()).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / 60));
            let mut i = 0usize;
            while !stop.is_cancelled() && i < 6_000 {
                tick.tick().await;
                caller.publish(Priority::Normal, &request(&format!("r-{i}"), "slow", "x")).await;
                i += 1;
            }
            i
        })
    };

    // one worker serves 40/s of the 60/s: the lag grows, the recommendation rises
    let rising = wait_for(&base, "one worker falls behind", Duration::from_secs(60), |m| {
        m.workers == 1 && backlog(m) > 100 && m.replicas >= 2
    })
    .await;
    assert!(rising.arrival_rate > 30.0, "{rising:#?}");
    assert!(
        (20.0..=60.0).contains(&rising.service_rate),
        "one worker's service rate is measured near 40/s, not the 1000/s default: {rising:#?}"
    );
    assert!(rising.drain_secs.is_none(), "not draining with one worker: {rising:#?}");

    // a second worker: 80/s against 60/s, the lag falls
    let _w2 = start_worker(&s.config, &["--id", "ramp-2"]).await;
    let two = wait_for(&base, "the second worker registers", Duration::from_secs(30), |m| m.workers == 2).await;
    let peak = backlog(&two);
    let fell = wait_for(&base, "the lag falls with two workers", Duration::from_secs(60), |m| {
        m.workers == 2 && backlog(m) < peak / 2
    })
    .await;
    assert!(fell.replicas >= 2, "60/s still needs two workers at 40/s each: {fell:#?}");
    stop.cancel();
    let sent = publisher.await.unwrap();
    assert!(sent > 0);
    assert!(scaler.alive(), "{}", scaler.log());
}
