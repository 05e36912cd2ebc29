//! Load over HTTP: `POST /v1/infer` to one or more ingresses, a fixed
//! number of requests in flight, each answered request timed. Several
//! targets are measured in alternating rounds, so their figures come from
//! the same minutes of the same machine.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hdrhistogram::Histogram;

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::load::{Mode, Report};
use crate::workload::Workload;

/// An ingress to load.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    /// Label in reports.
    pub name: String,
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub base: String,
}

impl std::str::FromStr for HttpTarget {
    type Err = String;

    /// `NAME=URL`, or a bare URL (named `http`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, base) = match s.split_once('=') {
            Some((n, u)) => (n.to_string(), u.to_string()),
            None => ("http".to_string(), s.to_string()),
        };
        if !base.starts_with("http://") {
            return Err(format!("`{s}`: give NAME=http://HOST:PORT"));
        }
        Ok(HttpTarget { name, base: base.trim_end_matches('/').to_string() })
    }
}

/// Sends `n` requests of `workload` to `target`, with a window in flight or
/// open loop at a rate. Answers other than 200 count as lost (and are
/// reported once per status); answers whose `cache` is not `none` count as
/// cache hits.
pub async fn run(
    client: &reqwest::Client,
    target: &HttpTarget,
    n: usize,
    mode: Mode,
    workload: &Workload,
    model: &str,
    bearer: Option<&str>,
) -> anyhow::Result<Report> {
    let run_id = ulid::Ulid::new().to_string();
    let params = workload.params();
    let url = format!("{}/v1/infer", target.base);
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?));
    let failures = Arc::new(Mutex::new(std::collections::BTreeMap::<String, usize>::new()));
    let hits = Arc::new(AtomicUsize::new(0));
    let one = |i: usize| {
        let body = serde_json::json!({"model": model, "prompt": workload.prompt(&run_id, i), "params": params});
        let body = bytes::Bytes::from(serde_json::to_vec(&body).expect("json"));
        let (client, url, hist, failures, hits) =
            (client.clone(), url.clone(), hist.clone(), failures.clone(), hits.clone());
        let bearer = bearer.map(str::to_string);
        async move {
            let t = Instant::now();
            let mut req = client.post(url).header("content-type", "application/json").body(body);
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            let outcome = match req.send().await {
                Ok(r) if r.status() == 200 => r.bytes().await.map_err(|e| e.to_string()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(body) => {
                    let _ = hist.lock().unwrap().record(t.elapsed().as_micros().max(1) as u64);
                    let cached = serde_json::from_slice::<serde_json::Value>(&body)
                        .is_ok_and(|v| v.get("cache").and_then(|c| c.as_str()).is_some_and(|c| c != "none"));
                    if cached {
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
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
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        target: target.name.clone(),
        sent: n,
        answered,
        lost: n - answered,
        duplicates: 0,
        cache_hits: hits.load(Ordering::Relaxed),
        throughput: answered as f64 / elapsed,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
        tokens_per_s: 0.0,
        ttft_p50_ms: None,
        ttft_p99_ms: None,
    })
}

/// A client with a pool as large as the window and no idle timeout surprises.
pub fn client(window: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(window.max(1))
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()?)
}
