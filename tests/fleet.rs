//! End to end through real processes: a real nats-server, `retro-fleet
//! worker` and `retro-fleet ingress` child processes, NATS and HTTP callers.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use retro_fleet_schemas::{subjects, Priority, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_requests_over_nats_and_http_are_each_answered_once() {
    let s = setup("");
    let (nats, config) = (&s.nats, &s.config);
    let _worker = start_worker(config, &[]).await;
    let (_ingress, base) = start_ingress(config).await;

    // 1,500 over NATS, spread over the three priorities
    let mut caller = Caller::connect(&nats.url()).await;
    for i in 0..1500 {
        let p = Priority::ALL[i % 3];
        caller.publish(p, &request(&format!("nats-{i}"), "echo", &format!("hello number {i}"))).await;
    }
    let (results, dups) = caller.collect(1500, Duration::from_secs(60)).await;
    assert_eq!(results.len(), 1500, "every NATS request answered");
    assert_eq!(dups, 0, "no request answered twice");
    for (id, r) in &results {
        let i: usize = id.strip_prefix("nats-").unwrap().parse().unwrap();
        assert_eq!(r.status, Status::Ok);
        assert_eq!(r.output.as_ref().unwrap().text, format!("hello number {i}"));
        let stored =
            stored_result(&caller.js, subjects::DEFAULT_TENANT, id).await.expect("result stored in FLEET_RESULTS");
        assert_eq!(&stored, r);
    }

    // 1,500 over HTTP, 32 at a time
    let http = reqwest::Client::new();
    let answers: Vec<(usize, serde_json::Value)> = futures::stream::iter(0..1500)
        .map(|i| {
            let http = http.clone();
            let base = base.clone();
            async move {
                let prio = ["high", "normal", "low"][i % 3];
                let resp = http
                    .post(format!("{base}/v1/infer"))
                    .header("X-Priority", prio)
                    .json(&serde_json::json!({"model": "echo", "prompt": format!("http number {i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200);
                (i, resp.json().await.unwrap())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(answers.len(), 1500);
    let mut ids = std::collections::HashSet::new();
    for (i, body) in &answers {
        assert_eq!(body["output"]["text"], format!("http number {i}"));
        let id = body["id"].as_str().unwrap().to_string();
        assert!(ids.insert(id.clone()), "ids are unique");
        if i % 50 == 0 {
            let stored: serde_json::Value =
                http.get(format!("{base}/v1/results/{id}")).send().await.unwrap().json().await.unwrap();
            assert_eq!(&stored, body, "GET /v1/results/{{id}} returns the same result");
        }
    }
    assert_eq!(stream_len(&caller.js, subjects::RESULTS_STREAM).await, 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_overtakes_a_low_backlog_and_low_still_progresses() {
    let extra = "max_inflight = 2\nbatch_size = 2\nnormal_share = 0.0\nlow_share = 0.1\n\
                 [models.slow]\nbackend = \"synthetic\"\nlatency_ms = 10\n";
    let s = setup(extra);
    let (nats, config) = (&s.nats, &s.config);
    let mut caller = Caller::connect(&nats.url()).await;

    // Backlog of low first, then high, all queued before the worker starts.
    caller.publish_many(Priority::Low, "low-", 100, "slow").await;
    caller.publish_many(Priority::High, "high-", 50, "slow").await;
    let worker = start_worker(config, &[]).await;
    let (order, dups) = caller.collect(150, Duration::from_secs(60)).await;
    assert_eq!((order.len(), dups), (150, 0));
    let last_high = order.iter().rposition(|(id, _)| id.starts_with("high-")).unwrap();
    let lows_before = order[..last_high].iter().filter(|(id, _)| id.starts_with("low-")).count();
    assert!(lows_before < 50, "high requests finish before most low ones ({lows_before} of 100 low finished first)");
    assert!(lows_before >= 1, "low still progressed while high had work ({lows_before})");
    drop(worker);

    // Sustained high load: low keeps its guaranteed share.
    caller.publish_many(Priority::High, "h2-", 400, "slow").await;
    caller.publish_many(Priority::Low, "l2-", 40, "slow").await;
    let _worker = start_worker(config, &[]).await;
    let (order, dups) = caller.collect(440, Duration::from_secs(60)).await;
    assert_eq!((order.len(), dups), (440, 0));
    let h300 = order.iter().enumerate().filter(|(_, (id, _))| id.starts_with("h2-")).nth(299).unwrap().0;
    let lows = order[..h300].iter().filter(|(id, _)| id.starts_with("l2-")).count();
    assert!(lows >= 15, "low progressed under sustained high load: {lows} low done before the 300th high");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_apply_is_idempotent() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &nats.url(), "");
    let first = topology_apply(&config);
    assert!(first.contains("FLEET_REQ_HIGH") && first.contains("created"), "{first}");
    for name in ["FLEET_REQ_NORMAL", "FLEET_REQ_LOW", "FLEET_RESULTS", "FLEET_DLQ", "FLEET_REQ_HIGH/worker_echo"] {
        assert!(first.contains(name), "{name} in {first}");
    }
    let second = topology_apply(&config);
    assert!(!second.contains("created") && !second.contains("updated"), "second apply changes nothing:\n{second}");
    assert_eq!(second.lines().count(), first.lines().count());
    // a changed limit is an update, in place
    let changed = write_config(dir.path(), &nats.url(), "");
    let text = std::fs::read_to_string(&changed).unwrap().replace("max_deliver = 3", "max_deliver = 3\nmax_msgs = 500");
    std::fs::write(&changed, text).unwrap();
    let third = topology_apply(&changed);
    assert!(third.contains("FLEET_REQ_LOW") && third.contains("updated (max_msgs)"), "{third}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_publishes_with_503_and_retry_after() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &nats.url(), "");
    let text = std::fs::read_to_string(&config).unwrap().replace("max_deliver = 3", "max_deliver = 3\nmax_msgs = 5");
    std::fs::write(&config, text).unwrap();
    topology_apply(&config);
    // no worker: the queue fills up
    let (_ingress, base) = start_ingress(&config).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = http
            .post(format!("{base}/v1/infer/async"))
            .json(&serde_json::json!({"model": "echo", "prompt": format!("p{i}")}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 503 {
            assert_eq!(r.headers()["retry-after"], "1");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "overloaded");
            assert!(body["request_id"].is_string());
        }
    }
    assert_eq!(statuses, [202, 202, 202, 202, 202, 503, 503, 503]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_nothing_and_answers_stay_identical() {
    let extra = "max_inflight = 8\n[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 40\n";
    let s = setup(extra);
    let (nats, config) = (&s.nats, &s.config);
    let mut caller = Caller::connect(&nats.url()).await;
    caller.publish_many(Priority::Normal, "r", 200, "slow").await;
    let mut first = start_worker(config, &[]).await;
    let (early, _) = caller.collect(40, Duration::from_secs(30)).await;
    assert_eq!(early.len(), 40);
    first.kill9();
    let _second = start_worker(config, &[]).await;
    let (rest, dups) = caller.collect(160, Duration::from_secs(60)).await;
    let all: Vec<_> = early.into_iter().chain(rest).collect();
    assert_eq!(all.len(), 200, "lost: {}", 200 - all.len());
    for (id, r) in &all {
        let stored = stored_result(&caller.js, subjects::DEFAULT_TENANT, id).await.expect("stored");
        assert_eq!(stored.id, r.id);
    }
    // a redelivered request whose result was already stored is answered with
    // that stored result, never a second computation
    assert!(dups <= 8, "duplicate replies are bounded by what was in flight: {dups}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_exits_zero() {
    let extra = "max_inflight = 4\n[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 700\n";
    let s = setup(extra);
    let (nats, config) = (&s.nats, &s.config);
    let mut caller = Caller::connect(&nats.url()).await;
    let mut worker = start_worker(config, &[]).await;
    caller.publish_many(Priority::Normal, "d", 4, "slow").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = worker.terminate();
    assert!(status.success(), "exit status {status}:\n{}", worker.log());
    let (results, _) = caller.collect(4, Duration::from_secs(1)).await;
    assert_eq!(results.len(), 4, "in-flight requests finished before exit");
    assert!(worker.log().contains("drained"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_starts_a_local_nats_server_and_answers_http() {
    let dir = tempfile::tempdir().unwrap();
    let nats_port = free_port();
    let http_port = free_port();
    let config = write_config(dir.path(), &format!("nats://127.0.0.1:{nats_port}"), "");
    let mut up = Proc::start(&config, &["up", "--listen", &format!("127.0.0.1:{http_port}")], &[]);
    let base = format!("http://127.0.0.1:{http_port}");
    wait_ready(&format!("{base}/health/ready"), &mut up).await;
    let (_, body) =
        post_json(&format!("{base}/v1/infer"), &serde_json::json!({"model": "echo", "prompt": "hello fleet"})).await;
    assert_eq!(body["output"]["text"], "hello fleet");
    // the worker counts a request once it has settled it, which can be
    // just after the answer reached the caller
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
        if metrics.contains("fleet_worker_requests_total") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(metrics.contains("fleet_worker_requests_total"), "worker metrics on the ingress's /metrics:\n{metrics}");
    assert!(up.terminate().success());
    assert!(dir.path().join("data/nats/jetstream").exists(), "the local store lives under the data dir");
    // the local nats-server is gone with it
    assert!(std::net::TcpStream::connect(("127.0.0.1", nats_port)).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_flag_sends_ordered_chunks_before_the_result() {
    let s = setup("");
    let config = &s.config;
    let _worker = start_worker(config, &[]).await;
    let (_ingress, base) = start_ingress(config).await;
    let body = serde_json::json!({"model": "echo", "prompt": "one two three four", "stream": true});
    let text = post_text(&format!("{base}/v1/infer"), &body).await;
    let mut deltas = String::new();
    let mut seqs = Vec::new();
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let event = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap().to_string();
        let data: serde_json::Value =
            serde_json::from_str(block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap()).unwrap();
        if event == "chunk" {
            seqs.push(data["seq"].as_u64().unwrap());
            deltas.push_str(data["delta"].as_str().unwrap());
        } else {
            assert_eq!(data["output"]["text"], "one two three four");
        }
        events.push(event);
    }
    assert_eq!(events.last().unwrap(), "result");
    assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "no gaps");
    assert_eq!(deltas, "one two three four");
}

#[test]
fn config_env_overrides_file_and_unknown_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[worker]\nmax_inflight = 5\n").unwrap();
    let out = cli(&file, &["config"], &[("FLEET_WORKER__MAX_INFLIGHT", "7")]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("max_inflight = 7"), "{text}");

    // secrets are redacted unless asked for
    let secret = "an HS256 secret that must not be printed";
    std::fs::write(
        &file,
        format!(
            "[nats]\nurl = \"nats://fleet:hun@ter2@nats-a:4222,nats://nats-b:4222\"\n\
             [[ingress.auth.jwt_keys]]\nalgorithm = \"HS256\"\nsecret = \"{secret}\"\n"
        ),
    )
    .unwrap();
    let config = |extra: &[&str]| {
        let out = cli(&file, &[&["config"], extra].concat(), &[]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let shown = config(&[]);
    assert!(!shown.contains(secret) && !shown.contains("ter2"), "{shown}");
    assert!(shown.contains("nats://<redacted>@nats-a:4222,nats://nats-b:4222"), "{shown}");
    let all = config(&["--show-secrets"]);
    assert!(all.contains(secret) && all.contains("hun@ter2"), "{all}");

    std::fs::write(&file, "[worker]\nmax_inflite = 5\n").unwrap();
    let out = cli(&file, &["config"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("max_inflite"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_running_longer_than_ack_wait_is_not_redelivered() {
    // ack_wait is 2 s in test configs; this request takes 5 s
    let s = setup("[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 5000\n");
    let (nats, config) = (&s.nats, &s.config);
    let _a = start_worker(config, &[]).await;
    let _b = start_worker(config, &[]).await;
    let mut caller = Caller::connect(&nats.url()).await;
    caller.publish(Priority::Normal, &request("long-1", "slow", "x")).await;
    let (results, dups) = caller.collect(1, Duration::from_secs(30)).await;
    assert_eq!((results.len(), dups), (1, 0));
    let mut consumer = caller
        .js
        .get_stream("FLEET_REQ_NORMAL")
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("worker_slow")
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!(info.num_redelivered, 0, "in-progress acks kept the request with its worker");
    assert_eq!(info.delivered.stream_sequence, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_result_expires_after_its_short_retention_while_an_async_one_stays() {
    let s = setup("[ingress]\nsync_result_ttl_secs = 2\n");
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = reqwest::Client::new();
    let post = |path: &str, id: &str, ttl: Option<&str>| {
        let mut r = http.post(format!("{base}{path}")).header("x-request-id", id);
        if let Some(t) = ttl {
            r = r.header("x-result-ttl", t);
        }
        r.json(&serde_json::json!({"model": "echo", "prompt": id})).send()
    };
    assert_eq!(post("/v1/infer", "sync", None).await.unwrap().status(), 200);
    assert_eq!(post("/v1/infer", "sync-kept", Some("600")).await.unwrap().status(), 200);
    assert_eq!(post("/v1/infer/async", "async", None).await.unwrap().status(), 202);
    let status = |id: &str| {
        let url = format!("{base}/v1/results/{id}");
        async move { reqwest::get(url).await.unwrap().status().as_u16() }
    };
    let start = std::time::Instant::now();
    while status("async").await != 200 {
        assert!(start.elapsed() < Duration::from_secs(10), "the async result was not stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // a retry of the sync call within its retention gets the stored result
    assert_eq!(status("sync").await, 200, "kept for a retry within the duplicate window");
    assert_eq!(post("/v1/infer", "sync", None).await.unwrap().status(), 200, "a retry gets the stored result");
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert_eq!(status("sync").await, 404, "a synchronous call's result expires after sync_result_ttl_secs");
    // a retry within the duplicate window cannot run again, nor be answered
    // from the store: it says so, rather than waiting out its timeout
    let r = post("/v1/infer", "sync", None).await.unwrap();
    assert_eq!(r.status(), 409);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "request_id_spent", "{body}");
    assert_eq!(status("sync-kept").await, 200, "X-Result-Ttl keeps it longer");
    assert_eq!(status("async").await, 200, "an asynchronous result stays for results_max_age_secs");
    // asking for more than results are ever kept is refused
    let r = post("/v1/infer", "too-long", Some("99999999")).await.unwrap();
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "headers.x-result-ttl", "{body}");
}
