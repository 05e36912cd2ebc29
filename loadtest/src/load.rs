//! Sending requests and timing their replies.

use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use retro_fleet_schemas::{codec, headers, subjects, CacheTier, Envelope, InferRequest, InferResult, Input, Priority};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::workload::Workload;

/// Closed or open loop.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// A fixed number in flight.
    Window(usize),
    /// Requests per second regardless of replies.
    Rate(f64),
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Window(w) => write!(f, "window {w}"),
            Mode::Rate(r) => write!(f, "open loop at {r}/s"),
        }
    }
}

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Target {
    /// Label in reports.
    pub name: String,
    subject: String,
    model: String,
}

impl Target {
    /// The fleet: `fleet.req.<priority>.<model>`.
    pub fn fleet(model: &str, p: Priority) -> Target {
        Target { name: "fleet".into(), subject: subjects::request(p, model), model: model.into() }
    }

    /// The bare JetStream floor.
    pub fn floor() -> Target {
        Target { name: "floor".into(), subject: crate::floor::SUBJECT.into(), model: "echo".into() }
    }
}

/// What one round measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Target name.
    pub target: String,
    /// Requests sent.
    pub sent: usize,
    /// Distinct requests answered.
    pub answered: usize,
    /// Sent but never answered.
    pub lost: usize,
    /// Extra answers to already-answered requests.
    pub duplicates: usize,
    /// Answers that came from a cache (any tier, or a shared computation).
    pub cache_hits: usize,
    /// Answered requests per second over the round.
    pub throughput: f64,
    /// Latency percentiles in ms.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Generated tokens per second over the round (from results' usage).
    pub tokens_per_s: f64,
    /// Time to the first streamed token, median (streaming runs).
    pub ttft_p50_ms: Option<f64>,
    /// Time to the first streamed token, 99th percentile.
    pub ttft_p99_ms: Option<f64>,
    /// Answers in each tenth of a second of the round (throughput over time).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<u32>,
}

/// Answers counted per tenth of a second since a round started.
pub struct Timeline {
    start: Instant,
    bins: Mutex<Vec<u32>>,
}

impl Timeline {
    /// A timeline starting now.
    pub fn new() -> Timeline {
        Timeline { start: Instant::now(), bins: Mutex::new(Vec::new()) }
    }

    /// One answer, now.
    pub fn answered(&self) {
        let bin = (self.start.elapsed().as_millis() / 100) as usize;
        let mut bins = self.bins.lock().unwrap();
        if bins.len() <= bin {
            bins.resize(bin + 1, 0);
        }
        bins[bin] += 1;
    }

    /// The counts so far.
    pub fn bins(&self) -> Vec<u32> {
        self.bins.lock().unwrap().clone()
    }
}

impl Report {
    /// One line for people.
    pub fn line(&self) -> String {
        let mut extra = String::new();
        if self.tokens_per_s > 0.0 {
            extra.push_str(&format!(" | {:.0} tokens/s", self.tokens_per_s));
        }
        if let (Some(a), Some(b)) = (self.ttft_p50_ms, self.ttft_p99_ms) {
            extra.push_str(&format!(" | first token p50 {a:.3} ms p99 {b:.3} ms"));
        }
        let base = format!(
            "{:<6} sent {} answered {} lost {} dup {} | {:>8.0} req/s | p50 {:.3} ms p90 {:.3} ms p95 {:.3} ms p99 {:.3} ms max {:.3} ms | cache hits {:.1} %",
            self.target, self.sent, self.answered, self.lost, self.duplicates, self.throughput, self.p50_ms, self.p90_ms, self.p95_ms, self.p99_ms, self.max_ms,
            100.0 * self.cache_hits as f64 / self.answered.max(1) as f64
        );
        base + &extra
    }
}

/// The report with the median throughput of `reports`.
pub fn median(mut reports: Vec<Report>) -> Report {
    reports.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
    reports[reports.len() / 2].clone()
}

