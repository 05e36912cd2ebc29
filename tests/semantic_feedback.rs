//! Feedback on the semantic cache's answers, and answers checked against
//! the model: a worker, an ingress and a nats-server, over real HTTP.

mod common;

use common::*;
use serde_json::{json, Value};

/// `POST /v1/infer` of a greedy prompt as `bearer` in cache mode `mode`.
async fn infer(http: &Http, bearer: Option<&str>, prompt: &str, mode: &str) -> Value {
    let body = json!({"model": "echo", "prompt": prompt, "params": {"temperature": 0.0}, "cache": mode});
    let (status, answer) = http.json("POST", "/v1/infer", bearer, Some(body)).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

async fn feedback(http: &Http, bearer: &str, id: &Value, verdict: &str) -> (u16, Value) {
    http.json("POST", "/v1/cache/feedback", Some(bearer), Some(json!({"request_id": id, "verdict": verdict}))).await
}

fn tier(a: &Value) -> &str {
    a["cache"].as_str().unwrap()
}

#[tokio::test]
async fn a_wrong_verdict_stops_the_entry_answering_that_prompt_and_only_its_tenant_may_give_it() {
    let s = setup(&format!(
        "{}\n[worker.cache]\nsemantic_models = [\"echo\"]\nsemantic_threshold = 0.8\n",
        auth_with_keys(&[
            ("acme", "acme-key", "acme", &["submit", "read"]),
            ("globex", "globex-key", "globex", &["submit", "read"]),
        ])
    ));
    let (_w, port) = worker(&s.config).await;
    let (_i, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let near = "what's the capital of france";

    let first = infer(&http, Some("acme-key"), "What is the capital of France?", "use").await;
    assert_eq!(tier(&first), "none");
    let hit = infer(&http, Some("acme-key"), near, "semantic").await;
    assert_eq!(tier(&hit), "semantic", "{hit}");
    let similarity = hit["cache_similarity"].as_f64().unwrap();
    assert!(hit["cache_entry"].as_str().is_some_and(|e| e.len() == 32), "{hit}");

    // another tenant cannot judge acme's answers: as if there were none
    let (status, body) = feedback(&http, "globex-key", &hit["id"], "wrong").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")), "{body}");
    assert_eq!(tier(&infer(&http, Some("acme-key"), near, "semantic").await), "semantic", "still answering");

    // only semantic answers can be judged, and only with a known verdict
    let (status, body) = feedback(&http, "acme-key", &first["id"], "wrong").await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("not the semantic cache"), "{body}");
    let (status, _) = feedback(&http, "acme-key", &hit["id"], "meh").await;
    assert_eq!(status, 422);

    let (status, body) = feedback(&http, "acme-key", &hit["id"], "wrong").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["workers"], 1, "the worker holding the entry applied it: {body}");
    assert_eq!(body["entry"], hit["cache_entry"]);

    let again = infer(&http, Some("acme-key"), near, "semantic").await;
    assert_eq!(tier(&again), "none", "the entry no longer answers that prompt: {again}");
    // a prompt closer than the judged one is still answered by the entry
    let closer = infer(&http, Some("acme-key"), "What is the capital of France", "semantic").await;
    assert_eq!(tier(&closer), "semantic", "{closer}");
    assert!(closer["cache_similarity"].as_f64().unwrap() > similarity);
    assert_eq!(closer["cache_entry"], hit["cache_entry"]);
    let (status, body) = feedback(&http, "acme-key", &closer["id"], "correct").await;
    assert_eq!((status, &body["workers"]), (200, &json!(1)), "{body}");

    let (_, m) = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    assert_eq!(metric(&m, r#"fleet_cache_feedback_total{model="echo",verdict="wrong"}"#), 1.0, "{m}");
    assert_eq!(metric(&m, r#"fleet_cache_feedback_total{model="echo",verdict="correct"}"#), 1.0);
}

#[tokio::test]
async fn sampled_candidates_are_computed_and_compared_with_the_cached_answer() {
    // every candidate from 0.6 up is checked; agreeing answers need 0.9
    let s = setup(
        "[worker.cache]\nsemantic_models = [\"echo\"]\nsemantic_threshold = 0.9\nsemantic_verify_fraction = 1.0\n\
         semantic_verify_floor = 0.6\nsemantic_error_bound = 0.02\n",
    );
    let (_w, port) = worker(&s.config).await;
    let (_i, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let anon = None;
    assert_eq!(tier(&infer(&http, anon, "What is the capital of France?", "use").await), "none");
    // near, but the (echoed) answers differ: computed, and they disagree
    let band = infer(&http, anon, "tell me the capital of france", "semantic").await;
    assert_eq!(tier(&band), "none", "{band}");
    // the same question: computed too (every candidate is checked), and they agree
    let same = infer(&http, anon, "What is the capital of France", "semantic").await;
    assert_eq!(tier(&same), "none", "{same}");
    // unrelated: no candidate, nothing checked
    assert_eq!(tier(&infer(&http, anon, "How do I bake sourdough bread?", "semantic").await), "none");

    let (_, m) = get_text(&format!("http://127.0.0.1:{port}/metrics")).await;
    let checks = |outcome: &str| {
        metric(&m, &format!(r#"fleet_cache_semantic_checks_total{{model="echo",outcome="{outcome}"}}"#))
    };
    assert_eq!((checks("agreed"), checks("disagreed")), (1.0, 1.0), "{m}");
}
