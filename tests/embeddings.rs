//! Embedding models end to end: all-MiniLM-L6-v2 served by a worker
//! (`backend = "embedding"`), reached over NATS and with the unmodified
//! `openai` Python client; its vectors checked against the golden ones of
//! the numpy reference (`scripts/minilm-reference.py`).

#![cfg(feature = "mistralrs")]

mod common;

use std::time::Duration;

use common::*;
use retro_fleet_schemas::{CacheTier, ChatMessage, ErrorCode, Input, Priority, Status};
use retro_fleet_worker::embed::similarity;

fn config() -> String {
    format!(
        "[models.minilm]\nbackend = \"embedding\"\npath = {:?}\n[models.echo]\nbackend = \"echo\"\n",
        retro_fleet_testkit::minilm_dir().display().to_string()
    )
}

fn golden_path() -> std::path::PathBuf {
    retro_fleet_testkit::package_dir().join("workers/tests/golden/minilm.json")
}

/// `(text, vector)` of the golden sentences.
fn golden() -> Vec<(String, Vec<f32>)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(golden_path()).unwrap()).unwrap();
    v["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["text"].as_str().unwrap().to_string(), serde_json::from_value(s["embedding"].clone()).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_embedded_over_nats_match_the_reference_and_are_cached() {
    let s = setup(&config());
    let _w = start_worker(&s.config, &[]).await;
    let mut c = Caller::connect(&s.nats.url()).await;
    let golden = golden();
    let texts: Vec<String> = golden.iter().map(|(t, _)| t.clone()).collect();
    for id in ["e1", "e2"] {
        let mut req = request(id, "minilm", "");
        req.input = Input::Embed { texts: texts.clone(), dimensions: None };
        c.publish(Priority::Normal, &req).await;
    }
    let (results, _) = c.collect(2, Duration::from_secs(60)).await;
    for (id, r) in &results {
        assert_eq!(r.status, Status::Ok, "{r:?}");
        let vectors = &r.output.as_ref().unwrap().embeddings;
        assert_eq!(vectors.len(), golden.len());
        for (v, (text, want)) in vectors.iter().zip(&golden) {
            assert!(similarity(v, want) >= 0.999, "{id} {text:?}: cosine {}", similarity(v, want));
        }
        assert!(r.usage.as_ref().unwrap().prompt_tokens > texts.len() as u32);
        assert!(r.model_revision.as_deref().unwrap().starts_with("fnv1a64:"));
    }
    // an embedding is reproducible: the same texts again come from the cache
    let tiers: Vec<CacheTier> = results.iter().map(|(_, r)| r.cache).collect();
    assert!(tiers.contains(&CacheTier::None), "{tiers:?}");

    let mut again = request("e3", "minilm", "");
    again.input = Input::Embed { texts, dimensions: None };
    c.publish(Priority::Normal, &again).await;
    let (r, _) = c.collect(1, Duration::from_secs(60)).await;
    assert_eq!(r[0].1.cache, CacheTier::Memory, "{:?}", r[0].1);

    // a prompt to an embedding model, texts to a text model: clear refusals
    let mut chat = request("e4", "minilm", "");
    chat.input = Input::Chat { messages: vec![ChatMessage::text("user", "hi")] };
    let mut embed = request("e5", "echo", "");
    embed.input = Input::Embed { texts: vec!["hi".into()], dimensions: None };
    c.publish(Priority::Normal, &chat).await;
    c.publish(Priority::Normal, &embed).await;
    let (refused, _) = c.collect(2, Duration::from_secs(60)).await;
    for (id, r) in refused {
        let e = r.error.unwrap_or_else(|| panic!("{id} answered"));
        assert_eq!(e.code, ErrorCode::Unsupported, "{id}: {e:?}");
        assert!(e.message.contains("embed"), "{id}: {}", e.message);
    }
}

/// The official `openai` Python client, unchanged: `embeddings.create` with
/// one text and with 32, as floats and as base64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_embeds_one_text_and_a_batch_of_32() {
    let s = setup(&config());
    let _w = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let script = r#"
