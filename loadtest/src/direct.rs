//! The model called directly in-process, with no fleet around it: the same
//! requests, the same concurrency, straight to the mistral.rs backend the
//! workers use. What the fleet's tokens/s are compared with.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use hdrhistogram::Histogram;
use retro_fleet_schemas::{InferRequest, Input};
use retro_fleet_worker::backend::cohort::Admission;
use retro_fleet_worker::backend::{self, Backend};
use retro_fleet_worker::ModelConfig;

use crate::load::Report;
use crate::workload::Workload;

/// Loads the mistral.rs model in `dir` the way a worker does (one instance),
/// with requests entering its engine by `admission`.
pub async fn load(dir: &std::path::Path, admission: Admission) -> anyhow::Result<Arc<dyn Backend>> {
    let mut cfg = ModelConfig::mistralrs(dir.to_path_buf(), 256);
    if let ModelConfig::Mistralrs { admission: a, .. } = &mut cfg {
        *a = admission;
    }
    let board = retro_fleet_worker::breaker::Board::unregistered(Default::default());
    Ok(backend::build("direct", &cfg, &board, &backend::pool::Budget::new(0)).await?)
}

/// Runs `n` requests with `window` in flight; with `stream`, also times the
/// first token. The report is named `target`.
pub async fn run(
    target: &str,
    model: &Arc<dyn Backend>,
    n: usize,
    window: usize,
    workload: &Workload,
) -> anyhow::Result<Report> {
    let run_id = ulid::Ulid::new().to_string();
    let params = workload.params();
    let stream = workload.stream;
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?));
    let ttft = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?));
    let start = Instant::now();
    let outcomes: Vec<Option<u64>> = futures::stream::iter(0..n)
        .map(|i| {
            let req = InferRequest {
                v: retro_fleet_schemas::SCHEMA_VERSION,
                id: format!("{run_id}-{i}"),
                model: "direct".into(),
                adapter: None,
                input: Input::Completion { prompt: workload.prompt(&run_id, i) },
                params: params.clone(),
                stream,
                cache: Default::default(),
                tenant: None,
                metadata: Default::default(),
            };
            let (model, hist, ttft) = (model.clone(), hist.clone(), ttft.clone());
            async move {
                let t = Instant::now();
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let first = tokio::spawn(async move { rx.recv().await.map(|_| t.elapsed()) });
                let out = model
                    .generate(&req, retro_fleet_worker::backend::Attempt::streaming(stream.then_some(tx)))
                    .await
                    .ok()?;
                let _ = hist.lock().unwrap().record(t.elapsed().as_micros().max(1) as u64);
                if let Ok(Some(d)) = first.await {
                    let _ = ttft.lock().unwrap().record(d.as_micros().max(1) as u64);
                }
                Some(out.usage.completion_tokens as u64)
            }
        })
        .buffer_unordered(window.max(1))
        .collect()
        .await;
    let elapsed = start.elapsed().as_secs_f64();
    let answered = outcomes.iter().flatten().count();
    let tokens: u64 = outcomes.iter().flatten().sum();
    let (h, t) = (hist.lock().unwrap(), ttft.lock().unwrap());
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        target: target.into(),
        sent: n,
        answered,
        lost: n - answered,
        duplicates: 0,
        cache_hits: 0,
        throughput: answered as f64 / elapsed,
        p50_ms: ms(&h, 0.5),
        p90_ms: ms(&h, 0.9),
        p95_ms: ms(&h, 0.95),
        p99_ms: ms(&h, 0.99),
        max_ms: h.max() as f64 / 1000.0,
        tokens_per_s: tokens as f64 / elapsed,
        ttft_p50_ms: (!t.is_empty()).then(|| ms(&t, 0.5)),
        ttft_p99_ms: (!t.is_empty()).then(|| ms(&t, 0.99)),
        timeline: Vec::new(),
    })
}
