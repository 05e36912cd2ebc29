//! Real models end to end: the tiny generated Llama run by mistral.rs in a
//! worker process, reached over NATS, the native HTTP API and the
//! OpenAI-compatible API (with the official `openai` Python client).

#![cfg(feature = "mistralrs")]

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use retro_fleet_schemas::{
    codec, headers, subjects, ChatMessage, Input, Priority, SamplingParams, Status, StreamChunk,
};

fn model_config(dir: &std::path::Path) -> String {
    let model = dir.join("tiny");
    retro_fleet_worker::tiny_model::write(&model, &Default::default()).unwrap();
    format!("[models.tiny]\nbackend = \"mistralrs\"\npath = \"{}\"\ndefault_max_tokens = 16\n", model.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completion_over_nats_and_http() {
    let models = tempfile::tempdir().unwrap();
    let s = setup(&model_config(models.path()));
    let (nats, config) = (&s.nats, &s.config);
    let _worker = start_worker(config, &[]).await;
    let (_ingress, base) = start_ingress(config).await;

    // over NATS: completion and chat, max_tokens honoured
    let mut caller = Caller::connect(&nats.url()).await;
    let mut completion = request("c1", "tiny", "once upon a time");
    completion.params = SamplingParams { max_tokens: Some(7), temperature: Some(0.0), ..Default::default() };
    caller.publish(Priority::High, &completion).await;
    let mut chat = request("c2", "tiny", "");
    chat.input = Input::Chat { messages: vec![ChatMessage::text("user", "hello")] };
    chat.params = SamplingParams { max_tokens: Some(5), temperature: Some(0.0), ..Default::default() };
    caller.publish(Priority::Normal, &chat).await;
    let (results, _) = caller.collect(2, Duration::from_secs(60)).await;
    assert_eq!(results.len(), 2);
    for (id, r) in &results {
        assert_eq!(r.status, Status::Ok, "{r:?}");
        let want = if id == "c1" { 7 } else { 5 };
        assert_eq!(r.usage.as_ref().unwrap().completion_tokens, want);
        assert!(r.model_revision.as_deref().unwrap().starts_with("fnv1a64:"));
    }

    // native HTTP: same seed, same text
    let http = reqwest::Client::new();
    // (bypassing the cache, so the model really computes both)
    let body = serde_json::json!({"model": "tiny", "prompt": "seeded", "cache": "bypass",
        "params": {"max_tokens": 12, "temperature": 0.9, "seed": 42}});
    let a: serde_json::Value =
        http.post(format!("{base}/v1/infer")).json(&body).send().await.unwrap().json().await.unwrap();
    let b: serde_json::Value =
        http.post(format!("{base}/v1/infer")).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(a["output"]["text"], b["output"]["text"], "{a} {b}");
    assert_eq!((a["cache"].as_str(), b["cache"].as_str()), (Some("none"), Some("none")));
    assert_eq!(a["usage"]["completion_tokens"], 12);

    // OpenAI shape
    let body = serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0});
    let (_, chat) = post_json(&format!("{base}/v1/chat/completions"), &body).await;
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["role"], "assistant");
    assert_eq!(chat["choices"][0]["finish_reason"], "length");
    assert_eq!(chat["usage"]["completion_tokens"], 4);
    let listed: serde_json::Value = reqwest::get(format!("{base}/v1/models")).await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = listed["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny"]);
    let bad = http
        .post(format!("{base}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 404);
    let err: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(err["error"]["type"], "not_found_error");
    assert!(err["error"]["message"].as_str().unwrap().contains("nope"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_chunks_arrive_in_order_and_add_up_to_the_result() {
    let models = tempfile::tempdir().unwrap();
    let s = setup(&model_config(models.path()));
    let (nats, config) = (&s.nats, &s.config);
    let _worker = start_worker(config, &[]).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    let mut req = request("s1", "tiny", "stream me");
    req.stream = true;
    req.params = SamplingParams { max_tokens: Some(24), temperature: Some(0.0), ..Default::default() };
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, "s1");
    h.insert(headers::REPLY, inbox.as_str());
    js.publish_with_headers("fleet.req.normal.tiny", h, codec::encode(&req).into()).await.unwrap().await.unwrap();
    let mut chunks = Vec::new();
    let result = loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), sub.next()).await.unwrap().unwrap();
        match msg.headers.as_ref().unwrap().get(headers::KIND).unwrap().as_str() {
            headers::KIND_CHUNK => chunks.push(codec::decode::<StreamChunk>(None, &msg.payload).unwrap()),
            _ => break codec::decode::<retro_fleet_schemas::InferResult>(None, &msg.payload).unwrap(),
        }
    };
    assert!(chunks.len() > 2, "several chunks: {}", chunks.len());
    assert_eq!(chunks.iter().map(|c| c.seq).collect::<Vec<_>>(), (0..chunks.len() as u64).collect::<Vec<_>>());
    assert!(chunks.last().unwrap().done && chunks[..chunks.len() - 1].iter().all(|c| !c.done));
    let text: String = chunks.iter().map(|c| c.delta.as_str()).collect();
    assert_eq!(text, result.output.unwrap().text);
}

