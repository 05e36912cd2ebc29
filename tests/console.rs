//! The web console in a real headless Chromium (selenium, Debian's
//! chromedriver) against real processes: a worker under load, the scaler,
//! an ingress with authentication on. The browser group of the suite.
//!
//! Screenshots land in the target dir; `UPDATE_SCREENSHOTS=1` writes them to
//! `docs/console/` instead, where the README shows them.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::{subjects, Priority, Status};
use serde_json::json;

const ADMIN: &str = "console-admin-key";
const APP: &str = "console-app-key";
const FLAKY: &str = "[models.echo]\nbackend = \"echo\"\n[models.flaky]\nbackend = \"synthetic\"\nlatency_ms = 1\n";
const SCALER: &str = "[scaler]\ninterval_ms = 500\n";

fn config(extra: &str) -> String {
    let keys = auth_with_keys(&[("ops", ADMIN, "default", &["admin"]), ("app", APP, "default", &["submit", "read"])]);
    format!("{keys}{SCALER}{FLAKY}{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_shows_the_fleet_live_and_its_buttons_drain_and_replay() {
    // a dead letter first: a model that always fails
    let s = setup(&config("fail_rate = 1.0\n"));
    let mut failing = start_worker(&s.config, &[]).await;
    let mut caller = Caller::connect(&s.nats.url()).await;
    caller.publish(Priority::Normal, &request("dead-1", "flaky", "lost")).await;
    let (results, _) = caller.collect(1, Duration::from_secs(30)).await;
    assert_eq!(results[0].1.status, Status::Error);
    assert!(failing.terminate().success());

    // the model mended; a worker, the scaler and the ingress
    write_config(s.dir.path(), &s.nats.url(), &config(""));
    let _worker = start_worker(&s.config, &["--id", "console-worker"]).await;
    let port = free_port();
    let mut scaler = Proc::start(&s.config, &["scaler", "--listen", &format!("127.0.0.1:{port}")], &[]);
    wait_ready(&format!("http://127.0.0.1:{port}/health/ready"), &mut scaler).await;
    let (mut ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);

    // the page's data needs the admin role; the page itself holds none
    for path in ["/v1/admin/console/events", "/v1/admin/batches", "/v1/admin/dlq/1"] {
        assert_eq!(http.send("GET", path, Some(APP), None).await.status(), 403, "{path}");
        assert_eq!(http.send("GET", path, None, None).await.status(), 401, "{path}");
    }
    let (status, page) = get_text(&format!("{base}/console")).await;
    assert!(status == 200 && page.contains("/console/console.js"), "{status} {page}");

    let lines: String = (0..3)
        .map(|i| {
            let body = json!({"model": "echo", "prompt": format!("batch line {i}")});
            json!({"custom_id": format!("l{i}"), "method": "POST", "url": "/v1/completions", "body": body}).to_string()
                + "\n"
        })
        .collect();
    let r = reqwest::Client::new().post(format!("{base}/v1/batches")).bearer_auth(APP).body(lines).send().await;
    let batch: serde_json::Value = r.unwrap().json().await.unwrap();
    let batch_id = batch["id"].as_str().expect("a batch id").to_string();

    // load while the browser looks
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn({
        let (stop, base) = (stop.clone(), base.clone());
        async move {
            let client = reqwest::Client::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let body = json!({"model": "echo", "prompt": format!("load {n}")});
                let r = client.post(format!("{base}/v1/infer")).bearer_auth(APP).json(&body).send().await;
                n += r.is_ok_and(|r| r.status() == 200) as u64;
            }
            n
        }
    });

    let shots = match std::env::var("UPDATE_SCREENSHOTS") {
        Ok(_) => format!("{}/docs/console", env!("CARGO_MANIFEST_DIR")),
        Err(_) => format!("{}/console", env!("CARGO_TARGET_TMPDIR")),
    };
    let arg = json!({
        "base": base, "admin_key": ADMIN, "app_key": APP, "worker": "console-worker", "letter": "dead-1",
        "batch": batch_id, "shots": shots, "profile": s.dir.path().join("chromium").to_str().unwrap(),
    })
    .to_string();
    let hint =
        "the console in headless Chromium (needs chromium, chromium-driver and selenium: scripts/install-deps.sh)";
    tokio::task::spawn_blocking(move || python(include_str!("console/browser.py"), &arg, "console ok", hint))
        .await
        .expect("the browser run");
    stop.store(true, Ordering::Relaxed);

    // the drain clicked in the page is the fleet's: the CLI sees it
    let out = cli(&s.config, &["workers"], &[]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("console-worker") && listed.contains("draining"), "{listed}");
    // resumed, it answers the call the load left waiting
    let (status, v) = http.json("POST", "/v1/admin/workers/console-worker/resume", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{v}");
    assert!(load.await.unwrap() > 0);
    // the replay clicked in the page re-ran the letter: its answer came
    // and it left the DLQ
    let start = Instant::now();
    while !stored_result(&caller.js, subjects::DEFAULT_TENANT, "dead-1").await.is_some_and(|r| r.status == Status::Ok) {
        assert!(start.elapsed() < Duration::from_secs(30), "the replayed letter was not answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, left) = http.json("GET", "/v1/admin/dlq", Some(ADMIN), None).await;
    assert_eq!(left["letters"], json!([]), "{left}");
    assert!(ingress.alive() && scaler.alive());
}
