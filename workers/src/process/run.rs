//! Running an admitted job: the cache session, the backend, streamed
//! chunks, in-progress acks and cancellation. Produces a [`Settlement`];
//! the only effects here are those of running (chunks to the reply
//! subject, in-progress acks, the cache).

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, AckKind};
use retro_fleet_schemas::{CacheTier, ErrorBody, ErrorCode, InferResult, Output, Status};
use tokio_util::sync::CancellationToken;

use super::chunks;
use super::decide::{Job, Rejection};
use super::settle::{Settlement, Settling};
use super::shared::Shared;
use crate::backend::{Attempt, BackendError, Checkpoint, Generation};
use crate::cache::{self, Found, Session};
use crate::clock::unix_ms;
use crate::trace;
use opentelemetry::KeyValue;

/// The job's result with `status` and nothing computed yet.
fn blank(sh: &Shared, job: &Job, status: Status, queued_ms: f64) -> InferResult {
    InferResult {
        v: retro_fleet_schemas::SCHEMA_VERSION,
        id: job.req.id.clone(),
        model: job.req.model.clone(),
        model_revision: job.backend.revision(),
        adapter: job.req.adapter.clone(),
        status,
        output: None,
        usage: None,
        cache: CacheTier::None,
        cache_similarity: None,
        cache_entry: None,
        timings: retro_fleet_schemas::Timings { queued_ms, compute_ms: 0.0, total_ms: queued_ms },
        worker: sh.worker_id.clone(),
        error: None,
    }
}

/// A final error result of the job (stored and acked, never retried).
pub fn final_error(sh: &Shared, job: &Job, queued_ms: f64, code: ErrorCode, message: String) -> Settlement {
    let mut result = blank(sh, job, Status::Error, queued_ms);
    result.error = Some(ErrorBody { code, message, retryable: false });
    Settlement::Answer { result: Box::new(result), to: job.ids(), cached: None }
}

/// Runs `fut` while the message's ack timer is re-armed and the request can
/// be cancelled: `None` when it was cancelled first.
struct Guard<'a> {
    msg: &'a jetstream::Message,
    every: Duration,
    id: &'a str,
    cancel: &'a CancellationToken,
}

impl Guard<'_> {
    async fn run<F: Future>(&self, fut: F) -> Option<F::Output> {
        tokio::select! {
            out = with_progress(self.msg, self.every, self.id, fut) => Some(out),
            // dropping the future stops its work (a generation included)
            _ = self.cancel.cancelled() => None,
        }
    }
}

