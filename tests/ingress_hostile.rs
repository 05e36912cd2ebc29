//! What a hostile caller can still try once the credentials hold: slow or
//! endless connections, bodies that never come or are declared huge,
//! guessing credentials, and spending past its budget or above its class
//! through batches. Real ingress processes and nats-server; the timeouts
//! are configured to a second so each case ends quickly.

mod common;

use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::{subjects, Priority};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "hostile-key-1";
const LOW_KEY: &str = "low-key-1";
const BATCH_KEY: &str = "batch-high-key-1";

fn config() -> String {
    let keys = api_keys(&[("app", KEY, "acme", &["submit", "read"])]);
    let low = api_keys(&[("low", LOW_KEY, "acme", &["submit"])]) + "max_priority = \"low\"\n";
    let batch = api_keys(&[("batcher", BATCH_KEY, "acme", &["submit"])]) + "max_batch_priority = \"high\"\n";
    format!(
        r#"
[models.echo]
backend = "echo"
[models.syn]
backend = "synthetic"
latency_ms = 1
output_tokens = 40
[ingress]
max_body_bytes = 4096
[ingress.connections]
header_timeout_ms = 1000
body_timeout_ms = 1000
max_per_peer = 6
[ingress.auth]
enabled = true
failed_logins_per_minute = 3
{keys}{low}{batch}
[ingress.rate_limit]
enabled = true
algorithm = "fixed_window"
window_secs = 3600
default_max_tokens = 10
[ingress.rate_limit.submit]
requests = 0
tokens = 100
"#
    )
}

fn port_of(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection or `limit` passes; the
/// bytes read and how long it took.
async fn read_to_close(s: &mut TcpStream, limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open after {limit:?}; read {:?}", String::from_utf8_lossy(&out)),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_endless_and_surplus_connections_are_cut_off() {
    let s = setup(&config());
    let (_ingress, base) = start_ingress(&s.config).await;
    let addr = port_of(&base);

    // half the headers, then nothing: closed after the header timeout
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nAuthor").await.unwrap();
    let (_, took) = read_to_close(&mut slow, Duration::from_secs(5)).await;
    assert!(took >= Duration::from_millis(900), "not before the timeout: {took:?}");

    // a declared body far over the limit: 413 at once, the body never read
    let mut huge = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: 50000000000\r\n\r\n{{"
    );
    huge.write_all(head.as_bytes()).await.unwrap();
    let (answer, took) = read_to_close(&mut huge, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(took < Duration::from_millis(900), "answered before any timeout: {took:?}");

    // a body that stops halfway: 408 after the body timeout
    let mut stalled = TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"model\":"
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let (answer, took) = read_to_close(&mut stalled, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    assert!(took >= Duration::from_millis(900), "{took:?}");

    // six connections from one address are its cap: the seventh is closed
    // at once, and a place frees when one of the six closes
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut seventh = TcpStream::connect(&addr).await.unwrap();
    let (_, took) = read_to_close(&mut seventh, Duration::from_millis(500)).await;
    assert!(took < Duration::from_millis(500));
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, text) = get_text(&format!("{base}/metrics")).await;
    assert_eq!(status, 200, "a new connection is served once the others closed");
    assert_eq!(metric(&text, "fleet_ingress_connections_refused_total{reason=\"max_per_peer\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessing_credentials_is_throttled_per_address() {
    let s = setup(&config());
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    // three failures a minute (windows are aligned to the minute, so a
    // boundary may reset the count once: allow for it)
    let mut statuses = Vec::new();
    for i in 0..8 {
        let status = http.send("GET", "/v1/models", Some(&format!("guess-{i}")), None).await.status().as_u16();
        statuses.push(status);
        if status == 429 {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    assert!(statuses.iter().filter(|s| **s == 401).count() >= 3, "{statuses:?}");
    let r = http.send("GET", "/v1/models", Some(KEY), None).await;
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert_eq!(r.status(), 429, "the address is refused, whatever it sends now");
    assert!((1..=60).contains(&retry), "until its minute is over: {retry}");
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("failed credentials"), "{body}");
}

/// A JSONL batch of `n` completion lines with `max_tokens` each.
fn batch(n: usize, max_tokens: u32) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"model": "echo", "prompt": "abcd", "max_tokens": max_tokens}})
            .to_string()
                + "\n"
        })
        .collect()
}

