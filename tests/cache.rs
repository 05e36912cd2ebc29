//! The result cache through real processes: tiers, modes, tenants, TTL,
//! coalescing, restart, purge, warming and the semantic cache.

mod common;

use std::process::Command;
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use common::*;
use retro_fleet_schemas::{
    codec, headers, subjects, CacheMode, CacheTier, ChatMessage, InferRequest, InferResult, Input, Priority,
    SamplingParams, Status,
};

const WAIT: Duration = Duration::from_secs(20);

fn greedy(id: &str, model: &str, prompt: &str) -> InferRequest {
    let mut r = request(id, model, prompt);
    r.params = SamplingParams { temperature: Some(0.0), ..Default::default() };
    r
}

/// Publishes `req` (with extra headers) and waits for its result.
async fn ask_with(caller: &mut Caller, req: &InferRequest, mut h: HeaderMap) -> InferResult {
    h.insert(headers::MSG_ID, req.id.as_str());
    let subject = subjects::request(Priority::Normal, &req.model);
    caller.publish_raw(&subject, &req.id, h, Bytes::from(codec::encode(req))).await;
    let (got, dups) = caller.collect(1, WAIT).await;
    assert_eq!(dups, 0);
    let (id, r) = got.into_iter().next().unwrap_or_else(|| panic!("no result for {}", req.id));
    assert_eq!(id, req.id);
    assert_eq!(r.status, Status::Ok, "{r:?}");
    r
}

async fn ask(caller: &mut Caller, req: &InferRequest) -> InferResult {
    ask_with(caller, req, HeaderMap::new()).await
}

fn cli(config: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_retro-fleet"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "retro-fleet {args:?} failed: {text}");
    text
}

#[tokio::test]
async fn tiers_modes_tenants_and_ttl() {
    let s = setup("");
    let _w = start_worker(&s.config, &[]).await;
    let mut c = Caller::connect(&s.nats.url()).await;

    let first = ask(&mut c, &greedy("a1", "echo", "hello cache")).await;
    assert_eq!(first.cache, CacheTier::None);
    let again = ask(&mut c, &greedy("a2", "echo", "hello cache")).await;
    assert_eq!(again.cache, CacheTier::Memory);
    assert_eq!(again.output, first.output);
    assert_eq!(again.timings.compute_ms, 0.0);

    // another tenant never sees tenant default's answer
    let mut other = greedy("a3", "echo", "hello cache");
    other.tenant = Some("acme".into());
    assert_eq!(ask(&mut c, &other).await.cache, CacheTier::None);
    other.id = "a4".into();
    assert_eq!(ask(&mut c, &other).await.cache, CacheTier::Memory, "acme has its own entry now");

    // sampling without a seed is not reproducible: never cached
    let mut hot = request("b1", "echo", "hot");
    hot.params.temperature = Some(0.8);
    assert_eq!(ask(&mut c, &hot).await.cache, CacheTier::None);
    hot.id = "b2".into();
    assert_eq!(ask(&mut c, &hot).await.cache, CacheTier::None);
    // ... but a seed makes it so
    hot.params.seed = Some(7);
    hot.id = "b3".into();
    assert_eq!(ask(&mut c, &hot).await.cache, CacheTier::None);
    hot.id = "b4".into();
    assert_eq!(ask(&mut c, &hot).await.cache, CacheTier::Memory);

    // bypass neither reads nor writes; refresh recomputes and overwrites
    let mut by = greedy("c1", "echo", "hello cache");
    by.cache = CacheMode::Bypass;
    assert_eq!(ask(&mut c, &by).await.cache, CacheTier::None);
    let mut fresh = greedy("c2", "echo", "bypassed only");
    fresh.cache = CacheMode::Bypass;
    ask(&mut c, &fresh).await;
    fresh.cache = CacheMode::Use;
    fresh.id = "c3".into();
    assert_eq!(ask(&mut c, &fresh).await.cache, CacheTier::None, "bypass wrote nothing");
    let mut refresh = greedy("c4", "echo", "hello cache");
    refresh.cache = CacheMode::Refresh;
    assert_eq!(ask(&mut c, &refresh).await.cache, CacheTier::None);
    assert_eq!(ask(&mut c, &greedy("c5", "echo", "hello cache")).await.cache, CacheTier::Memory);

    // a per-request TTL: served while fresh, never once expired
    let mut ttl = HeaderMap::new();
    ttl.insert(headers::CACHE_TTL, "1");
    assert_eq!(ask_with(&mut c, &greedy("d1", "echo", "short-lived"), ttl.clone()).await.cache, CacheTier::None);
    assert_eq!(ask_with(&mut c, &greedy("d2", "echo", "short-lived"), ttl.clone()).await.cache, CacheTier::Memory);
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(ask(&mut c, &greedy("d3", "echo", "short-lived")).await.cache, CacheTier::None, "expired");

    // stored results carry the key that warms caches later
    let stream = c.js.get_stream(subjects::RESULTS_STREAM).await.unwrap();
    let stored = stream.direct_get_last_for_subject(subjects::result("default", "a1")).await.unwrap();
    assert_eq!(stored.headers.get(headers::CACHE_KEY).map(|v| v.as_str().len()), Some(32));
    let hot_stored = stream.direct_get_last_for_subject(subjects::result("default", "b1")).await.unwrap();
    assert!(hot_stored.headers.get(headers::CACHE_KEY).is_none());
}

