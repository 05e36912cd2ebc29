//! Chaos: faults injected into real processes (a real nats-server, real
//! `retro-fleet worker` and `ingress` children) while they serve traffic.
//!
//! Every test prints `sent / answered / lost / duplicated` and asserts that
//! nothing is lost and nothing is duplicated:
//! - answered: the request has a result stored in `FLEET_RESULTS` (and,
//!   where the caller was connected, the same result on its reply subject);
//! - duplicated: the caller saw two *different* results for one id, or a
//!   second result was written to `FLEET_RESULTS` for an id (the stream's
//!   last sequence exceeds its message count).
//!
//! These are the slow tests (a few minutes in all); `make test` runs them.
//! One of them checks metering instead: 10,000 mixed requests through a
//! kill and a restart of every process, counted exactly once each.
//! One alone: `cargo nextest run --workspace --no-capture -E 'binary(chaos) & test(NAME)'`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use common::chaos::*;
use common::*;
use futures::StreamExt;
use retro_fleet_schemas::{codec, headers, subjects, ErrorCode, InferRequest, Priority, Status};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill9_a_worker_ten_times_during_5000_requests() {
    let extra = "max_inflight = 16\nbatch_size = 16\n[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 40\n";
    let s = setup(extra);
    // Ten kills of workers holding prefetched batches can hit one request
    // three times on a loaded machine; giving up after max_deliver is tested
    // on its own, so this run allows more deliveries.
    let text = std::fs::read_to_string(&s.config).unwrap().replace("max_deliver = 3", "max_deliver = 10");
    std::fs::write(&s.config, text).unwrap();
    topology_apply(&s.config);
    let caller = Chaos::connect(&s.nats.url()).await;
    let ids: Vec<String> = (0..5000).map(|i| format!("k{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        caller.publish_request(Priority::ALL[i % 3], &request(id, "slow", "x"), &[]).await;
    }
    let mut workers = [worker(&s.config).await.0, worker(&s.config).await.0];
    let mut kills = 0;
    let start = Instant::now();
    while kills < 10 {
        // a kill every ~450 answers, alternating workers: always mid-batch
        while caller.replied() < 450 * (kills + 1) {
            assert!(start.elapsed() < Duration::from_secs(180), "stalled at {} answers", caller.replied());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let victim = kills % 2;
        workers[victim].kill9();
        kills += 1;
        workers[victim] = worker(&s.config).await.0;
    }
    caller.wait_replies(&ids, Duration::from_secs(120)).await;
    let r = caller.report("kill -9 x10, 2 workers", subjects::DEFAULT_TENANT, &ids, true).await;
    // deliveries beyond one per request: what the kills took down mid-run
    let mut deliveries = 0;
    for p in Priority::ALL {
        let stream = caller.js.get_stream(subjects::request_stream(p)).await.unwrap();
        let mut c = stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("worker_slow").await.unwrap();
        deliveries += c.info().await.unwrap().delivered.consumer_sequence;
    }
    let redelivered = deliveries - ids.len() as u64;
    println!("  kills {kills}, redeliveries {redelivered}, run {:.1} s", start.elapsed().as_secs_f64());
    r.assert_clean();
    assert!(redelivered > 0, "the kills hit requests in flight");
    assert_eq!(r.errors, 0, "every request computed, none given up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nats_server_restart_during_a_run() {
    nats_restart_during_a_run(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nats_server_kill9_and_restart_during_a_run() {
    nats_restart_during_a_run(true).await;
}

/// Stops nats-server mid-run (SIGTERM, or SIGKILL as a crash) and starts
/// it again on the same port and store 2 s later.
async fn nats_restart_during_a_run(crash: bool) {
    // two URLs, the first one dead: clients must take the second and come back to it
    let nats = NatsServer::start();
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let extra = "max_inflight = 16\n[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 20\n";
    let config = write_config(dir.path(), &format!("{dead},{}", nats.url()), extra);
    topology_apply(&config);
    let mut nats = nats;
    let (mut w1, port1) = worker(&config).await;
    let (_w2, _) = worker(&config).await;
    let (mut ingress, base) = start_ingress(&config).await;
    let caller = Arc::new(Chaos::connect(&nats.url()).await);

    // NATS traffic: 3,000 requests published steadily while the server goes away
    let nats_ids: Vec<String> = (0..3000).map(|i| format!("n{i}")).collect();
    let publisher = {
        let (caller, ids) = (caller.clone(), nats_ids.clone());
        tokio::spawn(async move {
            for (i, id) in ids.iter().enumerate() {
                caller.publish_request(Priority::ALL[i % 3], &request(id, "slow", "x"), &[]).await;
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
    };
    // HTTP traffic: 300 async requests with their own ids, retried on 503 / connection errors
    let http_ids: Vec<String> = (0..300).map(|i| format!("h{i}")).collect();
    let http_task = {
        let (base, ids) = (base.clone(), http_ids.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut retries = 0;
            for id in &ids {
                loop {
                    let r = http
                        .post(format!("{base}/v1/infer/async"))
                        .json(&serde_json::json!({"model": "slow", "prompt": "x", "id": id}))
                        .send()
                        .await;
                    match r.map(|r| r.status().as_u16()) {
                        Ok(202) => break,
                        Ok(503) | Ok(500) | Err(_) => {
                            retries += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok(other) => panic!("unexpected status {other} for {id}"),
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            retries
        })
    };

    caller.wait_for_replies(800).await;
    if crash {
        nats.kill();
    } else {
        nats.stop();
    }
    // while it is down, readiness says so
    let (mut unready, mut ingress_unready) = (false, false);
    let down = Instant::now();
    while !(unready && ingress_unready) && down.elapsed() < Duration::from_secs(2) {
        let (status, body) = get_text(&format!("http://127.0.0.1:{port1}/health/ready")).await;
        unready |= status == 503 && body.contains("not connected");
        ingress_unready |= get_text(&format!("{base}/health/ready")).await.0 == 503;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.start_again();
    publisher.await.unwrap();
    let http_retries = http_task.await.unwrap();
    let all: Vec<String> = nats_ids.iter().chain(&http_ids).cloned().collect();
    caller.wait_stored(subjects::DEFAULT_TENANT, &all, Duration::from_secs(120)).await;
    let how = if crash { "SIGKILL" } else { "SIGTERM" };
    let r = caller
        .report(&format!("nats-server restart ({how}, same port and store)"), subjects::DEFAULT_TENANT, &all, false)
        .await;
    println!("  http retries during the outage {http_retries}; replies seen {}", caller.replied());
    r.assert_clean();
    assert_eq!(r.errors, 0);
    assert!(unready, "the worker reported not ready while NATS was down");
    assert!(ingress_unready, "the ingress reported not ready while NATS was down");
    // readiness follows the reconnect (and the stream checks) within seconds
    let start = Instant::now();
    let mut status = 0;
    while start.elapsed() < Duration::from_secs(15) {
        status = get_text(&format!("http://127.0.0.1:{port1}/health/ready")).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "ready again after the restart");
    for p in [&mut w1, &mut ingress] {
        assert!(p.alive(), "{} survived:\n{}", p.name, p.log());
        let log = p.log();
        assert!(log.contains("disconnected from NATS"), "{}", p.name);
        assert!(log.matches("connected to NATS; pulling and publishing resume").count() >= 2, "{}:\n{log}", p.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_sigstop_a_worker_beyond_ack_wait_then_sigcont() {
    let extra = "max_inflight = 8\nbatch_size = 8\n[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 300\n";
    let s = setup(extra);
    let caller = Chaos::connect(&s.nats.url()).await;
    let ids: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    for id in &ids {
        caller.publish_request(Priority::Normal, &request(id, "slow", "x"), &[]).await;
    }
    let (mut a, _) = worker(&s.config).await;
    let (_b, _) = worker(&s.config).await;
    caller.wait_for_replies(40).await;
    signal(&a, 19); // SIGSTOP, with requests in flight and prefetched
    tokio::time::sleep(Duration::from_secs(5)).await; // ack_wait is 2 s
    signal(&a, 18); // SIGCONT
    caller.wait_replies(&ids, Duration::from_secs(120)).await;
    let r = caller.report("SIGSTOP 5 s (ack_wait 2 s), SIGCONT", subjects::DEFAULT_TENANT, &ids, true).await;
    let mut c = caller
        .js
        .get_stream("FLEET_REQ_NORMAL")
        .await
        .unwrap()
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("worker_slow")
        .await
        .unwrap();
    let redelivered = c.info().await.unwrap().num_redelivered;
    let resent = a.log().matches("already stored; sending that one").count();
    println!("  redelivered {redelivered}, stale computations answered with the stored result {resent}");
    r.assert_clean();
    assert!(a.alive());
    assert!(resent > 0, "the paused worker finished requests another worker had answered:\n{}", a.log());
}

/// xorshift64: deterministic fuzz without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One malformed message: (headers, payload), all for the `echo` subject.
fn fuzzed(rng: &mut Rng, i: usize) -> (HeaderMap, Vec<u8>) {
    let mut h = HeaderMap::new();
    let id = format!("fuzz-{i}");
    if i % 7 != 0 {
        h.insert(headers::MSG_ID, id.as_str());
    }
    let valid = codec::encode(&request(&id, "echo", "a perfectly fine prompt"));
    let body = match i % 6 {
        0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
        1 => {
            let mut b = valid.clone();
            for _ in 0..1 + rng.below(3) {
                let k = rng.below(b.len());
                b[k] = rng.next() as u8;
            }
            b
        }
        2 => valid[..rng.below(valid.len())].to_vec(),
        3 => {
            h.insert(headers::CONTENT_TYPE, "application/json");
            let json = serde_json::to_vec(&request(&id, "echo", "json prompt")).unwrap();
            let mut b = json;
            let k = rng.below(b.len());
            b[k] = b"{}[]\",:0a\\"[rng.below(10)];
            b
        }
        4 => {
            let junk: String = (0..rng.below(20)).map(|_| (b'!' + (rng.next() % 90) as u8) as char).collect();
            h.insert(headers::CONTENT_TYPE, junk.as_str());
            valid
        }
        _ => {
            // well-formed but invalid: wrong model for the subject, empty id, bad tenant, or huge prompt
            let mut r = request(&id, "echo", "x");
            match rng.below(4) {
                0 => r.model = "other".into(),
                1 => r.id = String::new(),
                2 => r.tenant = Some("bad tenant!".into()),
                _ => r.input = retro_fleet_schemas::Input::Completion { prompt: "y".repeat(300_000) },
            }
            codec::encode(&r)
        }
    };
    (h, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_ten_thousand_malformed_messages_mixed_into_valid_traffic() {
    let s = setup("");
    let caller = Chaos::connect(&s.nats.url()).await;
    let (mut w1, _) = worker(&s.config).await;
    let (mut w2, _) = worker(&s.config).await;
    let echo = subjects::request(Priority::Normal, "echo");
    let mut rng = Rng(0x2545f4914f6cdd1d);
    // id -> (Content-Type header, payload)
    let mut sent_fuzz: HashMap<String, (Option<String>, Vec<u8>)> = HashMap::new();
    let mut valid_ids = Vec::new();
    let mut acks = Vec::new();
    for i in 0..10_000 {
        let (mut h, body) = fuzzed(&mut rng, i);
        let id = format!("fuzz-{i}");
        h.insert(headers::REPLY, caller.reply_subject(&id).as_str());
        let ct = h.get(headers::CONTENT_TYPE).map(|v| v.as_str().to_string());
        sent_fuzz.insert(id, (ct, body.clone()));
        acks.push(caller.js.publish_with_headers(echo.clone(), h, Bytes::from(body)).await.unwrap());
        if i % 5 == 0 {
            let id = format!("valid-{i}");
            let req = request(&id, "echo", &format!("valid number {i}"));
            let mut h = HeaderMap::new();
            h.insert(headers::MSG_ID, id.as_str());
            h.insert(headers::REPLY, caller.reply_subject(&id).as_str());
            acks.push(caller.js.publish_with_headers(echo.clone(), h, Bytes::from(codec::encode(&req))).await.unwrap());
            valid_ids.push(id);
        }
        if acks.len() >= 512 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks.drain(..) {
        a.await.unwrap();
    }
    let fuzz_ids: Vec<String> = (0..10_000).map(|i| format!("fuzz-{i}")).collect();
    let all: Vec<String> = fuzz_ids.iter().chain(&valid_ids).cloned().collect();
    caller.wait_replies(&all, Duration::from_secs(180)).await;

    // valid traffic: every request answered with its own text
    let r = caller.report("10,000 malformed + 2,000 valid", subjects::DEFAULT_TENANT, &valid_ids, true).await;
    r.assert_clean();
    {
        let seen = caller.snapshot();
        for id in &valid_ids {
            let res = &seen[id][0];
            assert_eq!(res.status, Status::Ok, "{id}: {res:?}");
            let i = id.strip_prefix("valid-").unwrap();
            assert_eq!(res.output.as_ref().unwrap().text, format!("valid number {i}"));
        }
    }
    // malformed: each one answered exactly once, and each error is a dead letter with its payload
    let dlq = caller.js.get_stream(subjects::DLQ_STREAM).await.unwrap();
    let letters = {
        let consumer =
            dlq.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await.unwrap();
        let total = dlq.get_info().await.unwrap().state.messages as usize;
        let mut msgs = consumer.messages().await.unwrap();
        let mut letters: HashMap<String, (Bytes, String)> = HashMap::new();
        while letters.len() < total {
            let m = tokio::time::timeout(Duration::from_secs(10), msgs.next()).await.unwrap().unwrap().unwrap();
            let h = m.headers.as_ref().unwrap();
            let reply = h.get(headers::REPLY).unwrap().as_str();
            let id = reply.rsplit('.').next().unwrap().to_string();
            let code = h.get(headers::ERROR_CODE).unwrap().as_str().to_string();
            assert!(
                letters.insert(id.clone(), (m.payload.clone(), code)).is_none(),
                "one dead letter per message: {id}"
            );
        }
        letters
    };
    let seen = caller.snapshot();
    let (mut poison, mut accepted, mut unanswered, mut twice, mut shared) = (0, 0, 0, 0, 0);
    let mut codes: HashMap<String, usize> = HashMap::new();
    for id in &fuzz_ids {
        let Some(replies) = seen.get(id) else {
            unanswered += 1;
            continue;
        };
        if replies.len() > 1 {
            twice += 1;
        }
        let first = &replies[0];
        let (ct, body) = &sent_fuzz[id];
        // One result per id: whatever a message was answered, it is the
        // result stored for the id it carried. A mutation may change the id
        // in a body to another message's id; both are then answered with
        // the one result stored first for that id (an id is an idempotency key).
        if !first.id.is_empty() {
            let stored = caller.stored(subjects::DEFAULT_TENANT, std::slice::from_ref(&first.id)).await;
            assert_eq!(stored.get(&first.id), Some(first), "{id}: answered with the result stored for {}", first.id);
        }
        let own = &first.id == id || first.id.is_empty();
        if let Some((payload, code)) = letters.get(id) {
            poison += 1;
            assert_eq!(&payload[..], &body[..], "{id}: the dead letter keeps the original payload");
            if own && first.error.as_ref().map(|e| e.code.as_str()) == Some(code.as_str()) {
                *codes.entry(code.clone()).or_default() += 1;
            } else {
                shared += 1;
            }
        } else {
            // a mutation that still decodes to a valid request: answered, not dead-lettered
            accepted += 1;
            let req: InferRequest = codec::decode(ct.as_deref(), body).expect("an accepted message decodes");
            assert!(req.validate(usize::MAX).is_ok());
            assert_eq!(req.id, first.id);
            if own {
                assert_eq!(first.status, Status::Ok, "{id}: {first:?}");
            } else {
                shared += 1;
            }
        }
    }
    println!(
        "chaos fuzz: sent 10000 malformed / answered {} / lost {unanswered} / duplicated {twice}: \
         {poison} dead-lettered with their payload, {accepted} still valid and answered; codes {codes:?}; dead letters {}; \
         {shared} answered with the result of another message carrying the same id",
        poison + accepted,
        letters.len()
    );
    assert_eq!(unanswered, 0);
    assert_eq!(twice, 0);
    assert_eq!(letters.len(), poison, "every dead letter belongs to one error result");
    assert!(poison > 9_000, "most fuzz is poison: {poison}");
    assert!(w1.alive() && w2.alive(), "no worker crashed");
    assert!(!w1.log().contains("panicked") && !w2.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_model_failing_every_call_opens_its_breaker_and_spares_the_others() {
    let extra = "[worker.breaker]\nconsecutive_failures = 3\nopen_ms = 1000\n\
                 [models.echo]\nbackend = \"echo\"\n\
                 [models.broken]\nbackend = \"synthetic\"\nlatency_ms = 5\nfail_rate = 1.0\n";
    let s = setup(extra);
    let caller = Chaos::connect(&s.nats.url()).await;
    let (mut w, port) = worker(&s.config).await;
    let mut broken_ids = Vec::new();
    let mut echo_ids = Vec::new();
    for i in 0..600 {
        if i % 20 == 0 {
            let id = format!("broken-{i}");
            caller.publish_request(Priority::Normal, &request(&id, "broken", "x"), &[]).await;
            broken_ids.push(id);
        } else {
            let id = format!("echo-{i}");
            caller.publish_request(Priority::ALL[i % 3], &request(&id, "echo", &format!("fine {i}")), &[]).await;
            echo_ids.push(id);
        }
    }
    // while the broken model's breaker is open, the worker says so
    let mut health_open = false;
    let start = Instant::now();
    while !health_open && start.elapsed() < Duration::from_secs(20) {
        let (status, body) = get_text(&format!("http://127.0.0.1:{port}/health/ready")).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        health_open = status == 200
            && v["breakers"].as_array().is_some_and(|b| {
                b.iter().any(|b| b["model"] == "broken" && b["state"] != "closed")
                    && b.iter().all(|b| b["model"] != "echo" || b["state"] == "closed")
            });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let all: Vec<String> = echo_ids.iter().chain(&broken_ids).cloned().collect();
    caller.wait_replies(&all, Duration::from_secs(60)).await;
    let r = caller.report("a model failing every call", subjects::DEFAULT_TENANT, &all, true).await;
    r.assert_clean();
    let seen = caller.snapshot();
    for id in &echo_ids {
        assert_eq!(seen[id][0].status, Status::Ok, "other models unaffected");
    }
    for id in &broken_ids {
        let e = seen[id][0].error.clone().expect("error result");
        assert_eq!(e.code, ErrorCode::BackendError, "{e:?}");
    }
    drop(seen);
    // each broken request: dead-lettered after max_deliver (3) deliveries
    let dlq = caller.js.get_stream(subjects::DLQ_STREAM).await.unwrap();
    assert_eq!(stream_len(&caller.js, subjects::DLQ_STREAM).await, broken_ids.len() as u64);
    let letter = dlq.direct_get_last_for_subject(subjects::dlq(Priority::Normal, "broken")).await.unwrap();
    assert_eq!(letter.headers.get(headers::DELIVERY_COUNT).unwrap().as_str(), "3");
    let (_, metrics) = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    let opened = metric(&metrics, "fleet_breaker_transitions_total{model=\"broken\",state=\"open\"}");
    let refused = metric(&metrics, "fleet_breaker_refused_total{model=\"broken\"}");
    let echo_opened = metric(&metrics, "fleet_breaker_transitions_total{model=\"echo\",state=\"open\"}");
    println!(
        "  breaker of `broken` opened {opened:.0} times, refused {refused:.0} calls; `echo` opened {:.0}",
        echo_opened.abs()
    );
    assert!(opened >= 1.0 && refused >= 1.0, "{metrics}");
    assert_eq!(echo_opened, 0.0);
    assert!(health_open, "/health/ready showed the open breaker of `broken` only");
    assert!(w.log().contains("circuit breaker opened"));
    assert!(w.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_backlog_of_expired_requests_is_not_computed() {
    let extra = "max_inflight = 4\n[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 200\n";
    let s = setup(extra);
    let caller = Chaos::connect(&s.nats.url()).await;
    let past = (retro_fleet_worker::unix_ms() - 1_000).to_string();
    let future = (retro_fleet_worker::unix_ms() + 600_000).to_string();
    let mut expired = Vec::new();
    let mut live = Vec::new();
    for i in 0..2_000 {
        let id = format!("x{i}");
        caller
            .publish_request(Priority::ALL[i % 3], &request(&id, "slow", "x"), &[(headers::DEADLINE, past.clone())])
            .await;
        expired.push(id);
        if i % 100 == 0 {
            let id = format!("live{i}");
            caller
                .publish_request(Priority::Normal, &request(&id, "slow", "x"), &[(headers::DEADLINE, future.clone())])
                .await;
            live.push(id);
        }
    }
    let (_w, port) = worker(&s.config).await;
    let all: Vec<String> = expired.iter().chain(&live).cloned().collect();
    // computing them all would take 2,000 x 200 ms / 4 = 100 s
    caller.wait_replies(&all, Duration::from_secs(60)).await;
    let r = caller.report("2,000 expired in a backlog", subjects::DEFAULT_TENANT, &all, true).await;
    r.assert_clean();
    let seen = caller.snapshot();
    let code = |id: &String| seen[id][0].error.as_ref().map(|e| e.code);
    assert!(expired.iter().all(|id| code(id) == Some(ErrorCode::DeadlineExceeded)));
    assert!(live.iter().all(|id| seen[id][0].status == Status::Ok));
    drop(seen);
    let (_, metrics) = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    let computed = metric(&metrics, "fleet_compute_seconds_count{");
    println!("  computed {computed} (the {} live ones), answered deadline_exceeded {}", live.len(), expired.len());
    assert_eq!(computed as usize, live.len(), "only live requests reached the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_request_whose_workers_keep_dying_is_answered_not_stranded() {
    // max_deliver is 3 in test configs; each generation would take a minute
    let s = setup("[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 60000\n");
    let caller = Chaos::connect(&s.nats.url()).await;
    let ids = ["doomed".to_string()];
    caller.publish_request(Priority::Normal, &request("doomed", "slow", "x"), &[]).await;
    let stream = caller.js.get_stream("FLEET_REQ_NORMAL").await.unwrap();
    let mut consumer =
        stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("worker_slow").await.unwrap();
    for delivery in 1..=3u64 {
        let (mut w, _) = worker(&s.config).await;
        let start = Instant::now();
        while consumer.info().await.unwrap().delivered.consumer_sequence < delivery {
            assert!(start.elapsed() < Duration::from_secs(20), "delivery {delivery} never came");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.kill9(); // dies while running it
    }
    let (_w, _) = worker(&s.config).await;
    caller.wait_replies(&ids, Duration::from_secs(20)).await;
    let r = caller.report("a request whose worker is killed at each of its 3 deliveries", "default", &ids, true).await;
    r.assert_clean();
    let seen = caller.snapshot();
    let e = seen["doomed"][0].error.clone().expect("an error result");
    assert_eq!(e.code, ErrorCode::Internal);
    assert!(e.message.contains("delivered 4 times"), "{e:?}");
    drop(seen);
    assert_eq!(stream_len(&caller.js, subjects::DLQ_STREAM).await, 1, "and a dead letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_10000_mixed_requests_metered_exactly_through_a_kill_and_a_restart_of_every_process() {
    use common::usage::{rows, stored, tally, Tally};
    const ADMIN: &str = "meter-admin-1";
    const APP: &str = "meter-app-1";
    const TENANTS: usize = 1_000;
    let extra = "max_inflight = 16\n[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 20\n".to_string()
        + &auth_with_keys(&[("admin", ADMIN, "acme", &["admin"]), ("app", APP, "acme", &["submit", "read"])]);
    let mut s = setup(&extra);
    let caller = Arc::new(Chaos::connect(&s.nats.url()).await);
    let (ingress, base) = start_ingress(&s.config).await;
    let start = Instant::now();
    // NATS: 9,000 requests of 1,000 tenants, nine each over three prompts
    // (the repeats coalesce with the first or hit the cache), in all classes;
    // the first 3,000 queue before any worker runs
    let publish = |t: usize| {
        let caller = caller.clone();
        async move {
            let tenant = format!("t{t:03}");
            for j in 0..9 {
                let mut req = request(&format!("{tenant}-{j}"), "slow", &format!("question {}", j % 3));
                req.params.temperature = Some(0.0);
                req.params.max_tokens = Some(1 + (t % 7) as u32);
                caller.publish_request(Priority::ALL[j % 3], &req, &[(headers::TENANT, tenant.clone())]).await;
            }
        }
    };
    for t in 0..TENANTS / 3 {
        publish(t).await;
    }
    let mut workers = [worker(&s.config).await, worker(&s.config).await];

    // HTTP: 900 calls of acme, a third repeats (answered from the ingress's
    // memory, metered there), every tenth streamed
    let http_task = {
        let base = base.clone();
        tokio::spawn(async move {
            let http = Http::new(&base);
            let mut from_memory = Tally::new();
            for i in 0..900 {
                let prompt = match i {
                    _ if i % 10 == 0 => format!("http stream {i}"),
                    _ if i % 3 == 2 => format!("http question {}", i - 1),
                    _ => format!("http question {i}"),
                };
                let body = json!({"model": "slow", "prompt": prompt, "stream": i % 10 == 0,
                                  "params": {"temperature": 0, "max_tokens": 6}});
                let r = http.send("POST", "/v1/infer", Some(APP), Some(body)).await;
                assert_eq!(r.status(), 200);
                let text = r.text().await.unwrap();
                if i % 10 != 0 {
                    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                    if v["cache"] == "ingress" {
                        tally(&mut from_memory, "acme", v["usage"]["total_tokens"].as_u64().unwrap());
                    }
                }
            }
            from_memory
        })
    };
    // a worker dies with requests in flight and prefetched: they are delivered again
    while caller.replied() < 1_000 {
        assert!(start.elapsed() < Duration::from_secs(60), "stalled at {} answers", caller.replied());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    workers[0].0.kill9();
    workers[0] = worker(&s.config).await;
    for t in TENANTS / 3..TENANTS {
        publish(t).await;
    }
    // 100 that cannot be read: answered as failed, metered as failed
    for i in 0..100 {
        let mut h = HeaderMap::new();
        let id = format!("broken-{i}");
        h.insert(headers::MSG_ID, id.as_str());
        h.insert(headers::TENANT, format!("t{i:03}").as_str());
        caller.publish(&subjects::request(Priority::Normal, "slow"), &id, h, Bytes::from_static(b"\xc1")).await;
    }
    let mut from_memory = http_task.await.unwrap();
    let total = 9_000 + 100 + 900;

    // every request gets one record: wait for all of them
    let http = Http::new(&base);
    let sum = |v: &serde_json::Value, field: &str| {
        v["data"].as_array().map_or(0, |rows| rows.iter().map(|r| r[field].as_u64().unwrap_or(0)).sum::<u64>())
    };
    let mut v = serde_json::Value::Null;
    while sum(&v, "requests") < total && start.elapsed() < Duration::from_secs(240) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        v = http.json("GET", "/v1/usage?group_by=tenant", Some(ADMIN), None).await.1;
    }
    assert_eq!(sum(&v, "requests"), total, "one record per request");
    let js = caller.js.clone();
    let mut want = stored(&js).await;
    for (tenant, (n, tokens)) in std::mem::take(&mut from_memory) {
        let e = want.entry(tenant).or_default();
        e.0 += n;
        e.1 += tokens;
    }
    assert_eq!(want.values().map(|v| v.0).sum::<u64>(), total, "one stored result per request");
    let by_tenant = |http: Http| async move {
        let (status, v) = http.json("GET", "/v1/usage?group_by=tenant", Some(ADMIN), None).await;
        assert_eq!(status, 200, "{v}");
        rows(&v)
    };
    let got = by_tenant(Http::new(&base)).await;
    assert_eq!(got.len(), TENANTS + 1, "1,000 NATS tenants and acme");
    assert_eq!(got, want, "metered = distinct stored results + answers from memory, per tenant");
    assert_eq!(sum(&v, "failed"), 100);
    let cached = sum(&v, "cached");
    // the label cap: a worker that served 1,000 tenants names 100 and `other`
    let (_, text) = get_text(&format!("http://127.0.0.1:{}/metrics", workers[1].1)).await;
    let labels: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("fleet_tokens_total{"))
        .filter_map(|l| l.split("tenant=\"").nth(1)?.split('"').next())
        .collect();
    assert!(labels.len() <= 101 && labels.contains("other"), "{} tenant labels: {labels:?}", labels.len());
    // deliveries beyond one per NATS request: what the kill took down in flight
    let mut deliveries = 0;
    for p in Priority::ALL {
        let stream = js.get_stream(subjects::request_stream(p)).await.unwrap();
        let mut c = stream.get_consumer::<async_nats::jetstream::consumer::pull::Config>("worker_slow").await.unwrap();
        deliveries += c.info().await.unwrap().delivered.consumer_sequence;
    }
    let redelivered = deliveries - 9_100;
    println!(
        "  {total} requests ({cached} cached, 100 failed, {redelivered} redelivered) of {} tenants metered exactly in \
         {:.1} s; {} tenant labels",
        TENANTS + 1,
        start.elapsed().as_secs_f64(),
        labels.len()
    );
    assert!(redelivered > 0, "the kill hit requests in flight");

    // every process stops, nats-server included; the figures are the same after
    for (w, _) in &mut workers {
        w.terminate();
    }
    drop(ingress);
    s.nats.stop();
    s.nats.start_again();
    let (_ingress, base) = start_ingress(&s.config).await;
    assert_eq!(by_tenant(Http::new(&base)).await, want, "after a restart of every process");
}
