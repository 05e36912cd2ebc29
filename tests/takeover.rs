//! A generation survives its worker's death: kill -9 of the worker in the
//! middle of a generation, a second worker takes the request over from the
//! last checkpoint (KV `fleet_checkpoints`), and what a streaming caller
//! read is exactly the stored result. Real processes, a real nats-server,
//! the tiny model (made larger here so a generation lasts long enough to be
//! interrupted).

#![cfg(feature = "mistralrs")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use retro_fleet_schemas::{subjects, InferResult};
use retro_fleet_worker::backend::Checkpoint;
use serde_json::{json, Value};

/// A setup serving `slow`: the tiny Llama with wider layers, a few hundred
/// tokens a second on a shared core; checkpoints every 200 ms.
fn slow_setup() -> Setup {
    let model = tempfile::tempdir().unwrap().keep();
    let sizes = retro_fleet_worker::tiny_model::Tiny { hidden: 256, inter: 512, layers: 4, ..Default::default() };
    retro_fleet_worker::tiny_model::write(&model, &sizes).unwrap();
    setup(&format!(
        "checkpoint_interval_ms = 200\n[models.slow]\nbackend = \"mistralrs\"\npath = \"{}\"\ndefault_max_tokens = 16\n",
        model.display()
    ))
}

/// The events of an SSE response, as `(event, data)`, read as they come.
struct Events {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Events {
    async fn open(url: &str, id: &str, body: &Value) -> Events {
        let r = reqwest::Client::new().post(url).header("x-request-id", id).json(body).send().await.unwrap();
        assert_eq!(r.status(), 200, "{:?}", r.headers());
        Events { body: r.bytes_stream().boxed(), buf: String::new() }
    }

    async fn next(&mut self) -> Option<(String, String)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let event = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("message").to_string();
                let data = block.lines().filter_map(|l| l.strip_prefix("data: ")).collect::<Vec<_>>().join("\n");
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return Some((event, data));
            }
            let bytes = tokio::time::timeout(Duration::from_secs(60), self.body.next()).await.ok()??.ok()?;
            self.buf.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
}

/// What a native SSE caller read: the chunks' text, their seqs, the result.
struct Read {
    text: String,
    seqs: Vec<u64>,
    result: Value,
}

/// Streams `body` with request id `id` from `path` (`/v1/infer`, or the
/// OpenAI `/v1/chat/completions`) on `first`; at the first chunk starts a
/// second worker, after `kill_at` bytes of text and the request's first
/// checkpoint kills `first` (kill -9), and notes how long until the next
/// text arrives. (Waiting for the checkpoint: on a fast machine `kill_at`
/// bytes come before the first checkpoint interval has passed.)
async fn stream_with_kill(
    s: &Setup,
    (base, path): (&str, &str),
    id: &str,
    body: &Value,
    kill_at: usize,
    first: &mut Proc,
) -> (Read, Duration, Proc) {
    let kv = checkpoints(s).await;
    let key = format!("{}.{id}", subjects::DEFAULT_TENANT);
    let mut events = Events::open(&format!("{base}{path}"), id, body).await;
    let (mut text, mut seqs) = (String::new(), Vec::new());
    let (mut killed, mut takeover) = (None::<Instant>, None);
    let mut second: Option<tokio::task::JoinHandle<Proc>> = None;
    while let Some((event, data)) = events.next().await {
        let v: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        // native: `chunk` events, then `result` (or `error`); OpenAI: data
        // events with `choices[0].delta`, then `[DONE]` (an error before it)
        let delta = match (event.as_str(), v["choices"][0]["delta"]["content"].as_str()) {
            ("chunk", _) => {
                seqs.push(v["seq"].as_u64().unwrap());
                v["delta"].as_str().unwrap().to_string()
            }
            ("message", Some(d)) => d.to_string(),
            ("message", None) if data != "[DONE]" && v["error"].is_null() => continue, // role or finish_reason only
            _ => {
                let second = second.expect("a second worker").await.unwrap();
                let read = Read { text, seqs, result: v };
                return (read, takeover.expect("text after the kill"), second);
            }
        };
        text.push_str(&delta);
        if second.is_none() {
            let config = s.config.clone();
            second = Some(tokio::spawn(async move { worker(&config).await.0 }));
        }
        if let (Some(at), None, false) = (killed, takeover, delta.is_empty()) {
            takeover = Some(at.elapsed());
        }
        if killed.is_none() && text.len() >= kill_at && kv.get(&key).await.ok().flatten().is_some() {
            first.kill9();
            killed = Some(Instant::now());
        }
    }
    panic!("the stream ended without a result; read {} bytes", text.len());
}