/// Runs `job`, picked from the queue at `picked` after `queued_ms` in it.
pub async fn run(sh: &Shared, m: &Settling<'_>, job: Job, queued_ms: f64, picked: Instant) -> Settlement {
    let cancel = sh.cancels.register(&format!("{}.{}", job.tenant, job.req.id));
    let cancelled = |when: &str, compute_ms: f64| {
        let mut s = final_error(sh, &job, queued_ms, ErrorCode::Cancelled, format!("cancelled by the caller {when}"));
        if let Settlement::Answer { result, .. } = &mut s {
            result.timings.compute_ms = compute_ms;
        }
        s
    };
    if cancel.token.is_cancelled() {
        return cancelled("before it started", 0.0);
    }
    // a third of ack_wait: one late or lost progress ack is not a redelivery
    let every = (sh.ack_wait / 3).max(Duration::from_millis(100));
    let guard = Guard { msg: m.msg, every, id: &job.req.id, cancel: &cancel.token };
    let revision = job.backend.revision().unwrap_or_default();
    let mut session =
        sh.cache.as_ref().and_then(|c| Session::open(c, &job.req, &job.tenant, &revision, job.cache_ttl_secs));
    if let Some(s) = session.as_mut() {
        match trace::in_span("cache lookup", trace::none, Box::pin(from_cache(s, &guard))).await {
            Err(Cancelled(when)) => return cancelled(when, 0.0),
            Ok(Some(found)) => return Box::pin(answer_found(sh, &job, s, found, queued_ms, picked)).await,
            Ok(None) => {}
        }
    }
    // a delivery after the first may find where an earlier one got to
    let resume = match (&sh.checkpoints, job.delivered > 1) {
        (Some(c), true) => Box::pin(c.load(&job.tenant, &job.req.id)).await,
        _ => None,
    };
    let started = Instant::now();
    let generating = async {
        let generated = generate(sh, &job, &guard, resume, &m.checkpointed).await;
        if let Some(Ok(g)) = &generated {
            if let Some(first) = g.first_token {
                trace::event_at("first token", SystemTime::now() - first.elapsed());
            }
            trace::set(|| KeyValue::new("gen_ai.usage.input_tokens", g.usage.prompt_tokens as i64));
            trace::set(|| KeyValue::new("gen_ai.usage.output_tokens", g.usage.completion_tokens as i64));
        }
        generated
    };
    let attrs = || vec![KeyValue::new("gen_ai.request.model", job.req.model.clone())];
    let generated = trace::in_span("generate", attrs, generating).await;
    let compute = started.elapsed();
    sh.metrics.computed(m.priority, m.model_label, compute);
    let compute_ms = compute.as_secs_f64() * 1e3;
    let g = match generated {
        Some(Ok(g)) => {
            let (ttft, tpot) = token_times(&g, queued_ms, picked, started + compute);
            sh.metrics.generated(m.priority, m.model_label, g.computed_tokens, ttft, tpot);
            g
        }
        Some(Err(e)) => {
            abandon(session).await;
            return failure(&job, e, sh.max_deliver);
        }
        None => {
            abandon(session).await;
            return cancelled("while it ran", compute_ms);
        }
    };
    let output = Output {
        text: g.text,
        finish_reason: g.finish_reason,
        tool_calls: g.tool_calls,
        logprobs: g.logprobs,
        embeddings: g.embeddings,
    };
    let cached = match session {
        Some(s) => Some(s.keep(&output, &g.usage, unix_ms()).await),
        None => None,
    };
    let mut result = blank(sh, &job, Status::Ok, queued_ms);
    result.output = Some(output);
    result.usage = Some(g.usage);
    result.timings.compute_ms = compute_ms;
    result.timings.total_ms = queued_ms + picked.elapsed().as_secs_f64() * 1e3;
    Settlement::Answer { result: Box::new(result), to: job.ids(), cached }
}

/// Runs the backend, streaming chunks to the reply subject when asked and
/// writing checkpoints when enabled (`wrote` is set once one is written);
/// `None` when the request was cancelled.
async fn generate(
    sh: &Shared,
    job: &Job,
    guard: &Guard<'_>,
    resume: Option<Checkpoint>,
    wrote: &AtomicBool,
) -> Option<Result<Generation, BackendError>> {
    let (deltas, forwarder) = match (job.req.stream, &job.reply) {
        (true, Some(reply)) => {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let task = tokio::spawn(trace::within(
                trace::current(),
                chunks::forward(sh.client.clone(), reply.clone(), job.req.id.clone(), sh.pace.clone(), rx),
            ));
            (Some(tx), Some(task))
        }
        _ => (None, None),
    };
    let mut attempt = Attempt { deltas, resume, checkpoints: None };
    let generated = match &sh.checkpoints {
        Some(c) => {
            let (to, write) = c.writing(&job.tenant, &job.req.id, wrote);
            attempt.checkpoints = Some(to);
            // the writer ends when the generation drops its sender
            guard.run(async { tokio::join!(job.backend.generate(&job.req, attempt), write).0 }).await
        }
        None => guard.run(job.backend.generate(&job.req, attempt)).await,
    };
    if let Some(task) = forwarder {
        // every chunk is out before the final result (same connection, in order)
        let _ = task.await;
    }
    generated
}

/// Time to the first token (from publish: `queued_ms` before `picked`) and
/// per output token after it (the generation ended at `done`).
fn token_times(g: &Generation, queued_ms: f64, picked: Instant, done: Instant) -> (Option<Duration>, Option<Duration>) {
    let Some(first) = g.first_token else { return (None, None) };
    let ttft = Duration::from_secs_f64(queued_ms / 1e3) + first.saturating_duration_since(picked);
    let tpot = (g.computed_tokens > 1).then(|| done.saturating_duration_since(first) / (g.computed_tokens - 1));
    (Some(ttft), tpot)
}

