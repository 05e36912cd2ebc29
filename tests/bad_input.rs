//! Bad input never crashes a worker: every message becomes an error result
//! with a stable code (where a reply subject is known), a dead letter with
//! its original payload, and the worker keeps serving.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use common::*;
use retro_fleet_schemas::{codec, headers, subjects, ErrorCode, Priority, Status};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_get_error_results_and_dead_letters() {
    let s = setup("max_prompt_bytes = 1000\n");
    let (nats, config) = (&s.nats, &s.config);
    let mut worker = start_worker(config, &[]).await;
    let mut caller = Caller::connect(&nats.url()).await;
    let echo = subjects::request(Priority::Normal, "echo");

    let with_id = |id: &str, ct: Option<&str>| {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, id);
        if let Some(ct) = ct {
            h.insert(headers::CONTENT_TYPE, ct);
        }
        h
    };
    // malformed MessagePack
    caller
        .publish_raw(&echo, "bad-msgpack", with_id("bad-msgpack", None), Bytes::from_static(b"\xc1\xff\x00garbage"))
        .await;
    // JSON of the wrong shape
    let wrong = br#"{"id":"bad-shape","model":"echo","input":"not an object"}"#;
    caller
        .publish_raw(&echo, "bad-shape", with_id("bad-shape", Some("application/json")), Bytes::from_static(wrong))
        .await;
    // missing fields
    caller
        .publish_raw(
            &echo,
            "bad-missing",
            with_id("bad-missing", Some("application/json")),
            Bytes::from_static(br#"{"id":"bad-missing"}"#),
        )
        .await;
    // a prompt over the worker's limit
    caller.publish(Priority::Normal, &request("bad-big", "echo", &"x".repeat(2000))).await;
    // a model nobody configured
    caller.publish(Priority::High, &request("bad-model", "no-such-model", "hi")).await;
    // body names another model than the subject
    let mut other = request("bad-subject", "other", "hi");
    other.model = "other".into();
    let h = with_id("bad-subject", None);
    caller.publish_raw(&echo, "bad-subject", h, Bytes::from(codec::encode(&other))).await;
    // an unknown content type
    caller.publish_raw(&echo, "bad-ct", with_id("bad-ct", Some("text/plain")), Bytes::from_static(b"hello")).await;
    // a valid request after all of that
    caller.publish(Priority::Normal, &request("good", "echo", "still serving")).await;

    let (results, dups) = caller.collect(8, Duration::from_secs(30)).await;
    assert_eq!(dups, 0);
    let code = |id: &str| {
        let r = &results.iter().find(|(k, _)| k == id).unwrap_or_else(|| panic!("no result for {id}: {results:?}")).1;
        r.error.as_ref().map(|e| e.code)
    };
    assert_eq!(code("bad-msgpack"), Some(ErrorCode::DecodeError));
    assert_eq!(code("bad-shape"), Some(ErrorCode::DecodeError));
    assert_eq!(code("bad-missing"), Some(ErrorCode::DecodeError));
    assert_eq!(code("bad-big"), Some(ErrorCode::PromptTooLarge));
    assert_eq!(code("bad-model"), Some(ErrorCode::UnknownModel));
    assert_eq!(code("bad-subject"), Some(ErrorCode::InvalidRequest));
    assert_eq!(code("bad-ct"), Some(ErrorCode::DecodeError));
    let good = &results.iter().find(|(k, _)| k == "good").unwrap().1;
    assert_eq!(good.status, Status::Ok);
    assert_eq!(good.output.as_ref().unwrap().text, "still serving");

    // no id and no reply subject: only a dead letter can tell
    caller.js.publish(echo.clone(), Bytes::from_static(b"\x00\x01")).await.unwrap().await.unwrap();
    // every poison message is in the DLQ with its original payload and error
    let dlq = caller.js.get_stream(subjects::DLQ_STREAM).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream_len(&caller.js, subjects::DLQ_STREAM).await < 8 {
        assert!(tokio::time::Instant::now() < deadline, "dead letters missing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let letter = dlq.direct_get_last_for_subject(subjects::dlq(Priority::Normal, "echo")).await.unwrap();
    assert_eq!(&letter.payload[..], b"\x00\x01");
    assert_eq!(letter.headers.get(headers::ERROR_CODE).unwrap().as_str(), "decode_error");
    let letter = dlq.direct_get_last_for_subject(subjects::dlq(Priority::High, "no-such-model")).await.unwrap();
    assert_eq!(letter.headers.get(headers::ERROR_CODE).unwrap().as_str(), "unknown_model");
    assert_eq!(letter.headers.get(headers::MSG_ID).unwrap().as_str(), "bad-model");

    // 500 random byte strings: the worker survives them all and still answers
    let mut seed = 0x9e3779b97f4a7c15u64;
    for i in 0..500 {
        let len = (i % 64) + 1;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let id = format!("fuzz-{i}");
        caller.publish_raw(&echo, &id, with_id(&id, None), Bytes::from(bytes)).await;
    }
    caller.publish(Priority::Normal, &request("good-2", "echo", "alive")).await;
    let (results, _) = caller.collect(501, Duration::from_secs(60)).await;
    assert_eq!(results.len(), 501);
    assert!(results.iter().all(|(k, r)| k == "good-2" || r.status == Status::Error));
    assert!(worker.alive(), "the worker never crashed:\n{}", worker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_rejects_bad_http_input_with_clear_codes() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &nats.url(), "");
    let text = std::fs::read_to_string(&config).unwrap() + "[ingress]\nmax_prompt_bytes = 100\nmax_body_bytes = 4096\n";
    std::fs::write(&config, text).unwrap();
    topology_apply(&config);
    let (_ingress, base) = start_ingress(&config).await;
    let http = reqwest::Client::new();
    let post = |body: String| {
        let http = http.clone();
        let url = format!("{base}/v1/infer");
        async move {
            let r = http.post(url).header("content-type", "application/json").body(body).send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body)
        }
    };
    let (s, b) = post(format!(r#"{{"model":"echo","prompt":"{}"}}"#, "y".repeat(200))).await;
    assert_eq!((s, b["error"]["code"].as_str()), (413, Some("prompt_too_large")));
    let (s, b) = post(format!(r#"{{"model":"echo","prompt":"{}"}}"#, "y".repeat(5000))).await;
    assert_eq!(s, 413, "{b}");
    let (s, b) = post("{not json".into()).await;
    assert_eq!((s, b["error"]["code"].as_str()), (400, Some("decode_error")));
    let (s, b) = post(r#"{"model":"echo","prompt":7}"#.into()).await;
    assert_eq!((s, b["error"]["code"].as_str()), (422, Some("invalid_request")));
    assert!(
        b["error"]["message"].as_str().unwrap().contains("prompt")
            || b["error"]["message"].as_str().unwrap().contains("integer"),
        "{b}"
    );
    let (s, b) = post(r#"{"model":"echo"}"#.into()).await;
    assert_eq!((s, b["error"]["code"].as_str()), (422, Some("invalid_request")));
    let (s, b) = post(r#"{"model":"nope","prompt":"x"}"#.into()).await;
    assert_eq!((s, b["error"]["code"].as_str()), (404, Some("unknown_model")));
    let (s, b) = post(r#"{"model":"echo","prompt":"x","temprature":1}"#.into()).await;
    assert_eq!(s, 422, "unknown fields are named: {b}");
    assert!(b["error"]["message"].as_str().unwrap().contains("temprature"));
    let r = http.get(format!("{base}/v1/results/01NOSUCHID")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}