#[tokio::test]
async fn a_hundred_identical_requests_make_one_model_call() {
    let s = setup("[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 400\n");
    let _w = start_worker(&s.config, &["--models", "slow"]).await;
    let mut c = Caller::connect(&s.nats.url()).await;
    for i in 0..100 {
        c.publish(Priority::Normal, &greedy(&format!("same{i}"), "slow", "the same question")).await;
    }
    let (got, dups) = c.collect(100, WAIT).await;
    assert_eq!((got.len(), dups), (100, 0));
    let computed = got.iter().filter(|(_, r)| r.cache == CacheTier::None).count();
    let shared = got.iter().filter(|(_, r)| matches!(r.cache, CacheTier::Coalesced | CacheTier::Memory)).count();
    println!("computed {computed}, coalesced or cached {shared}");
    assert_eq!(computed, 1, "one model call for 100 identical requests");
    assert_eq!(shared, 99);
    let text = &got[0].1.output.as_ref().unwrap().text;
    assert!(got.iter().all(|(_, r)| &r.output.as_ref().unwrap().text == text));
}

#[tokio::test]
async fn identical_requests_on_two_workers_are_computed_once_with_claims() {
    let s = setup(
        "max_inflight = 4\nbatch_size = 4\n[worker.cache]\ncoalesce_across_workers = true\nclaim_wait_ms = 10000\n\
         [models.slow]\nbackend = \"synthetic\"\nlatency_ms = 600\n",
    );
    let dir2 = s.dir.path().join("w2-cache");
    let _a = start_worker(&s.config, &["--models", "slow"]).await;
    let _b = {
        let port = free_port();
        let mut p = Proc::start(
            &s.config,
            &["worker", "--models", "slow", "--id", "second"],
            &[
                ("FLEET_METRICS_LISTEN", format!("127.0.0.1:{port}")),
                ("FLEET_WORKER__CACHE__DIR", dir2.display().to_string()),
            ],
        );
        wait_log(&mut p, "worker pulling").await;
        p
    };
    let mut c = Caller::connect(&s.nats.url()).await;
    for i in 0..40 {
        c.publish(Priority::Normal, &greedy(&format!("x{i}"), "slow", "shared across workers")).await;
    }
    let (got, dups) = c.collect(40, WAIT).await;
    assert_eq!((got.len(), dups), (40, 0));
    let workers: std::collections::BTreeSet<_> = got.iter().map(|(_, r)| r.worker.clone()).collect();
    let computed = got.iter().filter(|(_, r)| r.cache == CacheTier::None).count();
    println!("computed {computed} of 40 on workers {workers:?}");
    assert_eq!(workers.len(), 2, "both workers answered");
    assert_eq!(computed, 1, "one model call across two workers");
}

