//! Load over HTTP: `POST /v1/infer` to one or more ingresses, a fixed
//! number of requests in flight, each answered request timed. Several
//! targets are measured in alternating rounds, so their figures come from
//! the same minutes of the same machine.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::load::{Mode, Report, Timeline};
use crate::workload::Workload;

/// An ingress to load.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    /// Label in reports.
    pub name: String,
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub base: String,
    /// The model to ask this target for, when not `--model`.
    pub model: Option<String>,
}

impl std::str::FromStr for HttpTarget {
    type Err = String;

    /// `NAME=URL`, `NAME@MODEL=URL` (this target is asked for MODEL), or a
    /// bare URL (named `http`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, base) = match s.split_once('=') {
            Some((n, u)) => (n.to_string(), u.to_string()),
            None => ("http".to_string(), s.to_string()),
        };
        if !base.starts_with("http://") {
            return Err(format!("`{s}`: give NAME=http://HOST:PORT or NAME@MODEL=http://HOST:PORT"));
        }
        let (name, model) = match name.split_once('@') {
            Some((n, m)) => (n.to_string(), Some(m.to_string())),
            None => (name, None),
        };
        Ok(HttpTarget { name, base: base.trim_end_matches('/').to_string(), model })
    }
}

/// The HTTP API a load speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// `POST /v1/infer`, retro-fleet's own.
    Native,
    /// `POST /v1/chat/completions`, as an OpenAI client sends it (and any
    /// OpenAI-compatible server answers it): streamed as server-sent events
    /// when the workload streams.
    Openai,
    /// `POST /v1/embeddings` (OpenAI's, as vLLM, TEI and `mistralrs serve`
    /// offer it too), the workload's `embed_batch` texts per request.
    Embeddings,
}

/// What one answered request measured: microseconds to the whole answer and
/// to its first visible text (streaming), tokens generated, and whether it
/// came from a cache.
struct Answered {
    total_us: u64,
    first_text_us: Option<u64>,
    tokens: u64,
    cached: bool,
}