/// Sends `n` requests to `target` and waits for their replies.
pub async fn run(
    client: &async_nats::Client,
    target: &Target,
    n: usize,
    mode: Mode,
    workload: &Workload,
    wait: Duration,
) -> anyhow::Result<Report> {
    let js = async_nats::jetstream::new(client.clone());
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(format!("{inbox}.*")).await?;
    let run_id = ulid::Ulid::new().to_string();
    let sent_at: Arc<Vec<Mutex<Option<Instant>>>> = Arc::new((0..n).map(|_| Mutex::new(None)).collect());
    let answered_flags: Arc<Vec<std::sync::atomic::AtomicBool>> =
        Arc::new((0..n).map(|_| Default::default()).collect());
    let window = Arc::new(Semaphore::new(match mode {
        Mode::Window(w) => w,
        Mode::Rate(_) => Semaphore::MAX_PERMITS,
    }));
    // open loop never waits on the window: giving permits back would overflow it
    let closed_loop = matches!(mode, Mode::Window(_));
    let answered = Arc::new(AtomicUsize::new(0));
    let duplicates = Arc::new(AtomicUsize::new(0));
    let hits = Arc::new(AtomicUsize::new(0));
    let tokens = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ttft = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?));
    let first_chunk: Arc<Vec<std::sync::atomic::AtomicBool>> = Arc::new((0..n).map(|_| Default::default()).collect());
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?));
    let timeline = Arc::new(Timeline::new());

    let mut receiver = {
        let timeline = timeline.clone();
        let (sent_at, flags, window, answered, duplicates, hist, hits) = (
            sent_at.clone(),
            answered_flags.clone(),
            window.clone(),
            answered.clone(),
            duplicates.clone(),
            hist.clone(),
            hits.clone(),
        );
        let (tokens, ttft, first_chunk) = (tokens.clone(), ttft.clone(), first_chunk.clone());
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let kind = msg.headers.as_ref().and_then(|h| h.get(headers::KIND)).map(|k| k.as_str().to_string());
                let Some(i) = msg.subject.rsplit('.').next().and_then(|s| s.parse::<usize>().ok()) else { continue };
                if i >= flags.len() {
                    continue;
                }
                if kind.as_deref() == Some(headers::KIND_CHUNK) {
                    if !first_chunk[i].swap(true, Ordering::AcqRel) {
                        if let Some(t) = *sent_at[i].lock().unwrap() {
                            let _ = ttft.lock().unwrap().record(t.elapsed().as_micros().max(1) as u64);
                        }
                    }
                    continue;
                }
                if flags[i].swap(true, Ordering::AcqRel) {
                    duplicates.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(t) = *sent_at[i].lock().unwrap() {
                    let us = t.elapsed().as_micros().max(1) as u64;
                    let _ = hist.lock().unwrap().record(us);
                }
                timeline.answered();
                if closed_loop {
                    window.add_permits(1);
                }
                if let Ok(r) = codec::decode::<InferResult>(None, &msg.payload) {
                    if r.cache != CacheTier::None {
                        hits.fetch_add(1, Ordering::Relaxed);
                    }
                    let generated = r.usage.map_or(0, |u| u.completion_tokens as u64);
                    tokens.fetch_add(generated, Ordering::Relaxed);
                }
                if answered.fetch_add(1, Ordering::AcqRel) + 1 == flags.len() {
                    return;
                }
            }
        })
    };

    let params = workload.params();
    let start = Instant::now();
    let mut ticker = match mode {
        Mode::Rate(r) => Some(tokio::time::interval(Duration::from_secs_f64(1.0 / r.max(0.001)))),
        Mode::Window(_) => None,
    };
    for i in 0..n {
        match ticker.as_mut() {
            Some(t) => {
                t.tick().await;
            }
            None => window.acquire().await?.forget(),
        }
        let id = format!("{run_id}-{i}");
        let req = InferRequest {
            v: retro_fleet_schemas::SCHEMA_VERSION,
            id: id.clone(),
            model: target.model.clone(),
            adapter: None,
            input: Input::Completion { prompt: workload.prompt(&run_id, i) },
            params: params.clone(),
            stream: workload.stream,
            cache: workload.cache,
            tenant: None,
            metadata: Default::default(),
        };
        let h = Envelope::new(id.as_str()).reply(format!("{inbox}.{i}")).headers();
        let payload = Bytes::from(codec::encode(&req));
        *sent_at[i].lock().unwrap() = Some(Instant::now());
        let ack = js.publish_with_headers(target.subject.clone(), h, payload).await?;
        tokio::spawn(async move {
            if let Err(e) = ack.await {
                eprintln!("publish not acknowledged: {e}");
            }
        });
    }
    if tokio::time::timeout(wait, &mut receiver).await.is_err() {
        receiver.abort();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let got = answered.load(Ordering::Acquire);
    let h = hist.lock().unwrap();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        target: target.name.clone(),
        sent: n,
        answered: got,
        lost: n - got,
        duplicates: duplicates.load(Ordering::Relaxed),
        cache_hits: hits.load(Ordering::Relaxed),
        throughput: got as f64 / elapsed,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p95_ms: ms(0.95),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
        tokens_per_s: tokens.load(Ordering::Relaxed) as f64 / elapsed,
        ttft_p50_ms: ttft_ms(&ttft, 0.5),
        ttft_p99_ms: ttft_ms(&ttft, 0.99),
        timeline: timeline.bins(),
    })
}

fn ttft_ms(h: &Mutex<Histogram<u64>>, q: f64) -> Option<f64> {
    let h = h.lock().unwrap();
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}
