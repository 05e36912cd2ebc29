//! A real Prometheus server (Debian's `prometheus`, installed by
//! `scripts/install-deps.sh --deploy`) scrapes a real ingress, worker and
//! scaler with the fleet's alert rules loaded, and the scaler's
//! `fleet_recommended_replicas` is visible through Prometheus' HTTP API.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::Priority;

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn query(base: &str, q: &str) -> Vec<serde_json::Value> {
    let Ok(r) = reqwest::Client::new().get(format!("{base}/api/v1/query")).query(&[("query", q)]).send().await else {
        return Vec::new();
    };
    let v: serde_json::Value = r.json().await.unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_role_and_records_the_recommendation() {
    let s = setup("heartbeat_ms = 200\n[scaler]\ninterval_ms = 250\n");
    let mut caller = Caller::connect(&s.nats.url()).await;
    // a backlog for the scaler to see before any worker runs
    caller.publish_many(Priority::Low, "p-", 300, "echo").await;

    let scaler_port = free_port();
    let mut scaler = Proc::start(&s.config, &["scaler", "--listen", &format!("127.0.0.1:{scaler_port}")], &[]);
    wait_ready(&format!("http://127.0.0.1:{scaler_port}/health/ready"), &mut scaler).await;
    let worker_port = free_port();
    let mut worker =
        Proc::start(&s.config, &["worker"], &[("FLEET_METRICS_LISTEN", format!("127.0.0.1:{worker_port}"))]);
    wait_ready(&format!("http://127.0.0.1:{worker_port}/health/ready"), &mut worker).await;
    let (_ingress, ingress_base) = start_ingress(&s.config).await;
    let (status, _) =
        post_json(&format!("{ingress_base}/v1/infer"), &serde_json::json!({"model": "echo", "prompt": "hi"})).await;
    assert_eq!(status, 200);
    let (results, _) = caller.collect(300, Duration::from_secs(60)).await;
    assert_eq!(results.len(), 300);

    let prom_port = free_port();
    let dir = s.dir.path();
    let rules = retro_fleet_testkit::package_dir().join("deploy/prometheus/rules/fleet.rules.yml");
    let ingress_target = ingress_base.trim_start_matches("http://");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{rules}"]
scrape_configs:
  - job_name: retro-fleet-ingress
    static_configs: [{{targets: ["{ingress_target}"]}}]
  - job_name: retro-fleet-worker
    static_configs: [{{targets: ["127.0.0.1:{worker_port}"]}}]
  - job_name: retro-fleet-scaler
    static_configs: [{{targets: ["127.0.0.1:{scaler_port}"]}}]
"#,
            rules = rules.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus is installed (scripts/install-deps.sh --deploy installs Debian's package)");
    let _prom = Prometheus(child);
    let base = format!("http://127.0.0.1:{prom_port}");

    let start = Instant::now();
    let (mut up, mut rec, mut e2e) = (Vec::new(), Vec::new(), Vec::new());
    while start.elapsed() < Duration::from_secs(60) {
        up = query(&base, "up == 1").await;
        rec = query(&base, r#"fleet_recommended_replicas{model="echo"}"#).await;
        e2e = query(&base, "fleet_request_duration_seconds_count").await;
        if up.len() == 3 && !rec.is_empty() && !e2e.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();
    let mut jobs: Vec<&str> = up.iter().filter_map(|r| r["metric"]["job"].as_str()).collect();
    jobs.sort();
    assert_eq!(jobs, ["retro-fleet-ingress", "retro-fleet-scaler", "retro-fleet-worker"], "{log}");
    assert_eq!(rec.len(), 1, "{rec:?}");
    assert_eq!(rec[0]["metric"]["job"], "retro-fleet-scaler");
    let value: f64 = rec[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(value >= 1.0, "a model with traffic keeps at least min_replicas: {value}");
    assert_eq!(e2e.len(), 1, "the ingress histogram is scraped: {e2e:?}");
    // the rules loaded and the worker's figures arrived
    let finished = query(&base, r#"sum(fleet_worker_requests_total{outcome="ok"})"#).await;
    let n: f64 = finished[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert_eq!(n, 301.0);
    // every computed answer had a first token, timed from its publish
    let sum = |q: &'static str| {
        let base = base.clone();
        async move { query(&base, q).await.first().and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok()) }
    };
    let first_tokens = sum("sum(fleet_time_to_first_token_seconds_count)").await;
    let computed = sum("sum(fleet_compute_seconds_count)").await;
    assert!(computed.is_some_and(|n| n >= 1.0) && first_tokens == computed, "{first_tokens:?} {computed:?}");
    let rules: serde_json::Value = reqwest::get(format!("{base}/api/v1/rules")).await.unwrap().json().await.unwrap();
    let names: Vec<String> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_string()))
        .collect();
    for rule in ["FleetNoWorkersForBacklog", "FleetRequestsWaitingLong", "fleet:generated_tokens_per_second:rate1m"] {
        assert!(names.iter().any(|n| n == rule), "{rule} missing: {names:?} {rules}\n{log}");
    }
    let broken: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .filter(|r| r["health"] == "err")
        .collect();
    assert!(broken.is_empty(), "rules failing to evaluate: {broken:?}");
}