#[tokio::test]
async fn the_disk_tier_survives_a_restart_and_a_corrupt_one_is_discarded() {
    let s = setup("");
    let mut c = Caller::connect(&s.nats.url()).await;
    {
        let mut w = start_worker(&s.config, &[]).await;
        assert_eq!(ask(&mut c, &greedy("r1", "echo", "remember me")).await.cache, CacheTier::None);
        assert!(w.terminate().success());
    }
    {
        let mut w = start_worker(&s.config, &[]).await;
        assert_eq!(ask(&mut c, &greedy("r2", "echo", "remember me")).await.cache, CacheTier::Disk);
        assert_eq!(ask(&mut c, &greedy("r3", "echo", "remember me")).await.cache, CacheTier::Memory, "promoted");
        assert!(w.terminate().success());
    }
    // scribble over the disk tier: the worker discards it and still serves
    let cache = s.dir.path().join("data/cache");
    std::fs::write(cache.join("retro-fleet-cache.json"), b"{not json").unwrap();
    let w = start_worker(&s.config, &[]).await;
    assert_eq!(ask(&mut c, &greedy("r4", "echo", "remember me")).await.cache, CacheTier::None);
    assert_eq!(ask(&mut c, &greedy("r5", "echo", "remember me")).await.cache, CacheTier::Memory);
    assert!(w.log().contains("disk cache unreadable; discarding it"), "{}", w.log());
}