/// A failed generation: retried while deliveries remain and another
/// attempt may succeed, else given up.
fn failure(job: &Job, e: BackendError, max_deliver: i64) -> Settlement {
    if e.retryable && job.delivered < max_deliver {
        let delay = Duration::from_millis(250 * (1 << job.delivered.clamp(0, 6)) as u64);
        tracing::warn!(id = %job.req.id, model = %job.req.model, error = %e, delivered = job.delivered, ?delay, "retryable backend failure; nak");
        return Settlement::Retry { delay };
    }
    Settlement::GiveUp(Rejection { ids: job.ids(), code: e.code, message: e.message })
}

/// Gives the cache session up after a failed or cancelled generation.
async fn abandon(session: Option<Session>) {
    if let Some(s) = session {
        Box::pin(s.abandon()).await;
    }
}

/// The request was cancelled while it waited (says when).
struct Cancelled(&'static str);

/// An answer from the cache, or from an identical request computed in this
/// worker or (claimed) in another; `None` when this request computes.
async fn from_cache(s: &mut Session, guard: &Guard<'_>) -> Result<Option<Found>, Cancelled> {
    if let Some(found) = s.lookup(unix_ms()).await {
        return Ok(Some(found));
    }
    while let Some(rx) = s.join() {
        match guard.run(cache::follow(rx)).await {
            None => return Err(Cancelled("while it waited for an identical request")),
            Some(Some(answer)) => return Ok(Some(s.coalesced(&answer))),
            // the leader gave up: join again
            Some(None) => {}
        }
    }
    if s.claim().await {
        match guard.run(s.wait_claim()).await {
            None => return Err(Cancelled("while another worker computed it")),
            Some(Some(answer)) => return Ok(Some(s.adopt(answer).await)),
            Some(None) => {}
        }
    }
    Ok(None)
}

/// Answers from the cache (or a shared computation): the text as one chunk
/// first for a streaming request, then the result to store.
async fn answer_found(
    sh: &Shared,
    job: &Job,
    s: &Session,
    found: Found,
    queued_ms: f64,
    picked: Instant,
) -> Settlement {
    if let (true, Some(reply)) = (job.req.stream, &job.reply) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = tx.send(found.answer.output.text.clone());
        drop(tx);
        chunks::forward(sh.client.clone(), reply.clone(), job.req.id.clone(), chunks::Pace::at_once(), rx).await;
    }
    let cached = s.recorded(&found);
    trace::set(|| KeyValue::new("fleet.cache", found.tier.as_str()));
    let mut result = blank(sh, job, Status::Ok, queued_ms);
    result.cache = found.tier;
    result.cache_similarity = found.similarity;
    result.cache_entry = found.entry.map(|k| k.hex());
    result.output = Some(found.answer.output.for_request(&job.req.id));
    result.usage = Some(found.answer.usage);
    result.timings.total_ms = queued_ms + picked.elapsed().as_secs_f64() * 1e3;
    Settlement::Answer { result: Box::new(result), to: job.ids(), cached }
}

/// Runs `fut`, re-arming the message's ack timer every `every` while it runs,
/// so a request still being worked on is never redelivered to another worker.
async fn with_progress<F: Future>(msg: &jetstream::Message, every: Duration, id: &str, fut: F) -> F::Output {
    tokio::pin!(fut);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            _ = ticks.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!(id, error = %e, "in-progress ack failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(tokens: u32, first_token: Option<Instant>) -> Generation {
        Generation {
            text: String::new(),
            finish_reason: "stop".into(),
            tool_calls: Vec::new(),
            logprobs: None,
            embeddings: Vec::new(),
            usage: Default::default(),
            computed_tokens: tokens,
            first_token,
        }
    }

    #[test]
    fn first_token_counts_from_publish_and_per_token_time_from_the_first() {
        let picked = Instant::now();
        let first = picked + Duration::from_millis(40);
        let done = first + Duration::from_millis(90);
        let (ttft, tpot) = token_times(&generation(10, Some(first)), 25.0, picked, done);
        assert_eq!(ttft, Some(Duration::from_millis(65)));
        assert_eq!(tpot, Some(Duration::from_millis(10)));
        // one token has no time between tokens; no token, no first token
        assert_eq!(token_times(&generation(1, Some(first)), 0.0, picked, done).1, None);
        assert_eq!(token_times(&generation(0, None), 5.0, picked, done), (None, None));
    }
}