/// Sends `n` requests of `workload` to `target`, with a window in flight or
/// open loop at a rate. Answers other than 200 count as lost (and are
/// reported once per status); answers whose `cache` is not `none` count as
/// cache hits.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: &reqwest::Client,
    target: &HttpTarget,
    api: Api,
    n: usize,
    mode: Mode,
    workload: &Workload,
    model: &str,
    bearer: Option<&str>,
) -> anyhow::Result<Report> {
    let run_id = ulid::Ulid::new().to_string();
    let params = workload.params();
    let model = target.model.as_deref().unwrap_or(model);
    let url = match api {
        Api::Native => format!("{}/v1/infer", target.base),
        Api::Openai => format!("{}/v1/chat/completions", target.base),
        Api::Embeddings => format!("{}/v1/embeddings", target.base),
    };
    let new_hist = || Histogram::<u64>::new_with_bounds(1, 600_000_000, 3);
    let hist = Arc::new(Mutex::new(new_hist()?));
    let first_text = Arc::new(Mutex::new(new_hist()?));
    let failures = Arc::new(Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
    let hits = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(AtomicUsize::new(0));
    let timeline = Arc::new(Timeline::new());
    let one = |i: usize| {
        let prompt = workload.prompt(&run_id, i);
        let body = match api {
            Api::Native => {
                serde_json::json!({"model": model, "prompt": prompt, "params": params, "cache": workload.cache})
            }
            Api::Openai => {
                let mut body = serde_json::json!({
                    "model": model,
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": params.max_tokens,
                    "temperature": params.temperature,
                    "stream": workload.stream,
                });
                if let Some(schema) = &workload.json_schema {
                    body["response_format"] =
                        serde_json::json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}});
                }
                body
            }
            Api::Embeddings => serde_json::json!({
                "model": model, "input": workload.texts(&run_id, i), "encoding_format": "float",
            }),
        };
        let body = bytes::Bytes::from(serde_json::to_vec(&body).expect("json"));
        let (client, url) = (client.clone(), url.clone());
        let (hist, first_text, failures, hits, tokens, timeline) =
            (hist.clone(), first_text.clone(), failures.clone(), hits.clone(), tokens.clone(), timeline.clone());
        let bearer = bearer.map(str::to_string);
        let stream = workload.stream && api == Api::Openai;
        async move {
            let t = Instant::now();
            let mut req = client.post(url).header("content-type", "application/json").body(body);
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            let outcome = match req.send().await {
                Ok(r) if r.status() == 200 && stream => read_events(r, t).await,
                Ok(r) if r.status() == 200 => r.bytes().await.map_err(|e| e.to_string()).map(|body| {
                    let v = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
                    Answered {
                        total_us: micros(t),
                        first_text_us: None,
                        tokens: v.pointer("/usage/completion_tokens").and_then(|c| c.as_u64()).unwrap_or(0),
                        cached: v.get("cache").and_then(|c| c.as_str()).is_some_and(|c| c != "none"),
                    }
                }),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(a) => {
                    timeline.answered();
                    let _ = hist.lock().unwrap().record(a.total_us);
                    if let Some(us) = a.first_text_us {
                        let _ = first_text.lock().unwrap().record(us);
                    }
                    if a.cached {
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
                    tokens.fetch_add(a.tokens as usize, Ordering::Relaxed);
                    1
                }
                Err(e) => {
                    *failures.lock().unwrap().entry(e).or_default() += 1;
                    0
                }
            }
        }
    };
    let start = Instant::now();
    let answered: usize = match mode {
        Mode::Window(window) => {
            futures::stream::iter(0..n)
                .map(one)
                .buffer_unordered(window.max(1))
                .fold(0, |a, x| async move { a + x })
                .await
        }
        Mode::Rate(rate) => {
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
            let mut tasks = Vec::with_capacity(n);
            for i in 0..n {
                ticker.tick().await;
                tasks.push(tokio::spawn(one(i)));
            }
            let mut sum = 0;
            for t in tasks {
                sum += t.await.unwrap_or(0);
            }
            sum
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    for (why, count) in failures.lock().unwrap().iter() {
        eprintln!("{}: {count} requests failed: {why}", target.name);
    }
    let h = hist.lock().unwrap();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let f = first_text.lock().unwrap();
    let first = |q: f64| (!f.is_empty()).then(|| ms(&f, q));
    Ok(Report {
        target: target.name.clone(),
        sent: n,
        answered,
        lost: n - answered,
        duplicates: 0,
        cache_hits: hits.load(Ordering::Relaxed),
        throughput: answered as f64 / elapsed,
        p50_ms: ms(&h, 0.5),
        p90_ms: ms(&h, 0.9),
        p95_ms: ms(&h, 0.95),
        p99_ms: ms(&h, 0.99),
        max_ms: h.max() as f64 / 1000.0,
        tokens_per_s: tokens.load(Ordering::Relaxed) as f64 / elapsed,
        ttft_p50_ms: first(0.5),
        ttft_p99_ms: first(0.99),
        timeline: timeline.bins(),
    })
}

fn micros(since: Instant) -> u64 {
    since.elapsed().as_micros().max(1) as u64
}

/// Reads a streamed chat completion (server-sent events) to its end: the
/// time of the first event whose delta carries visible text (an empty or
/// whitespace-only delta does not count). Tokens are not counted: servers
/// that coalesce send several in one event.
async fn read_events(mut r: reqwest::Response, t: Instant) -> Result<Answered, String> {
    let (mut buf, mut first_text_us, mut done) = (Vec::<u8>::new(), None, false);
    while let Some(chunk) = r.chunk().await.map_err(|e| e.to_string())? {
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in event.split(|b| *b == b'\n') {
                let Some(data) = line.strip_prefix(b"data: ") else { continue };
                if data == b"[DONE]" {
                    done = true;
                    continue;
                }
                let v: serde_json::Value = serde_json::from_slice(data).map_err(|e| format!("bad event: {e}"))?;
                if v.get("error").is_some() {
                    return Err(format!("error event: {}", v["error"]));
                }
                let text = v.pointer("/choices/0/delta/content").and_then(|c| c.as_str()).unwrap_or("");
                if !text.trim().is_empty() {
                    first_text_us.get_or_insert_with(|| micros(t));
                }
            }
        }
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    Ok(Answered { total_us: micros(t), first_text_us, tokens: 0, cached: false })
}

/// A client with a pool as large as the window and no idle timeout surprises.
pub fn client(window: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(window.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()?)
}