#[tokio::test]
async fn purge_makes_a_models_answers_unreachable_in_every_worker() {
    let s = setup("");
    let mut w = start_worker(&s.config, &[]).await;
    let mut c = Caller::connect(&s.nats.url()).await;
    assert_eq!(ask(&mut c, &greedy("p1", "echo", "old answer")).await.cache, CacheTier::None);
    assert_eq!(ask(&mut c, &greedy("p2", "echo", "old answer")).await.cache, CacheTier::Memory);
    let out = cli(&s.config, &["cache", "purge", "--model", "echo"]);
    assert!(out.contains("purged the cache of `echo`"), "{out}");
    wait_log(&mut w, "cache generation changed").await;
    assert_eq!(ask(&mut c, &greedy("p3", "echo", "old answer")).await.cache, CacheTier::None, "no stale hit");
    assert_eq!(ask(&mut c, &greedy("p4", "echo", "old answer")).await.cache, CacheTier::Memory);
    let err = Command::new(env!("CARGO_BIN_EXE_retro-fleet"))
        .arg("--config")
        .arg(&s.config)
        .args(["cache", "purge", "--model", "nope"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("not configured"));
}

#[tokio::test]
async fn warming_replays_stored_results_into_a_cold_worker() {
    let s = setup("");
    let mut c = Caller::connect(&s.nats.url()).await;
    {
        let mut w = start_worker(&s.config, &[]).await;
        for i in 0..5 {
            ask(&mut c, &greedy(&format!("w{i}"), "echo", &format!("question {i}"))).await;
        }
        ask(&mut c, &request("hot", "echo", "not cacheable")).await;
        assert!(w.terminate().success());
    }
    // a new worker with an empty cache of its own
    let port = free_port();
    let cold = s.dir.path().join("cold-cache");
    let mut w = Proc::start(
        &s.config,
        &["worker"],
        &[
            ("FLEET_METRICS_LISTEN", format!("127.0.0.1:{port}")),
            ("FLEET_WORKER__CACHE__DIR", cold.display().to_string()),
        ],
    );
    wait_log(&mut w, "worker pulling").await;
    let out = cli(&s.config, &["cache", "warm", "--since", "1h"]);
    assert!(out.contains("scanned        6  cached        5  expired        0"), "{out}");
    for i in 0..5 {
        let r = ask(&mut c, &greedy(&format!("v{i}"), "echo", &format!("question {i}"))).await;
        assert_eq!(r.cache, CacheTier::Memory, "question {i}");
    }
}

fn chat(id: &str, prompt: &str, mode: CacheMode) -> InferRequest {
    let mut r = greedy(id, "echo", "");
    r.input = Input::Chat {
        messages: vec![ChatMessage::text("system", "answer briefly"), ChatMessage::text("user", prompt)],
    };
    r.cache = mode;
    r
}

#[tokio::test]
async fn semantic_hits_paraphrases_only_with_the_same_parameters() {
    let s = setup("[worker.cache]\nsemantic_models = [\"echo\"]\nsemantic_threshold = 0.8\n");
    let _w = start_worker(&s.config, &[]).await;
    let mut c = Caller::connect(&s.nats.url()).await;
    let q = "What is the capital of France?";
    let para = "what's the capital of france";
    let first = ask(&mut c, &chat("s1", q, CacheMode::Use)).await;
    assert_eq!(first.cache, CacheTier::None);

    let hit = ask(&mut c, &chat("s2", para, CacheMode::Semantic)).await;
    assert_eq!(hit.cache, CacheTier::Semantic);
    let sim = hit.cache_similarity.unwrap();
    println!("similarity of the paraphrase: {sim:.3}");
    assert!((0.8..1.0).contains(&sim), "similarity {sim}");
    assert_eq!(hit.output, first.output, "the answer to the similar prompt");

    // not opted in: exact only
    assert_eq!(ask(&mut c, &chat("s3", para, CacheMode::Use)).await.cache, CacheTier::None);
    // a different question misses
    let other = ask(&mut c, &chat("s4", "How do I bake sourdough bread?", CacheMode::Semantic)).await;
    assert_eq!(other.cache, CacheTier::None);
    // different parameters never hit
    let mut capped = chat("s5", "What is the capital of france", CacheMode::Semantic);
    capped.params.max_tokens = Some(3);
    assert_eq!(ask(&mut c, &capped).await.cache, CacheTier::None);
    // another tenant never hits
    let mut t = chat("s6", "What is the capital of France", CacheMode::Semantic);
    t.tenant = Some("other".into());
    assert_eq!(ask(&mut c, &t).await.cache, CacheTier::None);
}

/// The semantic cache on real sentence embeddings (all-MiniLM-L6-v2 at its
/// default threshold): a rephrasing the lexical embedder cannot see hits;
/// a changed fact, a negation and another tenant miss.
#[tokio::test]
async fn semantic_on_minilm_hits_rephrasings_and_misses_changed_facts_and_negations() {
    use retro_fleet_worker::embed::{lexical, similarity};
    let dir = retro_fleet_testkit::minilm_dir();
    let s = setup(&format!(
        "[worker.cache]\nsemantic_models = [\"echo\"]\nsemantic_embedder = {{ path = {:?} }}\n",
        dir.display().to_string()
    ));
    let _w = start_worker(&s.config, &[]).await;
    let mut c = Caller::connect(&s.nats.url()).await;
    let q = "How many days are in a leap year?";
    let para = "How many days does a leap year have?";
    let first = ask(&mut c, &chat("m1", q, CacheMode::Use)).await;
    assert_eq!(first.cache, CacheTier::None);

    let hit = ask(&mut c, &chat("m2", para, CacheMode::Semantic)).await;
    assert_eq!(hit.cache, CacheTier::Semantic, "{hit:?}");
    assert_eq!(hit.output, first.output);
    let sim = hit.cache_similarity.unwrap();
    let lexical = similarity(&lexical::embed(q), &lexical::embed(para));
    println!("MiniLM similarity {sim:.3}, lexical {lexical:.3}");
    assert!(lexical < 0.95, "the lexical embedder would hit too ({lexical}): pick a harder rephrasing");

    for (id, miss) in [
        ("m3", "How many days are in a normal year?"),
        ("m4", "How many days are not in a leap year?"),
        ("m5", "How do I bake sourdough bread?"),
    ] {
        let r = ask(&mut c, &chat(id, miss, CacheMode::Semantic)).await;
        assert_eq!(r.cache, CacheTier::None, "{miss:?} answered from {:?} at {:?}", r.cache, r.cache_similarity);
    }
    // a negation spelled another way meets the cached negated question
    ask(&mut c, &chat("m6", "Is NATS not fast?", CacheMode::Use)).await;
    let neg = ask(&mut c, &chat("m7", "Isn't NATS fast?", CacheMode::Semantic)).await;
    assert_eq!(neg.cache, CacheTier::Semantic, "{neg:?}");
    // another tenant never hits
    let mut t = chat("m8", para, CacheMode::Semantic);
    t.tenant = Some("other".into());
    assert_eq!(ask(&mut c, &t).await.cache, CacheTier::None);
}

#[tokio::test]
async fn a_streaming_request_answered_from_the_cache_still_gets_its_chunks() {
    use futures::StreamExt;
    let s = setup("");
    let _w = start_worker(&s.config, &[]).await;
    let client = async_nats::connect(s.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    for (id, want_tier) in [("st1", CacheTier::None), ("st2", CacheTier::Memory)] {
        let mut req = greedy(id, "echo", "stream me");
        req.stream = true;
        let reply = client.new_inbox();
        let mut sub = client.subscribe(reply.clone()).await.unwrap();
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, id);
        h.insert(headers::REPLY, reply.as_str());
        let subject = subjects::request(Priority::Normal, "echo");
        js.publish_with_headers(subject, h, Bytes::from(codec::encode(&req))).await.unwrap().await.unwrap();
        let mut text = String::new();
        let mut seqs = Vec::new();
        let result: InferResult = loop {
            let m = tokio::time::timeout(WAIT, sub.next()).await.unwrap().unwrap();
            let kind = m.headers.as_ref().and_then(|h| h.get(headers::KIND)).map(|v| v.as_str().to_string());
            if kind.as_deref() == Some(headers::KIND_CHUNK) {
                let c: retro_fleet_schemas::StreamChunk = codec::decode(None, &m.payload).unwrap();
                seqs.push(c.seq);
                text.push_str(&c.delta);
            } else {
                break codec::decode(None, &m.payload).unwrap();
            }
        };
        assert_eq!(result.cache, want_tier);
        assert_eq!(text, result.output.unwrap().text, "chunks add up to the answer");
        assert_eq!(seqs, (0..seqs.len() as u64).collect::<Vec<_>>(), "in order, no gaps");
    }
}

/// `POST /v1/infer` of a greedy prompt as `bearer`; returns the status and answer.
async fn infer_http(http: &Http, bearer: &str, prompt: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut body = serde_json::json!({"model": "echo", "prompt": prompt, "params": {"temperature": 0.0}});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, answer) = http.json("POST", "/v1/infer", Some(bearer), Some(body)).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

#[tokio::test]
async fn the_ingress_answers_repeats_itself_per_tenant_until_purge_or_expiry() {
    use serde_json::json;
    let s = setup(&auth_with_keys(&[
        ("acme", "acme-key", "acme", &["submit", "read"]),
        ("globex", "globex-key", "globex", &["submit", "read"]),
    ]));
    let mut w = start_worker(&s.config, &[]).await;
    let (mut ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let caller = Caller::connect(&s.nats.url()).await;
    let tier = |a: &serde_json::Value| a["cache"].as_str().unwrap().to_string();

    let first = infer_http(&http, "acme-key", "edge question", json!({})).await;
    assert_eq!(tier(&first), "none");
    let second = infer_http(&http, "acme-key", "edge question", json!({})).await;
    assert_eq!(tier(&second), "ingress", "{second}");
    assert_eq!(second["output"], first["output"]);
    assert_ne!(second["id"], first["id"]);
    // answered without a queue: the worker stored the first, not the second
    let id = |a: &serde_json::Value| a["id"].as_str().unwrap().to_string();
    assert!(stored_result(&caller.js, "acme", &id(&first)).await.is_some());
    assert!(stored_result(&caller.js, "acme", &id(&second)).await.is_none());

    // another tenant: the worker's cache and the ingress's are both per tenant
    assert_eq!(tier(&infer_http(&http, "globex-key", "edge question", json!({})).await), "none");
    assert_eq!(tier(&infer_http(&http, "globex-key", "edge question", json!({})).await), "ingress");

    // other parameters, bypass, refresh, a caller's own id, streaming: to the fleet
    let other_params = json!({"params": {"temperature": 0.0, "max_tokens": 1}});
    assert_eq!(tier(&infer_http(&http, "acme-key", "edge question", other_params).await), "none");
    assert_eq!(tier(&infer_http(&http, "acme-key", "edge question", json!({"cache": "bypass"})).await), "none");
    assert_eq!(tier(&infer_http(&http, "acme-key", "edge question", json!({"cache": "refresh"})).await), "none");
    let own_id = infer_http(&http, "acme-key", "edge question", json!({"id": "mine-1"})).await;
    assert_eq!(tier(&own_id), "memory", "a caller's id goes through the fleet and is stored");
    assert!(stored_result(&caller.js, "acme", "mine-1").await.is_some());

    // sampling without a seed: the worker does not cache it, so neither does the ingress
    let hot = json!({"params": {"temperature": 0.9}});
    assert_eq!(tier(&infer_http(&http, "acme-key", "hot", hot.clone()).await), "none");
    assert_eq!(tier(&infer_http(&http, "acme-key", "hot", hot).await), "none");

    // purge reaches the ingress as it reaches the workers
    let out = cli(&s.config, &["cache", "purge", "--model", "echo"]);
    assert!(out.contains("purged the cache of `echo`"), "{out}");
    wait_log(&mut w, "cache generation changed").await;
    wait_log(&mut ingress, "the ingress forgets the model's answers").await;
    assert_eq!(tier(&infer_http(&http, "acme-key", "edge question", json!({})).await), "none", "no stale hit");
    assert_eq!(tier(&infer_http(&http, "acme-key", "edge question", json!({})).await), "ingress");

    // an answer is kept only as long as the worker allows (X-Cache-Ttl)
    let short = |p: &str| {
        let r = http
            .client
            .post(format!("{base}/v1/infer"))
            .bearer_auth("acme-key")
            .header("x-cache-ttl", "1")
            .json(&json!({"model": "echo", "prompt": p, "params": {"temperature": 0.0}}));
        async move { r.send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    assert_eq!(tier(&short("short-lived").await), "none");
    assert_eq!(tier(&short("short-lived").await), "ingress");
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(tier(&short("short-lived").await), "none", "expired");

    let metrics = http.client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"fleet_ingress_cache_total{model="echo",result="hit"} 4"#), "{metrics}");
}

#[tokio::test]
async fn answers_from_the_ingress_count_against_token_limits() {
    let s = setup(
        "[ingress.rate_limit]\nenabled = true\nalgorithm = \"fixed_window\"\nwindow_secs = 3600\n\
         [ingress.rate_limit.submit]\nrequests = 1000\ntokens = 100\n",
    );
    let _w = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    // 4 prompt bytes (1 token) + max_tokens 40: 41 tokens a call
    let body = serde_json::json!({"model": "echo", "prompt": "edge", "params": {"temperature": 0.0, "max_tokens": 40}});
    let (status, first) = http.json("POST", "/v1/infer", None, Some(body.clone())).await;
    assert_eq!((status, first["cache"].as_str()), (200, Some("none")), "{first}");
    let (status, second) = http.json("POST", "/v1/infer", None, Some(body.clone())).await;
    assert_eq!((status, second["cache"].as_str()), (200, Some("ingress")), "{second}");
    // both are charged 41 up front, then settled to what they used: the
    // answer from memory too, so what is left is 100 minus both
    let used = [&first, &second].iter().map(|r| r["usage"]["total_tokens"].as_u64().unwrap()).sum::<u64>();
    let left = (100 - used).to_string();
    let mut seen = String::new();
    for _ in 0..50 {
        // estimated at 100: refused, and the refusal says what is left
        let big = serde_json::json!({"model": "echo", "prompt": "xxxx", "params": {"max_tokens": 99}});
        let r = http.send("POST", "/v1/infer", None, Some(big)).await;
        assert_eq!(r.status(), 429);
        seen = r.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().to_string();
        if seen == left {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(seen, left, "the answer from memory counts its {used} tokens with the first's");
}