/// The official `openai` Python client, unchanged, against the ingress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works_unchanged() {
    let models = tempfile::tempdir().unwrap();
    let s = setup(&model_config(models.path()));
    let config = &s.config;
    let _worker = start_worker(config, &[]).await;
    let (_ingress, base) = start_ingress(config).await;
    let script = r#"
import sys, openai
# bypass the result cache: every call below really runs the model
c = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0, default_headers={"X-Cache": "bypass"})
assert [m.id for m in c.models.list()] == ["tiny"]
r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0)
assert r.choices[0].finish_reason == "length", r
assert r.usage.completion_tokens == 6, r.usage
text = r.choices[0].message.content
parts = []
for chunk in c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
assert "".join(parts) == text, (parts, text)
r = c.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0)
assert r.usage.completion_tokens == 3 and r.choices[0].text, r
s = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="abc", max_tokens=3, temperature=0, stream=True) if ch.choices)
assert s == r.choices[0].text, (s, r.choices[0].text)
try:
    c.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert "missing" in str(e), e
print("openai client ok")
"#;
    python(
        script,
        &base,
        "openai client ok",
        "openai client failed (install it with `pip install openai`, which `make test` does)",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_adapters_change_the_output_and_results_say_which_ran() {
    let models = tempfile::tempdir().unwrap();
    let tiny = Default::default();
    let lora = models.path().join("pirate");
    retro_fleet_worker::lora::write_tiny_adapter(&lora, &tiny, 4, 1).unwrap();
    let extra = format!("{}adapters = {{ pirate = \"{}\" }}\n", model_config(models.path()), lora.display());
    let s = setup(&extra);
    let _worker = start_worker(&s.config, &[]).await;
    let mut caller = Caller::connect(&s.nats.url()).await;
    let greedy = SamplingParams { max_tokens: Some(12), temperature: Some(0.0), ..Default::default() };
    let mut plain = request("l1", "tiny", "the same prompt");
    plain.params = greedy.clone();
    let mut adapted = plain.clone();
    adapted.id = "l2".into();
    adapted.adapter = Some("pirate".into());
    let mut missing = plain.clone();
    missing.id = "l3".into();
    missing.adapter = Some("ninja".into());
    for r in [&plain, &adapted, &missing] {
        caller.publish(Priority::Normal, r).await;
    }
    let (results, _) = caller.collect(3, Duration::from_secs(60)).await;
    let by_id: std::collections::HashMap<_, _> = results.into_iter().collect();
    let (p, a, m) = (&by_id["l1"], &by_id["l2"], &by_id["l3"]);
    assert_eq!((p.status, a.status), (Status::Ok, Status::Ok), "{p:?} {a:?}");
    assert_eq!(p.adapter, None);
    assert_eq!(a.adapter.as_deref(), Some("pirate"));
    assert_ne!(p.output.as_ref().unwrap().text, a.output.as_ref().unwrap().text, "the adapter changes the weights");
    assert_eq!(a.usage.as_ref().unwrap().completion_tokens, 12);
    assert_ne!(p.model_revision, None);
    assert_eq!(m.status, Status::Error);
    let err = m.error.as_ref().unwrap();
    assert!(err.message.contains("no adapter `ninja`; adapters: pirate"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_ids_load_from_the_local_cache_and_offline_misses_say_what_to_do() {
    // a Hugging Face cache holding `acme/tiny` at revision main
    let hf = tempfile::tempdir().unwrap();
    let repo = hf.path().join("models--acme--tiny");
    let snap = repo.join("snapshots").join("0123456789abcdef0123456789abcdef01234567");
    retro_fleet_worker::tiny_model::write(&snap, &Default::default()).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef0123456789abcdef01234567").unwrap();
    let env = |port: u16| {
        vec![
            ("FLEET_METRICS_LISTEN", format!("127.0.0.1:{port}")),
            ("HF_HUB_CACHE", hf.path().display().to_string()),
            ("HF_HUB_OFFLINE", "1".to_string()),
        ]
    };

    let s = setup("[models.tiny]\nbackend = \"mistralrs\"\npath = \"acme/tiny\"\n");
    let mut w = Proc::start(&s.config, &["worker"], &env(free_port()));
    wait_log(&mut w, "worker pulling").await;
    let mut caller = Caller::connect(&s.nats.url()).await;
    let mut r = request("h1", "tiny", "from the cache");
    r.params = SamplingParams { max_tokens: Some(3), temperature: Some(0.0), ..Default::default() };
    caller.publish(Priority::Normal, &r).await;
    let (got, _) = caller.collect(1, Duration::from_secs(60)).await;
    assert_eq!(got[0].1.status, Status::Ok, "{:?}", got[0].1);
    assert!(got[0].1.model_revision.as_deref().unwrap().starts_with("fnv1a64:"));

    let s = setup("[models.other]\nbackend = \"mistralrs\"\npath = \"acme/not-cached\"\n");
    let mut w = Proc::start(&s.config, &["worker"], &env(free_port()));
    wait_log(&mut w, "worker pulling").await;
    let mut caller = Caller::connect(&s.nats.url()).await;
    caller.publish(Priority::Normal, &request("h2", "other", "x")).await;
    let (got, _) = caller.collect(1, Duration::from_secs(60)).await;
    let err = got[0].1.error.as_ref().expect("an error result");
    assert!(err.message.contains("is not in the Hugging Face cache"), "{}", err.message);
    assert!(err.message.contains("HF_HUB_OFFLINE is set"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_serve_two_models_unload_when_idle_and_a_broken_model_answers_why() {
    let models = tempfile::tempdir().unwrap();
    let base = model_config(models.path());
    let tiny = models.path().join("tiny");
    let extra = format!(
        "{base}\n[models.idle]\nbackend = \"mistralrs\"\npath = \"{}\"\nidle_unload_secs = 1\n\
         [models.broken]\nbackend = \"mistralrs\"\npath = \"{}\"\n",
        tiny.display(),
        models.path().join("missing").display()
    );
    let s = setup(&extra);
    let w = start_worker(&s.config, &[]).await;
    let mut caller = Caller::connect(&s.nats.url()).await;
    let ask = |id: &str, model: &str| {
        let mut r = request(id, model, "pooled");
        r.params = SamplingParams { max_tokens: Some(4), temperature: Some(0.0), ..Default::default() };
        r.cache = retro_fleet_schemas::CacheMode::Bypass;
        r
    };
    for (id, m) in [("a1", "tiny"), ("b1", "idle"), ("x1", "broken")] {
        caller.publish(Priority::Normal, &ask(id, m)).await;
    }
    let (got, _) = caller.collect(3, Duration::from_secs(60)).await;
    let by: std::collections::HashMap<_, _> = got.into_iter().collect();
    assert_eq!((by["a1"].status, by["b1"].status), (Status::Ok, Status::Ok));
    let err = by["x1"].error.as_ref().expect("the broken model answers with an error");
    assert!(
        err.message.contains("model `broken` could not be loaded") && err.message.contains("does not exist"),
        "{}",
        err.message
    );

    // the idle model's instance is unloaded (again, after serving b1), then
    // loaded again on demand
    let unloads = w.log().matches("unloaded an idle instance").count();
    let start = std::time::Instant::now();
    while w.log().matches("unloaded an idle instance").count() <= unloads {
        assert!(start.elapsed() < Duration::from_secs(30), "no idle unload:\n{}", w.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let loads_before = w.log().matches("model instance loaded").count();
    caller.publish(Priority::Normal, &ask("b2", "idle")).await;
    let (got, _) = caller.collect(1, Duration::from_secs(60)).await;
    assert_eq!(got[0].1.status, Status::Ok, "{:?}", got[0].1);
    assert!(w.log().matches("model instance loaded").count() > loads_before, "reloaded on demand:\n{}", w.log());

    // 200 concurrent requests, none lost
    for i in 0..200 {
        caller.publish(Priority::Normal, &ask(&format!("c{i}"), "tiny")).await;
    }
    let (got, dups) = caller.collect(200, Duration::from_secs(120)).await;
    assert_eq!((got.len(), dups), (200, 0));
    assert!(got.iter().all(|(_, r)| r.status == Status::Ok));
}

/// Whether `text` shows a program's internals (a source location, a backtrace).
fn shows_internals(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains(".rs:") || t.contains("backtrace") || t.contains("panicked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_model_cannot_serve_are_answered_at_once_and_never_retried() {
    let models = tempfile::tempdir().unwrap();
    let s = setup(&model_config(models.path()));
    let (_worker, port) = worker(&s.config).await;
    let (_ingress, base) = start_ingress(&s.config).await;

    // past the context: a 400 with both numbers, nothing computed
    let body =
        serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000});
    let (status, v) = post_json(&format!("{base}/v1/chat/completions"), &body).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("2048") && message.contains("5000"), "{message}");
    let (_, metrics) = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(metric(&metrics, "fleet_worker_generated_tokens_total"), 0.0, "no model call");

    // a request the engine itself refuses (an empty prompt, sent over NATS
    // past the ingress): one attempt, an error result, a dead letter
    let mut caller = Caller::connect(&s.nats.url()).await;
    caller.publish(Priority::Normal, &request("empty", "tiny", "")).await;
    let (results, _) = caller.collect(1, Duration::from_secs(30)).await;
    let error = results[0].1.error.clone().expect("an error result");
    assert_eq!(error.code, retro_fleet_schemas::ErrorCode::InvalidRequest, "{error:?}");
    assert!(!shows_internals(&error.message) && !error.message.contains("mistral"), "{}", error.message);
    let (_, metrics) = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(metric(&metrics, "fleet_worker_naks_total"), 0.0, "not retried");
    assert_eq!(stream_len(&caller.js, subjects::DLQ_STREAM).await, 2, "both dead-lettered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reply_shows_internals_whatever_the_prompt_length_max_tokens_and_stops() {
    let models = tempfile::tempdir().unwrap();
    let s = setup(&model_config(models.path()));
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = reqwest::Client::new();
    let mut seen = Vec::new();
    let mut k = 0u64;
    for len in [0usize, 1, 300, 2040, 2100, 9000] {
        for max_tokens in [None, Some(1), Some(9), Some(2040), Some(5000)] {
            for stop in [vec![], vec!["e".to_string()], vec!["\n".to_string(), "zz".to_string()]] {
                k += 1;
                let prompt = "ab cd ".repeat(len / 6 + 1)[..len].to_string();
                let stream = k % 2 == 0;
                let (url, body) = if k % 3 == 0 {
                    let mut b = serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                        "stop": stop, "stream": stream});
                    if let Some(m) = max_tokens {
                        b["max_tokens"] = m.into();
                    }
                    (format!("{base}/v1/chat/completions"), b)
                } else {
                    let mut b = serde_json::json!({"id": format!("p{k}"), "model": "tiny", "prompt": prompt,
                        "stream": stream, "params": {"stop": stop}});
                    if let Some(m) = max_tokens {
                        b["params"]["max_tokens"] = m.into();
                    }
                    (format!("{base}/v1/infer"), b)
                };
                let r = http.post(&url).json(&body).send().await.unwrap();
                let status = r.status().as_u16();
                let text = r.text().await.unwrap();
                assert!(!shows_internals(&text), "{url} {len} {max_tokens:?} {stop:?}: {status} {text}");
                seen.push(status);
            }
        }
    }
    // every stored result too
    let js = async_nats::jetstream::new(async_nats::connect(s.nats.url()).await.unwrap());
    let mut stream = js.get_stream(subjects::RESULTS_STREAM).await.unwrap();
    let n = stream.info().await.unwrap().state.messages;
    for seq in 1..=n {
        if let Ok(m) = stream.get_raw_message(seq).await {
            let r: retro_fleet_schemas::InferResult = codec::decode(None, &m.payload).unwrap();
            assert!(!shows_internals(&format!("{r:?}")), "{r:?}");
        }
    }
    assert!(seen.contains(&200) && seen.contains(&400), "answers and refusals both seen: {seen:?}");
}
