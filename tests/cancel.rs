//! Cancellation through real processes: the ingress publishes a cancel when
//! its HTTP caller disconnects or times out; the worker aborts the
//! generation and the stored result is `cancelled`.

mod common;

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use common::*;
use retro_fleet_schemas::{codec, headers, subjects, ErrorCode, Priority};

/// Polls `GET /v1/results/{id}` until it answers 200.
async fn final_result(base: &str, id: &str) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let r = reqwest::get(format!("{base}/v1/results/{id}")).await.unwrap();
        if r.status() == 200 {
            return r.json().await.unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no result for {id}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_disconnects_or_times_out_cancels_its_generation() {
    // each generation would take 30 s
    let s = setup("[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 30000\n");
    let mut worker = start_worker(&s.config, &[]).await;
    wait_log(&mut worker, "listening for cancels").await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let started = Instant::now();

    // the HTTP caller hangs up after 500 ms
    let gone = reqwest::Client::builder().timeout(Duration::from_millis(500)).build().unwrap();
    let r = gone
        .post(format!("{base}/v1/infer"))
        .json(&serde_json::json!({"model": "slow", "prompt": "x", "id": "hangs-up"}))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up");
    let result = final_result(&base, "hangs-up").await;
    assert_eq!(result["error"]["code"], "cancelled", "{result}");

    // the ingress gives up after the caller's timeout: 504, then `cancelled`
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/infer"))
        .json(&serde_json::json!({"model": "slow", "prompt": "x", "id": "times-out", "timeout_ms": 300}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    let result = final_result(&base, "times-out").await;
    assert_eq!(result["error"]["code"], "cancelled", "{result}");

    // a streamed request whose caller leaves
    let r = gone
        .post(format!("{base}/v1/infer"))
        .json(&serde_json::json!({"model": "slow", "prompt": "x", "id": "stream-gone", "stream": true}))
        .send()
        .await;
    if let Ok(r) = r {
        let _ = r.text().await; // times out mid-body
    }
    let result = final_result(&base, "stream-gone").await;
    assert_eq!(result["error"]["code"], "cancelled", "{result}");

    assert!(started.elapsed() < Duration::from_secs(25), "no generation ran to its end");
    assert_eq!(worker.log().matches("cancel received; aborting the generation").count(), 3, "{}", worker.log());
    assert!(worker.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_arrives_before_the_request_runs_skips_it() {
    let s = setup("[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 30000\n");
    let mut worker = start_worker(&s.config, &[]).await;
    wait_log(&mut worker, "listening for cancels").await;
    let mut caller = Caller::connect(&s.nats.url()).await;
    caller.client.publish(subjects::cancel(subjects::DEFAULT_TENANT, "early"), Bytes::new()).await.unwrap();
    caller.client.flush().await.unwrap();
    // core NATS keeps order per connection pair, not across the worker's
    // two paths (cancel subscription, pull stream): give the cancel a moment
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "early");
    let req = request("early", "slow", "x");
    caller
        .publish_raw(&subjects::request(Priority::Normal, "slow"), "early", h, Bytes::from(codec::encode(&req)))
        .await;
    let (results, _) = caller.collect(1, Duration::from_secs(10)).await;
    assert_eq!(results.len(), 1, "answered at once, not after 30 s");
    let e = results[0].1.error.as_ref().unwrap();
    assert_eq!(e.code, ErrorCode::Cancelled);
    assert!(e.message.contains("before it started"), "{e:?}");
}