async fn post_batch(http: &Http, key: &str, priority: &str, body: String) -> (u16, Value, bool) {
    let r = http
        .client
        .post(format!("{}/v1/batches?priority={priority}", http.base))
        .bearer_auth(key)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r.headers().contains_key("retry-after");
    (status, r.json().await.unwrap_or_default(), retry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_pay_for_their_tokens_and_stay_below_their_class() {
    let s = setup(&config());
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);

    // a key's class ceilings: batches at most normal by default
    let (status, body, _) = post_batch(&http, KEY, "high", batch(1, 1)).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("max_batch_priority"), "{body}");
    let (status, body, _) = post_batch(&http, BATCH_KEY, "high", batch(1, 1)).await;
    assert_eq!(status, 200, "a key allowed high batches: {body}");
    let r = http
        .client
        .post(format!("{base}/v1/infer/async"))
        .bearer_auth(LOW_KEY)
        .header("x-priority", "normal")
        .json(&json!({"model": "echo", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a key capped at low cannot send normal");

    // every line is charged: 3 lines of 1 + 20 tokens are 63 of 100
    let (status, body, _) = post_batch(&http, KEY, "low", batch(3, 20)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body, retry) = post_batch(&http, KEY, "low", batch(2, 20)).await;
    assert_eq!((status, retry), (429, true), "42 more do not fit in the 37 left: {body}");
    assert_eq!(body["error"]["code"], "rate_limited");
    // larger than the limit itself: no point retrying
    let (status, body, retry) = post_batch(&http, KEY, "low", batch(10, 50)).await;
    assert_eq!((status, retry), (429, false), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("split it"), "{body}");
    // queued: the one high line and the first low batch's three, nothing refused
    let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
    let high = stream_len(&js, subjects::request_stream(Priority::High)).await;
    let low = stream_len(&js, subjects::request_stream(Priority::Low)).await;
    assert_eq!((high, low), (1, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_max_tokens_is_charged_its_models_default() {
    let s = setup(&config());
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    // `syn` answers 40 tokens when asked for none: 1 + 40 per call, so the
    // third call of 100 is refused (at the generic default of 10, nine would pass)
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let body = json!({"model": "syn", "prompt": "abcd"});
        statuses.push(http.send("POST", "/v1/infer/async", Some(KEY), Some(body)).await.status().as_u16());
    }
    assert_eq!(statuses, [202, 202, 429]);
    // echo has no default of its own: the configured 10
    let body = json!({"model": "echo", "prompt": "abcd"});
    assert_eq!(http.send("POST", "/v1/infer/async", Some(KEY), Some(body)).await.status(), 202);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_role_outside_the_templates_and_a_tenant_field_are_refused() {
    let s = setup(&config());
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    for role in ["u".repeat(300), "admin".into(), "user\u{3000}".into(), "User".into()] {
        let chat = json!({"model": "echo", "messages": [{"role": role, "content": "hi"}]});
        let (status, body) = http.json("POST", "/v1/chat/completions", Some(KEY), Some(chat)).await;
        assert_eq!(status, 422, "{role:?}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("system, user, assistant, tool"), "{body}");
        let native = json!({"model": "echo", "messages": [{"role": role, "content": "hi"}]});
        let (status, _) = http.json("POST", "/v1/infer/async", Some(KEY), Some(native)).await;
        assert_eq!(status, 422, "{role:?} on the native API");
    }
    let chat = json!({"model": "echo", "tenant": "globex", "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = http.json("POST", "/v1/chat/completions", Some(KEY), Some(chat)).await;
    assert_eq!((status, body["error"]["param"].as_str()), (422, Some("tenant")), "{body}");
}

/// OpenAI's `service_tier` chooses the class, through the official
/// `openai` client: a key may not ask above its ceiling (403 naming the
/// field), and a key that asks for nothing runs at its ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_tier_chooses_the_class_up_to_the_keys_ceiling() {
    let s = setup(&config());
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let script = format!(
        r#"
import sys, openai
def client(key):
    return openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key=key, max_retries=0)
def chat(c, **kw):
    return c.chat.completions.create(model="echo", messages=[{{"role": "user", "content": "hi"}}], max_tokens=1, **kw)
app, low = client("{KEY}"), client("{LOW_KEY}")
for tier in ["flex", "default", "auto", "priority"]:
    assert chat(app, service_tier=tier).choices[0].message.content, tier
# the low key: asking for nothing, or `auto`, runs at its ceiling
chat(low)
chat(low, service_tier="auto")
try:
    chat(low, service_tier="priority")
    raise SystemExit("expected PermissionDeniedError")
except openai.PermissionDeniedError as e:
    assert e.body["param"] == "service_tier" and "`low` at most" in e.body["message"], e.body
try:
    chat(app, service_tier="scale")
    raise SystemExit("expected UnprocessableEntityError")
except openai.UnprocessableEntityError as e:
    assert e.body["param"] == "service_tier" and "flex" in e.body["message"], e.body
print("service tiers ok")
"#
    );
    python(&script, &base, "service tiers ok", "the service tier script failed (`pip install openai`)");
    let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
    let mut published = Vec::new();
    for p in Priority::ALL {
        let mut stream = js.get_stream(subjects::request_stream(p)).await.unwrap();
        published.push(stream.info().await.unwrap().state.last_sequence);
    }
    // high: `priority`; normal: `default` and `auto`; low: `flex` and the low key's two
    assert_eq!(published, [1, 2, 3]);
}