import base64, json, math, struct, sys, openai
a = json.loads(sys.argv[1])
golden = json.load(open(a["golden"]))["sentences"]
c = openai.OpenAI(base_url=a["base"] + "/v1", api_key="unused", max_retries=0)

def cos(x, y):
    return sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))

# one text: the client asks for base64 unless told otherwise, and decodes it
r = c.embeddings.create(model="minilm", input=golden[0]["text"])
assert len(r.data) == 1 and len(r.data[0].embedding) == 384, r
assert cos(r.data[0].embedding, golden[0]["embedding"]) >= 0.999
assert r.model == "minilm" and r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens, r

# 32 texts in one call, as floats and as base64: the same vectors, each its text's
texts = [golden[i % len(golden)]["text"] for i in range(32)]
f = c.embeddings.create(model="minilm", input=texts, encoding_format="float")
b = c.embeddings.create(model="minilm", input=texts, encoding_format="base64")
assert [d.index for d in f.data] == list(range(32)) == [d.index for d in b.data]
for i, (fd, bd) in enumerate(zip(f.data, b.data)):
    assert struct.pack("<%df" % len(fd.embedding), *fd.embedding) == base64.b64decode(bd.embedding), i
    assert cos(fd.embedding, golden[i % len(golden)]["embedding"]) >= 0.999, i

# the model's own dimension passes; another is refused, naming it
assert len(c.embeddings.create(model="minilm", input="x", dimensions=384).data[0].embedding) == 384
for bad, kind in [(dict(model="minilm", input="x", dimensions=128), openai.BadRequestError),
                  (dict(model="echo", input="x"), openai.BadRequestError),
                  (dict(model="minilm", input=[]), openai.UnprocessableEntityError),
                  (dict(model="minilm", input=[[1, 2, 3]]), openai.BadRequestError)]:
    try:
        c.embeddings.create(**bad)
        raise SystemExit("expected %s for %s" % (kind.__name__, bad))
    except kind as e:
        print(type(e).__name__, e)
print("embeddings ok")
"#;
    let arg = serde_json::json!({"base": base, "golden": golden_path()}).to_string();
    python(
        script,
        &arg,
        "embeddings ok",
        "the openai client's embeddings failed (install it with `pip install openai`, which `make test` does)",
    );
}

/// A batch of `/v1/embeddings` lines (OpenAI's Batch API): each result line
/// holds its texts' vectors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_embedding_lines_gets_each_lines_vectors() {
    use serde_json::{json, Value};
    let s = setup(&config());
    let _w = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let golden = golden();
    let lines: String = golden
        .iter()
        .enumerate()
        .map(|(i, (text, _))| {
            json!({"custom_id": format!("e{i}"), "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": "minilm", "input": [text]}})
            .to_string()
                + "\n"
        })
        .collect();
    let http = reqwest::Client::new();
    let batch: Value = http.post(format!("{base}/v1/batches")).body(lines).send().await.unwrap().json().await.unwrap();
    let id = batch["id"].as_str().unwrap_or_else(|| panic!("{batch}")).to_string();
    let start = std::time::Instant::now();
    loop {
        let v: Value = http.get(format!("{base}/v1/batches/{id}")).send().await.unwrap().json().await.unwrap();
        if v["status"] == "completed" {
            assert_eq!(v["request_counts"]["failed"], 0, "{v}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "batch not done: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = http.get(format!("{base}/v1/batches/{id}/results")).send().await.unwrap().text().await.unwrap();
    let out: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(out.len(), golden.len());
    for line in out {
        let i: usize = line["custom_id"].as_str().unwrap()[1..].parse().unwrap();
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "list", "{line}");
        let v: Vec<f32> = serde_json::from_value(body["data"][0]["embedding"].clone()).unwrap();
        assert!(similarity(&v, &golden[i].1) >= 0.999, "line {i}");
    }
}
