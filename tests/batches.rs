//! The batch API through real processes: a JSONL batch of 1,000 lines gets
//! exactly 1,000 results, each under its custom id; another tenant cannot
//! see it; a bad line is named before anything is published.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::subjects;
use serde_json::{json, Value};

fn config() -> String {
    // the producer's key may queue batches at high (a key's default is normal)
    format!(
        "[ingress.auth]\nenabled = true\n{}max_batch_priority = \"high\"\n{}",
        api_keys(&[("producer", "acme-batch-key", "acme", &["submit", "read"])]),
        api_keys(&[("other", "globex-batch-key", "globex", &["submit", "read"])]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_1000_lines_gets_exactly_1000_results() {
    let s = setup(&config());
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = reqwest::Client::new();

    let lines: String = (0..1000)
        .map(|i| {
            json!({"custom_id": format!("line-{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"model": "echo", "prompt": format!("prompt number {i}")}})
            .to_string()
                + "\n"
        })
        .collect();
    let r = http.post(format!("{base}/v1/batches")).bearer_auth("acme-batch-key").body(lines).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let batch: Value = r.json().await.unwrap();
    let id = batch["id"].as_str().unwrap().to_string();
    assert_eq!(batch["request_counts"]["total"], 1000);
    assert_eq!(batch["priority"], "low", "batches run at low priority by default");

    let start = Instant::now();
    let status = loop {
        let v: Value = http
            .get(format!("{base}/v1/batches/{id}"))
            .bearer_auth("acme-batch-key")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "completed" {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "batch not done: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status["request_counts"], json!({"total": 1000, "completed": 1000, "failed": 0}));

    let text = http
        .get(format!("{base}/v1/batches/{id}/results"))
        .bearer_auth("acme-batch-key")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let out: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(out.len(), 1000, "exactly one result line per input line");
    let mut seen = HashSet::new();
    for line in &out {
        let custom = line["custom_id"].as_str().unwrap();
        assert!(seen.insert(custom.to_string()), "{custom} twice");
        let i: usize = custom.strip_prefix("line-").unwrap().parse().unwrap();
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(line["response"]["body"]["choices"][0]["text"], format!("prompt number {i}"));
    }
    // the results are the tenant's, in FLEET_RESULTS, one per line
    let caller = Caller::connect(&s.nats.url()).await;
    assert!(stored_result(&caller.js, "acme", &format!("{id}-999")).await.is_some());
    assert_eq!(stream_len(&caller.js, subjects::RESULTS_STREAM).await, 1000);

    // another tenant sees no such batch
    for path in [format!("/v1/batches/{id}"), format!("/v1/batches/{id}/results")] {
        let r = http.get(format!("{base}{path}")).bearer_auth("globex-batch-key").send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    let r = http.get(format!("{base}/v1/batches/{id}")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_is_named_and_nothing_is_published() {
    let s = setup(&config());
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = reqwest::Client::new();
    let good = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}});
    let cases = [
        (
            json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "echo", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}}),
            "lines[1].body",
        ),
        (
            json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": good["body"]}),
            "lines[1].custom_id",
        ),
        (
            json!({"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"model": "echo", "prompt": "x"}}),
            "lines[1].url",
        ),
        (
            json!({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}),
            "lines[1].body.model",
        ),
    ];
    for (bad, param) in cases {
        let body = format!("{good}\n{bad}\n");
        let r = http.post(format!("{base}/v1/batches")).bearer_auth("acme-batch-key").body(body).send().await.unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        assert!(status == 422 || status == 404, "{status} {v}");
        assert!(v["error"]["param"].as_str().unwrap_or("").starts_with(param), "{param}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().starts_with("line 2:"), "{v}");
    }
    let caller = Caller::connect(&s.nats.url()).await;
    assert_eq!(stream_len(&caller.js, "FLEET_REQ_LOW").await, 0, "nothing published");
    // no credential
    let r = http.post(format!("{base}/v1/batches")).body(format!("{good}\n")).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_waits_and_fetches_results() {
    let s = setup(&config());
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let file = s.dir.path().join("batch.jsonl");
    let lines: String = (0..50)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": "echo", "messages": [{"role": "user", "content": format!("m{i}")}]}})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&file, lines).unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_retro-fleet"))
            .arg("--config")
            .arg(&s.config)
            .args(args)
            .args(["--url", &base])
            .env("FLEET_API_KEY", "acme-batch-key")
            .env_remove("NATS_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let batch: Value =
        serde_json::from_str(&run(&["batch", "submit", file.to_str().unwrap(), "--priority", "high", "--wait"]))
            .unwrap();
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["priority"], "high");
    assert_eq!(batch["request_counts"]["completed"], 50);
    let id = batch["id"].as_str().unwrap();
    let results = run(&["batch", "results", id]);
    let lines: Vec<Value> = results.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 50);
    assert_eq!(lines[7]["custom_id"], "c7");
    assert_eq!(lines[7]["response"]["body"]["choices"][0]["message"]["content"], "m7");
}
