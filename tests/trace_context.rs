//! W3C trace context through NATS: the ingress forwards the caller's
//! `traceparent` (or starts a trace) in the request's NATS headers, and the
//! worker logs the trace id with everything it says about that request.

mod common;

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use common::*;
use futures::StreamExt;
use retro_fleet_schemas::headers;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_travels_from_http_through_nats_to_the_worker_logs() {
    let s = setup("");
    let mut worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let client = async_nats::connect(s.nats.url()).await.unwrap();
    let mut seen = client.subscribe("fleet.req.>").await.unwrap();
    client.flush().await.unwrap();

    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/infer/async"))
        .header("traceparent", given)
        .json(&serde_json::json!({"model": "echo", "prompt": "traced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let msg = tokio::time::timeout(Duration::from_secs(10), seen.next()).await.unwrap().unwrap();
    assert_eq!(msg.headers.unwrap().get(headers::TRACEPARENT).unwrap().as_str(), given);

    // no trace context, or a malformed one: the ingress starts a trace
    for bad in [None, Some("00-xyz")] {
        let mut req = http.post(format!("{base}/v1/infer/async"));
        if let Some(b) = bad {
            req = req.header("traceparent", b);
        }
        let r = req.json(&serde_json::json!({"model": "echo", "prompt": "untraced"})).send().await.unwrap();
        assert_eq!(r.status(), 202);
        let msg = tokio::time::timeout(Duration::from_secs(10), seen.next()).await.unwrap().unwrap();
        let started = msg.headers.unwrap().get(headers::TRACEPARENT).unwrap().as_str().to_string();
        assert!(headers::is_traceparent(&started), "{started}");
        assert_ne!(started, given);
    }

    // a request the worker has to dead-letter: its warning carries the trace id
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "poison-traced");
    h.insert(headers::TRACEPARENT, format!("00-{trace}-b7ad6b7169203331-01").as_str());
    let js = async_nats::jetstream::new(client.clone());
    js.publish_with_headers("fleet.req.normal.echo", h, "not msgpack".into()).await.unwrap().await.unwrap();
    let start = Instant::now();
    loop {
        let log = worker.log();
        if let Some(line) = log.lines().find(|l| l.contains("dead-lettering")) {
            assert!(line.contains(trace), "the dead-letter warning names the trace: {line}");
            break;
        }
        assert!(worker.alive() && start.elapsed() < Duration::from_secs(20), "no dead-letter warning:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