async fn stored(s: &Setup, id: &str) -> InferResult {
    let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
    stored_result(&js, subjects::DEFAULT_TENANT, id).await.expect("a stored result")
}

async fn checkpoints(s: &Setup) -> async_nats::jetstream::kv::Store {
    let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
    js.get_key_value(subjects::CHECKPOINTS_BUCKET).await.unwrap()
}

async fn keys(kv: &async_nats::jetstream::kv::Store) -> Vec<String> {
    let mut keys: Vec<String> = kv.keys().await.unwrap().filter_map(|k| async { k.ok() }).collect().await;
    keys.sort();
    keys
}

/// Waits until `kv` holds no checkpoint: a request's is removed as it is
/// settled, after its result is stored, replied and metered, so a caller
/// may see the result a moment before.
async fn until_no_checkpoints(kv: &async_nats::jetstream::kv::Store, what: &str) {
    let start = Instant::now();
    loop {
        let left = keys(kv).await;
        if left.is_empty() {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{what}: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_kill9_of_its_worker_with_nothing_repeated() {
    let s = slow_setup();
    let (_ingress, base) = start_ingress(&s.config).await;
    let (mut first, _) = worker(&s.config).await;
    let mut reference = None;
    // greedy over the native API, sampled over the OpenAI API
    for (case, temperature) in [("greedy", 0.0), ("sampled", 1.0)] {
        let id = format!("kill-{case}");
        let (path, body) = match case {
            "greedy" => (
                "/v1/infer",
                json!({"model": "slow", "prompt": "once upon a time", "stream": true,
                "cache": "bypass", "params": {"max_tokens": 1000, "temperature": temperature}}),
            ),
            _ => (
                "/v1/chat/completions",
                json!({"model": "slow", "stream": true, "max_tokens": 1000,
                "temperature": temperature, "messages": [{"role": "user", "content": "once upon a time"}]}),
            ),
        };
        let (read, takeover, second) = stream_with_kill(&s, (&base, path), &id, &body, 200, &mut first).await;
        let result = stored(&s, &id).await;
        assert_eq!(result.status, retro_fleet_schemas::Status::Ok, "{result:?}");
        let stored_text = result.output.as_ref().unwrap().text.clone();
        assert_eq!(read.text, stored_text, "{case}: the caller read exactly the stored result");
        if case == "greedy" {
            assert_eq!(read.result["output"]["text"], stored_text.as_str());
            let seqs = (0..read.seqs.len() as u64).collect::<Vec<_>>();
            assert_eq!(read.seqs, seqs, "{case}: no seq repeated or missing");
        } else {
            assert_eq!(read.result, Value::Null, "[DONE] ends the OpenAI stream, with no error before it");
        }
        assert_eq!(result.usage.unwrap().completion_tokens, 1000, "{case}");
        assert!(
            second.log().contains("resuming from a checkpoint"),
            "{case}: the second worker resumed:\n{}",
            second.log()
        );
        println!("{case}: kill -9 to the next text the caller read: {takeover:?}");
        if temperature == 0.0 {
            reference = Some(stored_text);
        }
        first = second; // the next case kills this one
    }
    // the greedy answer equals an uninterrupted run of the same request
    let body = json!({"id": "uninterrupted", "model": "slow", "prompt": "once upon a time", "cache": "bypass",
        "params": {"max_tokens": 1000, "temperature": 0.0}});
    let (status, v) = post_json(&format!("{base}/v1/infer"), &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["output"]["text"].as_str(), reference.as_deref(), "resumed greedy text = uninterrupted run");
    assert_eq!(keys(&checkpoints(&s).await).await, Vec::<String>::new(), "no checkpoint left once results are stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_generation_is_not_computed_again_and_its_answer_is_the_same() {
    let s = slow_setup();
    let (_ingress, base) = start_ingress(&s.config).await;
    let kv = checkpoints(&s).await;
    let (mut first, _) = worker(&s.config).await;
    let body = json!({"id": "long", "model": "slow", "prompt": "a long story", "cache": "bypass",
        "params": {"max_tokens": 1500, "temperature": 0.0}});
    let (status, v) = post_json(&format!("{base}/v1/infer/async"), &body).await;
    assert_eq!(status, 202, "{v}");
    // kill once a checkpoint holds a fifth of the answer
    let key = format!("{}.long", subjects::DEFAULT_TENANT);
    let start = Instant::now();
    let at_kill = loop {
        if let Some(b) = kv.get(&key).await.unwrap() {
            let c: Checkpoint = retro_fleet_schemas::codec::decode(None, &b).unwrap();
            if c.generated.len() >= 300 {
                first.kill9();
                break c.generated.len();
            }
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint of 300 tokens:\n{}", first.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // the last checkpoint the first worker wrote
    let last: Checkpoint = retro_fleet_schemas::codec::decode(None, &kv.get(&key).await.unwrap().unwrap()).unwrap();
    let (second, port) = worker(&s.config).await;
    let result = loop {
        let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
        if let Some(r) = stored_result(&js, subjects::DEFAULT_TENANT, "long").await {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no result:\n{}", second.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(result.usage.unwrap().completion_tokens, 1500);
    let (_, metrics) = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    let after = metric(&metrics, "fleet_worker_generated_tokens_total") as usize;
    // the first worker computed the checkpoint's tokens and at most one
    // interval more (it would have written another checkpoint)
    let n = last.generated.len();
    assert_eq!(after, 1500 - (n - 1), "the second worker computed only what the checkpoint lacked");
    let computed = n + after;
    println!("checkpoint at kill {at_kill}, last {n}; computed {computed} tokens for 1500 (+ the first worker's tokens after its last checkpoint)");
    assert!((computed as f64) < 1.2 * 1500.0, "{computed}");
    // the same answer as an uninterrupted run
    let again = json!({"id": "again", "model": "slow", "prompt": "a long story", "cache": "bypass",
        "params": {"max_tokens": 1500, "temperature": 0.0}});
    let (status, v) = post_json(&format!("{base}/v1/infer"), &again).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["output"]["text"].as_str(), Some(result.output.unwrap().text.as_str()));
    until_no_checkpoints(&kv, "no checkpoint left").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_generation_leaves_no_checkpoint() {
    let s = slow_setup();
    let (_ingress, base) = start_ingress(&s.config).await;
    let kv = checkpoints(&s).await;
    let _w = worker(&s.config).await;
    let body = json!({"id": "gone", "model": "slow", "prompt": "x", "cache": "bypass", "params": {"max_tokens": 1800}});
    let (status, _) = post_json(&format!("{base}/v1/infer/async"), &body).await;
    assert_eq!(status, 202);
    let start = Instant::now();
    while keys(&kv).await.is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = async_nats::connect(s.nats.url()).await.unwrap();
    client.publish(subjects::cancel(subjects::DEFAULT_TENANT, "gone"), bytes::Bytes::new()).await.unwrap();
    client.flush().await.unwrap();
    let result = loop {
        if let Some(r) =
            stored_result(&async_nats::jetstream::new(client.clone()), subjects::DEFAULT_TENANT, "gone").await
        {
            break r;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no result");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(result.error.unwrap().code, retro_fleet_schemas::ErrorCode::Cancelled);
    until_no_checkpoints(&kv, "the cancelled request's checkpoint is removed").await;
}

/// Benchmark, not a test (`cargo nextest run --workspace --run-ignored only
/// -E 'test(bench_kill_to_next_text)' --no-capture`): with the default
/// `ack_wait` and checkpoint interval, the time from kill -9 of the worker
/// streaming an answer to the next text its caller reads, over 10 kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_kill_to_next_text() {
    let model = tempfile::tempdir().unwrap().keep();
    let sizes = retro_fleet_worker::tiny_model::Tiny { hidden: 256, inter: 512, layers: 4, ..Default::default() };
    retro_fleet_worker::tiny_model::write(&model, &sizes).unwrap();
    let s = setup(&format!("[models.slow]\nbackend = \"mistralrs\"\npath = \"{}\"\n", model.display()));
    // the defaults: drop the tests' short ack_wait and apply the topology again
    let text = std::fs::read_to_string(&s.config).unwrap().replace("ack_wait_secs = 2\n", "");
    std::fs::write(&s.config, text).unwrap();
    topology_apply(&s.config);
    let (_ingress, base) = start_ingress(&s.config).await;
    let (mut first, _) = worker(&s.config).await;
    let mut took = Vec::new();
    for k in 0..10 {
        let body = json!({"model": "slow", "prompt": "once upon a time", "stream": true,
            "cache": "bypass", "params": {"max_tokens": 800, "temperature": 0.0}});
        let id = format!("bench{k}");
        let (read, takeover, second) = stream_with_kill(&s, (&base, "/v1/infer"), &id, &body, 100, &mut first).await;
        assert_eq!(read.text, read.result["output"]["text"].as_str().unwrap());
        println!("kill {k}: {takeover:?}");
        took.push(takeover);
        first = second;
    }
    took.sort();
    println!("kill -9 to next text, 10 kills: p50 {:?}, max {:?}", took[4], took[9]);
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); 100 ticks a second on Linux
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// The pid of the nats-server listening on `port`.
fn server_pid(port: u16) -> String {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains("nats-server") && cmd.contains(&format!(" {port} "))
        })
        .expect("the nats-server process")
}

/// Benchmark, not a test (`cargo nextest run --workspace --run-ignored only
/// -E 'test(bench_progress_ack_cost)' --no-capture`): what one in-progress
/// ack costs the worker and the server, from 20,000 acks of a held message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_progress_ack_cost() {
    use async_nats::jetstream::{self, consumer, AckKind};
    let nats = NatsServer::start();
    let port: u16 = nats.url().rsplit(':').next().unwrap().parse().unwrap();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(jetstream::stream::Config { name: "S".into(), subjects: vec!["s".into()], ..Default::default() })
        .await
        .unwrap();
    js.publish("s", "x".into()).await.unwrap().await.unwrap();
    let c = stream
        .create_consumer(consumer::pull::Config { durable_name: Some("c".into()), ..Default::default() })
        .await
        .unwrap();
    let msg = c.fetch().max_messages(1).messages().await.unwrap().next().await.unwrap().unwrap();
    let (me, server) = ("self".to_string(), server_pid(port));
    let n = 20_000;
    let (cpu0, srv0, t0) = (cpu_secs(&me), cpu_secs(&server), Instant::now());
    for _ in 0..n {
        msg.ack_with(AckKind::Progress).await.unwrap();
    }
    client.flush().await.unwrap();
    let (cpu, srv, took) = (cpu_secs(&me) - cpu0, cpu_secs(&server) - srv0, t0.elapsed());
    println!(
        "{n} progress acks in {took:?}: client {:.1} µs CPU each, nats-server {:.1} µs CPU each",
        cpu / n as f64 * 1e6,
        srv / n as f64 * 1e6
    );
}
