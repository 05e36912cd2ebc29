//! The scaler and the worker registry against a real nats-server and real
//! `retro-fleet` processes: a backlog with no workers raises the
//! recommendation; a worker registers, drains it, and the recommendation
//! comes back down to zero.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use retro_fleet_schemas::{subjects, ModelScaling, Priority, WorkerInfo};

const SCALER: &str = r#"heartbeat_ms = 200
[scaler]
interval_ms = 200
window_secs = 10
drain_target_secs = 10.0
default_service_rate = 10.0
scale_down_cooldown_secs = 1.0
idle_to_zero_secs = 2.0
"#;

async fn scaling(base: &str) -> Option<ModelScaling> {
    let v: serde_json::Value = reqwest::get(format!("{base}/v1/scaling")).await.ok()?.json().await.ok()?;
    let models: Vec<ModelScaling> = serde_json::from_value(v["models"].clone()).ok()?;
    models.into_iter().find(|m| m.model == "echo")
}

/// Polls `/v1/scaling` until `pred` holds for the echo report.
async fn wait_for(base: &str, what: &str, pred: impl Fn(&ModelScaling) -> bool) -> ModelScaling {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Some(m) = scaling(base).await {
            if pred(&m) {
                return m;
            }
            last = Some(m);
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{what}: never happened; last report {last:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(name_and_labels)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn workers(config: &std::path::Path) -> Vec<WorkerInfo> {
    let out = Command::new(env!("CARGO_BIN_EXE_retro-fleet"))
        .arg("--config")
        .arg(config)
        .args(["workers", "--json"])
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    assert!(out.status.success(), "workers failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_without_workers_raises_the_recommendation_and_draining_lowers_it() {
    let s = setup(SCALER);
    assert!(workers(&s.config).is_empty());
    // 450 waiting before the scaler starts (so its first sample sees the
    // backlog without an arrival burst), nobody to serve them
    let mut caller = Caller::connect(&s.nats.url()).await;
    let mut published = caller.client.subscribe(subjects::scaling("echo")).await.unwrap();
    caller.publish_many(Priority::Normal, "b-", 400, "echo").await;
    caller.publish_many(Priority::High, "h-", 50, "echo").await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut scaler = Proc::start(&s.config, &["scaler", "--listen", &format!("127.0.0.1:{port}")], &[]);
    wait_ready(&format!("{base}/health/ready"), &mut scaler).await;

    let up = wait_for(&base, "the backlog is seen", |m| m.backlog.normal == 400 && m.backlog.high == 50).await;
    assert!(up.replicas > 0, "{up:?}");
    // weighted: 400 normal + 2 × 50 high = 500; 500 / 10 s / 10 req/s = 5
    assert_eq!(up.replicas, 5, "{up:?}");
    assert_eq!(up.weighted_backlog, 500.0);
    assert_eq!(up.workers, 0);
    assert!(up.warnings.iter().any(|w| w == "no_workers_with_backlog"), "{up:?}");
    assert_eq!(up.drain_secs, None, "nothing drains without workers");
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, r#"fleet_recommended_replicas{model="echo"}"#), Some(5.0), "{text}");
    assert_eq!(metric(&text, r#"fleet_consumer_lag{consumer="worker_echo",stream="FLEET_REQ_NORMAL"}"#), Some(400.0));
    assert_eq!(metric(&text, r#"fleet_model_workers{model="echo"}"#), Some(0.0));
    // nobody takes them: the oldest waiting request ages with the clock
    let aged = wait_for(&base, "the oldest request has waited a second", |m| m.oldest_wait_ms.normal >= 1000).await;
    // the high ones were published after the normal ones
    let o = aged.oldest_wait_ms;
    assert!(0 < o.high && o.high <= o.normal && o.low == 0, "{aged:?}");
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    let oldest = metric(&text, r#"fleet_queue_oldest_wait_seconds{model="echo",priority="normal"}"#).unwrap();
    assert!(oldest >= 1.0, "{text}");
    // and the same reports go out on fleet.scaling.echo
    let start = Instant::now();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), published.next()).await.unwrap().unwrap();
        let r: ModelScaling = serde_json::from_slice(&msg.payload).unwrap();
        if r.replicas == 5 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no published report with the backlog");
    }

    // a worker registers and drains the backlog
    let mut worker = start_worker(&s.config, &["--id", "w-scaling-1"]).await;
    let (results, _) = caller.collect(450, Duration::from_secs(60)).await;
    assert_eq!(results.len(), 450);
    let drained = wait_for(&base, "the worker is counted and the backlog gone", |m| {
        m.workers == 1 && m.backlog.normal == 0 && m.backlog.high == 0
    })
    .await;
    assert!(drained.warnings.iter().all(|w| w != "no_workers_with_backlog"), "{drained:?}");
    assert_eq!(drained.oldest_wait_ms, Default::default(), "nothing waits once drained");
    let listed = workers(&s.config);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, "w-scaling-1");
    assert_eq!(listed[0].models, vec!["echo".to_string()]);
    assert!(listed[0].capacity > 0);
    let completed_seen = Instant::now();
    loop {
        let w = workers(&s.config);
        if w.first().is_some_and(|w| w.completed == 450) {
            break;
        }
        assert!(completed_seen.elapsed() < Duration::from_secs(10), "heartbeat never counted 450 completed: {w:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // idle again: the recommendation cools down, then goes to zero
    let down = wait_for(&base, "the recommendation goes back down to zero", |m| m.replicas == 0).await;
    assert_eq!(down.reason, "idle");
    let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert_eq!(metric(&text, r#"fleet_recommended_replicas{model="echo"}"#), Some(0.0));
    assert!(metric(&text, r#"fleet_scaler_samples_total{result="ok"}"#).unwrap() > 10.0);

    // a worker that stops leaves the registry at once
    assert!(worker.terminate().success());
    assert!(workers(&s.config).is_empty(), "the drained worker deleted its entry");
    assert!(scaler.alive(), "{}", scaler.log());
    assert!(scaler.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_apply_creates_the_worker_registry_idempotently() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &nats.url(), "");
    let first = topology_apply(&config);
    let line = first.lines().find(|l| l.contains("fleet_workers")).expect("registry bucket in the report");
    assert!(line.starts_with("kv") && line.ends_with("created"), "{line}");
    let second = topology_apply(&config);
    let line = second.lines().find(|l| l.contains("fleet_workers")).unwrap();
    assert!(line.ends_with("unchanged"), "{line}");
    // a new TTL updates the bucket in place
    let text =
        std::fs::read_to_string(&config).unwrap().replace("max_deliver = 3", "max_deliver = 3\nworker_ttl_secs = 30");
    std::fs::write(&config, text).unwrap();
    let third = topology_apply(&config);
    let line = third.lines().find(|l| l.contains("fleet_workers")).unwrap();
    assert!(line.ends_with("updated (max_age)"), "{line}");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut kv = js.get_stream("KV_fleet_workers").await.unwrap();
    assert_eq!(kv.info().await.unwrap().config.max_age, Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_consumers_are_removed_leaves_the_reports_and_metrics() {
    let s = setup(SCALER);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut scaler = Proc::start(&s.config, &["scaler", "--listen", &format!("127.0.0.1:{port}")], &[]);
    wait_ready(&format!("{base}/health/ready"), &mut scaler).await;
    wait_for(&base, "echo is reported", |_| true).await;
    let client = async_nats::connect(s.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for p in Priority::ALL {
        let stream = js.get_stream(subjects::request_stream(p)).await.unwrap();
        stream.delete_consumer(&subjects::consumer("echo")).await.unwrap();
    }
    let start = Instant::now();
    loop {
        let gone = scaling(&base).await.is_none();
        let text = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
        if gone && !text.contains(r#"model="echo""#) && !text.contains("worker_echo") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "echo still reported:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(scaler.alive(), "{}", scaler.log());
}
