//! Usage metering through real processes: every answered request is
//! counted once in `FLEET_USAGE` (worker answers, cache hits, streams,
//! failures, and answers from the ingress's memory), `GET /v1/usage` and
//! `retro-fleet usage` add them up exactly, a tenant reads only its own,
//! and the figures outlive the ingress.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use retro_fleet_schemas::{codec, headers, subjects, InferResult, Priority};
use serde_json::{json, Value};

const ADMIN: &str = "usage-admin-1";
const APP: &str = "usage-app-1";
const OTHER: &str = "usage-other-1";

/// `(requests, tokens)` per tenant.
type Tally = BTreeMap<String, (u64, u64)>;

fn tally(t: &mut Tally, tenant: &str, tokens: u64) {
    let e = t.entry(tenant.to_string()).or_default();
    e.0 += 1;
    e.1 += tokens;
}

/// Every distinct result in `FLEET_RESULTS`, added up per tenant.
async fn stored(js: &async_nats::jetstream::Context) -> Tally {
    let stream = js.get_stream(subjects::RESULTS_STREAM).await.unwrap();
    let consumer =
        stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await.unwrap();
    let mut left = stream.get_info().await.unwrap().state.messages;
    let mut messages = consumer.messages().await.unwrap();
    let mut t = Tally::new();
    while left > 0 {
        let m = tokio::time::timeout(Duration::from_secs(5), messages.next()).await.unwrap().unwrap().unwrap();
        left -= 1;
        let tenant = m.subject.split('.').nth(2).unwrap().to_string();
        let r: InferResult = codec::decode(None, &m.payload).unwrap();
        tally(&mut t, &tenant, r.usage.map_or(0, |u| u64::from(u.total_tokens)));
    }
    t
}

/// `GET /v1/usage?group_by=tenant` as `(requests, tokens)` per tenant.
fn rows(v: &Value) -> Tally {
    let rows = v["data"].as_array().unwrap_or_else(|| panic!("{v}"));
    rows.iter()
        .map(|r| {
            let n = |f: &str| r[f].as_u64().unwrap();
            (r["tenant"].as_str().unwrap().to_string(), (n("requests"), n("total_tokens")))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_metered_once_and_a_tenant_reads_its_own() {
    let keys = auth_with_keys(&[
        ("admin", ADMIN, "acme", &["admin"]),
        ("app", APP, "acme", &["submit", "read"]),
        ("other", OTHER, "globex", &["submit", "read"]),
    ]);
    let s = setup(&keys);
    // one tenant label of its own per process: the second tenant is `other`
    let port = free_port();
    let env =
        [("FLEET_METRICS_LISTEN", format!("127.0.0.1:{port}")), ("FLEET_TOPOLOGY__USAGE_TENANT_LABELS", "1".into())];
    let mut worker = Proc::start(&s.config, &["worker"], &env);
    wait_ready(&format!("http://127.0.0.1:{port}/health/ready"), &mut worker).await;
    wait_log(&mut worker, "worker pulling").await;
    let (mut ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);

    // answers from the ingress's memory are not in FLEET_RESULTS: tallied here
    let mut from_memory = Tally::new();
    let mut failed = 0;
    for (key, tenant, n) in [(APP, "acme", 30), (OTHER, "globex", 20)] {
        for i in 0..n {
            // a third repeat an earlier prompt: cache hits, here or in the worker
            let prompt = format!("tell me about {} please", if i % 3 == 2 { i - 1 } else { i });
            let body = json!({"model": "echo", "prompt": prompt, "params": {"temperature": 0}});
            let (status, r) = http.json("POST", "/v1/infer", Some(key), Some(body)).await;
            assert_eq!(status, 200, "{r}");
            if r["cache"] == "ingress" {
                tally(&mut from_memory, tenant, r["usage"]["total_tokens"].as_u64().unwrap());
            }
        }
        let streamed = http
            .send("POST", "/v1/infer", Some(key), Some(json!({"model": "echo", "prompt": "a stream", "stream": true})))
            .await;
        assert!(streamed.text().await.unwrap().contains("event: result"));
    }
    assert!(!from_memory.is_empty(), "repeats were answered from the ingress's memory");
    // a NATS publisher's undecodable request: an error result, metered as failed
    let caller = Caller::connect(&s.nats.url()).await;
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "broken-1");
    h.insert(headers::TENANT, "globex");
    caller.publish_raw(&subjects::request(Priority::Normal, "echo"), "broken-1", h, Bytes::from_static(b"\xc1")).await;
    failed += 1;

    let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
    let mut want = stored(&js).await;
    assert_eq!(
        want.values().map(|v| v.0).sum::<u64>(),
        30 + 20 + 2 + failed - from_memory.values().map(|v| v.0).sum::<u64>(),
        "{want:?}"
    );
    for (tenant, (n, tokens)) in &from_memory {
        let e = want.entry(tenant.clone()).or_default();
        e.0 += n;
        e.1 += tokens;
    }
    // a record is written after its reply: wait for the last ones
    let mut got = Tally::new();
    for _ in 0..50 {
        let (status, v) = http.json("GET", "/v1/usage?group_by=tenant", Some(ADMIN), None).await;
        assert_eq!(status, 200, "{v}");
        got = rows(&v);
        if got == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got, want, "metered = stored results + answers from memory, per tenant");
    // the worker counted the tokens of what it stored, the capped tenant as `other`
    let (_, text) = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    let stored_tokens: u64 = stored(&js).await.values().map(|v| v.1).sum();
    assert_eq!(metric(&text, "fleet_tokens_total{") as u64, stored_tokens, "{text}");
    assert!(text.contains(r#"tenant="acme""#) && text.contains(r#"tenant="other""#), "{text}");
    assert!(!text.contains(r#"tenant="globex""#), "{text}");

    // a tenant reads its own only; an unknown dimension is named
    let (status, v) = http.json("GET", "/v1/usage?group_by=tenant", Some(OTHER), None).await;
    assert_eq!(
        (status, rows(&v)),
        (200, want.iter().filter(|(t, _)| *t == "globex").map(|(t, v)| (t.clone(), *v)).collect())
    );
    let (status, v) = http.json("GET", "/v1/usage?tenant=acme", Some(OTHER), None).await;
    assert_eq!((status, v["error"]["param"].as_str()), (403, Some("tenant")), "{v}");
    let (status, v) = http.json("GET", "/v1/usage?group_by=colour", Some(APP), None).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("group_by")), "{v}");
    // by credential: the app key's requests are acme's
    let (_, v) = http.json("GET", "/v1/usage?group_by=key&tenant=acme", Some(ADMIN), None).await;
    let by_key: Vec<_> =
        v["data"].as_array().unwrap().iter().map(|r| (r["key"].clone(), r["requests"].clone())).collect();
    assert_eq!(by_key, [(json!("key:app"), json!(want["acme"].0))], "{v}");

    // the figures outlive the ingress, and the command line reads the same
    ingress.terminate();
    let (_ingress, base) = start_ingress(&s.config).await;
    let (_, v) = Http::new(&base).json("GET", "/v1/usage?group_by=tenant", Some(ADMIN), None).await;
    assert_eq!(rows(&v), want);
    let out = cli(&s.config, &["usage", "--group-by", "tenant", "--json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli_rows: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows(&json!({"data": cli_rows})), want);
}
