//! Usage metering through real processes: every answered request is
//! counted once in `FLEET_USAGE` (worker answers, cache hits, streams,
//! failures, and answers from the ingress's memory), `GET /v1/usage` and
//! `retro-fleet usage` add them up exactly, a tenant reads only its own,
//! and the figures outlive the ingress.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use common::usage::*;
use common::*;
use retro_fleet_schemas::{headers, subjects, Priority};
use serde_json::{json, Value};

const ADMIN: &str = "usage-admin-1";
const APP: &str = "usage-app-1";
const OTHER: &str = "usage-other-1";

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

const LIMITED: &str = "usage-limited-1";

/// The tokens `GET /v1/usage` reports for `tenant`, once `requests` of its
/// requests are metered.
async fn metered_tokens(http: &Http, tenant: &str, requests: u64) -> u64 {
    for _ in 0..100 {
        let (_, v) = http.json("GET", &format!("/v1/usage?tenant={tenant}&group_by=tenant"), Some(ADMIN), None).await;
        if let Some((n, tokens)) = rows(&v).get(tenant) {
            if *n == requests {
                // the ingress's ledger follows the same stream: let it catch up
                tokio::time::sleep(Duration::from_millis(300)).await;
                return *tokens;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{requests} requests of {tenant} were not metered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refuses_the_request_that_would_cross_it_and_outlives_the_ingress() {
    let keys = auth_with_keys(&[
        ("admin", ADMIN, "acme", &["admin"]),
        ("app", APP, "acme", &["submit", "read"]),
        ("other", OTHER, "globex", &["submit", "read"]),
        ("limited", LIMITED, "globex", &["submit"]),
    ]) + "budget = { requests = 2 }\n";
    let s = setup(&keys);
    let _worker = worker(&s.config).await;
    let (mut ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);

    // a budget with nothing to limit is refused, naming the field
    let (status, v) = http.json("PUT", "/v1/admin/tenants/acme", Some(ADMIN), Some(json!({"budget": {}}))).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("budget")), "{v}");
    const BUDGET: u64 = 120;
    let body = json!({"weight": 1, "budget": {"tokens": BUDGET, "per": "day"}});
    let (status, v) = http.json("PUT", "/v1/admin/tenants/acme", Some(ADMIN), Some(body)).await;
    assert_eq!((status, &v["budget"]), (200, &json!({"tokens": BUDGET, "per": "day"})), "{v}");
    // ingresses follow fleet_tenants live: wait until the budget is seen
    // (a request far over it is refused)
    let huge = json!({"model": "echo", "prompt": "x", "params": {"max_tokens": 4000}});
    let (mut seen, mut answered) = (false, 0);
    for _ in 0..50 {
        let (status, _) = http.json("POST", "/v1/infer", Some(APP), Some(huge.clone())).await;
        if status == 429 {
            seen = true;
            break;
        }
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the tenant's budget reached the ingress");
    let mut served = if answered > 0 { metered_tokens(&http, "acme", answered).await } else { 0 };
    let mut before = 0;

    // same-sized distinct prompts: the same estimate each time
    let refused = loop {
        assert!(answered < 40, "{BUDGET} tokens were never used up");
        let body = json!({"model": "echo", "prompt": format!("budget probe number {answered:03}"),
                          "params": {"max_tokens": 8, "temperature": 0}});
        let r = http.send("POST", "/v1/infer", Some(APP), Some(body)).await;
        if r.status() == 429 {
            break r;
        }
        assert_eq!(r.status(), 200);
        answered += 1;
        before = served;
        served = metered_tokens(&http, "acme", answered).await;
    };
    assert!(answered >= 2, "some requests fit in {BUDGET} tokens");
    let retry: u64 = refused.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    let reset = refused.headers()["x-budget-reset"].to_str().unwrap().to_string();
    let v: Value = refused.json().await.unwrap();
    assert_eq!(v["error"]["code"], "budget_exceeded", "{v}");
    // the refusal counts the real usage metered, and the estimate passes the budget
    let message = v["error"]["message"].as_str().unwrap();
    let needs: u64 = message.split("needs ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(
        message.contains(&format!("tenant `acme` has used {served} of its budget of {BUDGET} tokens per day")),
        "{v}"
    );
    assert!(served + needs > BUDGET && before + needs <= BUDGET, "{before} + {needs} fit, {served} + {needs} do not");
    let tomorrow = time::OffsetDateTime::now_utc().date().next_day().unwrap();
    assert_eq!(reset, format!("{tomorrow}T00:00:00Z"));
    assert!(retry > 0 && retry <= 86_400, "{retry}");
    // another tenant is not held back
    let (status, v) = http.json("POST", "/v1/infer", Some(OTHER), Some(json!({"model": "echo", "prompt": "hi"}))).await;
    assert_eq!(status, 200, "{v}");

    // a key's own budget: two requests a month
    for i in 0..2 {
        let (status, v) = http
            .json("POST", "/v1/infer", Some(LIMITED), Some(json!({"model": "echo", "prompt": format!("k{i}")})))
            .await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) =
        http.json("POST", "/v1/infer", Some(LIMITED), Some(json!({"model": "echo", "prompt": "k2"}))).await;
    assert_eq!((status, v["error"]["code"].as_str()), (429, Some("budget_exceeded")), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("credential `key:limited` has used 2 of its budget of 2 requests per month"),
        "{v}"
    );

    // a new ingress counts the month from the stream: still refused
    ingress.terminate();
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let body = json!({"model": "echo", "prompt": "budget probe number 999", "params": {"max_tokens": 8}});
    let (status, v) = http.json("POST", "/v1/infer", Some(APP), Some(body.clone())).await;
    assert_eq!((status, v["error"]["code"].as_str()), (429, Some("budget_exceeded")), "{v}");
    // the command line raises it: requests pass again
    let out = cli(&s.config, &["tenants", "set", "acme", "--budget-tokens", "100000", "--budget-per", "day"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("100000 tokens per day"));
    let mut status = 0;
    for _ in 0..50 {
        status = http.json("POST", "/v1/infer", Some(APP), Some(body.clone())).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "the raised budget reached the ingress");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_limit_charges_the_estimate_and_settles_to_the_real_usage() {
    // 300 tokens a minute, shared by every ingress (KV): a request estimated
    // at 100+ tokens uses far fewer, and its record gives the rest back
    let config = auth_with_keys(&[("admin", ADMIN, "acme", &["admin"]), ("app", APP, "acme", &["submit", "read"])])
        + "[ingress.rate_limit]\nenabled = true\nbackend = \"nats\"\nalgorithm = \"fixed_window\"\n\
           window_secs = 60\nsubmit = { tokens = 300 }\n";
    let s = setup(&config);
    let _worker = worker(&s.config).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let ask =
        |i: usize| json!({"model": "echo", "prompt": format!("settle probe {i:02}"), "params": {"max_tokens": 100}});
    // unsettled, three estimates of 104 do not fit in 300
    for i in 0..6 {
        let r = http.send("POST", "/v1/infer", Some(APP), Some(ask(i))).await;
        assert_eq!(r.status(), 200, "request {i}: {}", r.text().await.unwrap());
        metered_tokens(&http, "acme", i as u64 + 1).await;
    }
    let used = metered_tokens(&http, "acme", 6).await;
    assert!(used < 300, "six requests used {used} tokens");
    // the limit still holds: what is left is what was not used
    let r = http
        .send(
            "POST",
            "/v1/infer",
            Some(APP),
            Some(json!({"model": "echo", "prompt": "x",
        "params": {"max_tokens": 300 - used + 1}})),
        )
        .await;
    assert_eq!(r.status(), 429, "{}", r.text().await.unwrap());
}
