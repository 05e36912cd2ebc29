//! Running a batch created from a file.
//!
//! A created batch is one message on `FLEET_BATCH_RUNS`. Every ingress
//! pulls from its consumer, running at most `ingress.batch_runners`
//! batches at once; the message held is the lease on the batch, re-armed
//! every third of the consumer's ack wait (`topology.batch_lease_secs`), so
//! a batch whose ingress dies is taken over by another within it, and
//! acknowledged when the batch ends.
//!
//! A runner feeds the batch's lines to the fleet in order, at most
//! `ingress.batch_max_in_flight` at a time, so a batch of any size takes a
//! bounded share of its class and interactive traffic in higher classes
//! goes first. Each line is charged and published as a request
//! `<batch id>-<line>` whose result the runner waits for; what it learns
//! is kept in the batch's [`Progress`] once a second. A runner taking over
//! looks up the results of the lines sent before (they ran on while no one
//! waited) and goes on from there; a line sent twice within the duplicate
//! window runs once.
//!
//! Every second it also looks for a cancel and for the end of the
//! window: then nothing more is sent, running lines are cancelled, and
//! after their results (at most [`SETTLE`]) the batch ends. Its output and
//! error files are written from the stored results, in line order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::AckKind;
use axum::http::HeaderMap as HttpHeaders;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use retro_fleet_schemas::{subjects, ErrorCode, InferResult, Status};

use super::lines;
use super::{cancel_asked, load_progress, save, save_progress, BatchStatus, Progress, Record};
use crate::ingress::auth::Principal;
use crate::ingress::error::{ApiCode, ApiError, IngressCode};
use crate::ingress::principal::{Ceilings, Role, Roles};
use crate::ingress::state::AppState;
use crate::ingress::submit;
use crate::ingress::{files, webhooks};

/// How long a stopped batch waits for its cancelled lines' results.
pub const SETTLE: Duration = Duration::from_secs(5);

/// Takes batches to run from `runs` until the ingress drains.
pub fn start(state: AppState, runs: PullConsumer) {
    let lease = runs.cached_info().config.ack_wait;
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(state.cfg.batch_runners.max(1)));
        loop {
            let taken = tokio::select! {
                _ = state.drain.beginning() => return,
                t = take(&runs, slots.clone()) => t,
            };
            match taken {
                Ok(Some((msg, slot))) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        run(state, msg, lease).await;
                        drop(slot);
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "taking a batch to run failed; trying again");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    });
}

/// The next batch to run, once a slot is free (`None`: none waiting).
async fn take(
    runs: &PullConsumer,
    slots: Arc<tokio::sync::Semaphore>,
) -> anyhow::Result<Option<(async_nats::jetstream::Message, tokio::sync::OwnedSemaphorePermit)>> {
    let slot = slots.acquire_owned().await?;
    let mut batch = runs.batch().max_messages(1).expires(Duration::from_secs(5)).messages().await?;
    match batch.next().await {
        Some(m) => Ok(Some((m.map_err(|e| anyhow::anyhow!(e))?, slot))),
        None => Ok(None),
    }
}

/// What became of a run.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The batch ended (or is gone): its message is done with.
    Ended,
    /// Not finished here (the ingress drains, or NATS failed): another
    /// runner takes it up.
    Interrupted,
}

/// Runs the batch of `msg`, holding its lease.
async fn run(state: AppState, msg: async_nats::jetstream::Message, lease: Duration) {
    let parsed = msg.subject.strip_prefix("fleet.batch.run.").and_then(|r| r.split_once('.'));
    let Some((tenant, id)) = parsed.map(|(t, i)| (t.to_string(), i.to_string())) else {
        tracing::warn!(subject = %msg.subject, "not a batch run; dropped");
        let _ = msg.ack().await;
        return;
    };
    let msg = Arc::new(msg);
    let lease = {
        let msg = msg.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!(error = %e, "re-arming a batch's lease failed");
                }
            }
        })
    };
    state.metrics.batches_running.inc();
    let outcome = match Runner::new(&state, &tenant, &id).await {
        Ok(Some(r)) => r.drive().await,
        Ok(None) => Outcome::Ended,
        Err(e) => {
            tracing::warn!(batch = %id, error = %e.message, "starting the batch failed; it will be taken up again");
            Outcome::Interrupted
        }
    };
    state.metrics.batches_running.dec();
    lease.abort();
    let settled = match outcome {
        Outcome::Ended => msg.ack().await,
        Outcome::Interrupted => msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await,
    };
    if let Err(e) = settled {
        tracing::warn!(batch = %id, error = %e, "settling a batch's run failed; it may be taken up again");
    }
}

/// One line sent, waiting for its result.
type Running = BoxFuture<'static, (usize, Option<InferResult>)>;

/// What sending a line did.
enum Sent {
    /// It runs.
    Running(Running),
    /// It can never run: malformed, or refused for good by a rate limit
    /// it is larger than (`Some`: why, as reading the line again would
    /// not say).
    Refused(Option<String>),
    /// Not now: try again in this many seconds (a full queue, a rate limit).
    Later(u64),
    /// Nothing more of the batch may run (its budget is spent).
    Stop(ApiError),
}

/// The state of one batch being run.
struct Runner {
    state: AppState,
    record: Record,
    /// The credential that created it.
    who: Principal,
    /// The input file.
    input: String,
    /// Byte ranges of its lines in `input`.
    lines: Vec<std::ops::Range<usize>>,
    progress: Progress,
    /// Lines refused for reasons reading them again would not give.
    refused: HashMap<usize, String>,
    /// Why the input file could not be read (it was deleted): the batch
    /// fails.
    lost: Option<ApiError>,
}

impl Runner {
    /// The runner of batch `id` of `tenant` (`None`: it ended or is gone).
    async fn new(state: &AppState, tenant: &str, id: &str) -> Result<Option<Runner>, ApiError> {
        let record = match super::load(state, tenant, id).await {
            Ok(r) => r,
            Err(e) if e.code == ApiCode::Wire(ErrorCode::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(f) = record.file.clone().filter(|f| !f.status.ended()) else { return Ok(None) };
        // an input file deleted while its batch runs ends the batch
        let (data, lost) = match files::read(&state.files, tenant, &f.input_file_id).await {
            Ok(data) => (data, None),
            Err(e) if e.code == ApiCode::Wire(ErrorCode::NotFound) => {
                let why = format!("the input file {} was deleted before the batch ended", f.input_file_id);
                (Vec::new(), Some(ApiError::new(ErrorCode::NotFound, why).param("input_file_id")))
            }
            Err(e) => return Err(e),
        };
        let input = String::from_utf8(data).map_err(|_| ApiError::new(ErrorCode::Internal, "input not UTF-8"))?;
        let lines = lines::of(&input)
            .into_iter()
            .map(|l| {
                let at = l.as_ptr() as usize - input.as_ptr() as usize;
                at..at + l.len()
            })
            .collect();
        let mut who = Principal::new(f.caller.clone(), tenant, Roles::of([Role::Submit]));
        who.ceilings = Ceilings::NONE;
        who.budget = f.budget;
        let progress = load_progress(state, &record).await;
        Ok(Some(Runner { state: state.clone(), record, who, input, lines, progress, refused: HashMap::new(), lost }))
    }

    fn line(&self, i: usize) -> &str {
        &self.input[self.lines[i].clone()]
    }

    fn total(&self) -> usize {
        self.record.total
    }

    /// Feeds the lines until the batch ends, is stopped, or the ingress drains.
    async fn drive(mut self) -> Outcome {
        let state = self.state.clone();
        let f = self.record.file.clone().expect("a file batch");
        if let Some(e) = &self.lost {
            // with no lines to read, lines still running are only cancelled
            let sent: Vec<usize> = (0..self.progress.next).filter(|i| !self.progress.is_done(*i)).collect();
            self.cancel(&sent).await;
            let error = e.body()["error"].clone();
            self.record.file.as_mut().expect("a file batch").errors.push(error);
            return self.finish(BatchStatus::Failed).await;
        }
        let cap = state.cfg.batch_max_in_flight.max(1);
        let mut running: FuturesUnordered<Running> = FuturesUnordered::new();
        let mut in_flight: HashSet<usize> = HashSet::new();
        // sent before this runner: they ran on with no one waiting
        let mut orphans: Vec<usize> = (0..self.progress.next).filter(|i| !self.progress.is_done(*i)).collect();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut hold: Option<Instant> = None;
        let mut stop: Option<(BatchStatus, Option<ApiError>)> = None;
        let mut dirty = false;
        let end = loop {
            if f.status == BatchStatus::Finalizing {
                break self.ending().await;
            }
            if let Some(s) = stop.take() {
                // running lines are cancelled as their waiters drop
                state.metrics.batch_in_flight.sub(in_flight.len() as i64);
                orphans.extend(in_flight.drain());
                drop(std::mem::take(&mut running));
                self.settle(&mut orphans, s.0 != BatchStatus::Completed).await;
                if let Some(e) = s.1 {
                    self.record.file.as_mut().expect("a file batch").errors.push(e.body()["error"].clone());
                }
                break s.0;
            }
            if hold.is_none_or(|t| Instant::now() >= t) {
                hold = None;
                while in_flight.len() + orphans.len() < cap && self.progress.next < self.total() {
                    let i = self.progress.next;
                    match self.send(i).await {
                        Sent::Running(r) => {
                            running.push(r);
                            in_flight.insert(i);
                            state.metrics.batch_in_flight.inc();
                        }
                        Sent::Refused(why) => {
                            if let Some(why) = why {
                                self.refused.insert(i, why);
                            }
                            self.count(i, false);
                        }
                        Sent::Later(secs) => {
                            hold = Some(Instant::now() + Duration::from_secs(secs.max(1)));
                            break;
                        }
                        Sent::Stop(e) => {
                            stop = Some((BatchStatus::Failed, Some(e)));
                            break;
                        }
                    }
                    self.progress.next += 1;
                    dirty = true;
                }
                if stop.is_some() {
                    continue;
                }
            }
            if self.progress.next >= self.total() && in_flight.is_empty() && orphans.is_empty() {
                break BatchStatus::Completed;
            }
            tokio::select! {
                Some((i, r)) = running.next(), if !running.is_empty() => {
                    in_flight.remove(&i);
                    state.metrics.batch_in_flight.dec();
                    match r {
                        Some(r) => self.count(i, r.status == Status::Ok),
                        None => orphans.push(i),
                    }
                    dirty = true;
                }
                _ = tick.tick() => {
                    dirty |= self.look_up(&mut orphans).await;
                    if dirty {
                        save_progress(&state, &self.record, &self.progress).await;
                        dirty = false;
                    }
                    if cancel_asked(&state, &self.record).await.is_some() {
                        stop = Some((BatchStatus::Cancelled, None));
                    } else if super::now_secs() >= f.expires_at {
                        stop = Some((BatchStatus::Expired, None));
                    }
                }
                _ = state.drain.beginning() => {
                    state.metrics.batch_in_flight.sub(in_flight.len() as i64);
                    save_progress(&state, &self.record, &self.progress).await;
                    return Outcome::Interrupted;
                }
            }
        };
        save_progress(&state, &self.record, &self.progress).await;
        self.finish(end).await
    }

    /// How a batch found `finalizing` (its runner died writing its files) ends.
    async fn ending(&self) -> BatchStatus {
        let f = self.record.file.as_ref().expect("a file batch");
        if !f.errors.is_empty() {
            BatchStatus::Failed
        } else if cancel_asked(&self.state, &self.record).await.is_some() {
            BatchStatus::Cancelled
        } else if self.progress.next < self.total() {
            BatchStatus::Expired
        } else {
            BatchStatus::Completed
        }
    }

    /// Counts line `i` finished.
    fn count(&mut self, i: usize, ok: bool) {
        let total = self.total();
        if !self.progress.is_done(i) {
            let outcome = if ok { "completed" } else { "failed" };
            self.state.metrics.batch_lines.with_label_values(&[outcome]).inc();
        }
        self.progress.finish(i, total, ok);
    }

    /// Charges and publishes line `i`.
    async fn send(&self, i: usize) -> Sent {
        let state = &self.state;
        let f = self.record.file.as_ref().expect("a file batch");
        let left = f.expires_at.saturating_sub(super::now_secs()).clamp(1, state.cfg.batch_timeout_secs.max(1));
        let line = lines::prepare(
            state,
            &HttpHeaders::new(),
            &self.who,
            &self.record.id,
            self.record.priority,
            Duration::from_secs(left),
            (i, self.line(i)),
            Some(&self.record.endpoint),
        );
        let Ok(line) = line else { return Sent::Refused(None) };
        let mut p = line.request;
        // kept until the output file is written, whichever runner writes it
        p.result_ttl = Some(state.results_max_age_secs);
        if let Err(e) = submit::charge_batch(state, &self.who, &p.req.id, std::slice::from_ref(&p)).await {
            return match (e.code, e.retry_after) {
                (ApiCode::Ingress(IngressCode::BudgetExceeded), _) => Sent::Stop(e),
                (_, Some(secs)) => Sent::Later(secs),
                _ => Sent::Refused(Some(e.message)),
            };
        }
        match submit::register_and_send(state, &p).await {
            Ok(mut waiter) => {
                let wait = p.timeout + Duration::from_secs(30);
                Sent::Running(Box::pin(async move {
                    let r = tokio::time::timeout(wait, waiter.result()).await;
                    if r.is_err() {
                        // the reply was lost: its stored result is looked up
                        waiter.disarm();
                    }
                    (i, r.ok().flatten())
                }))
            }
            Err(e) => Sent::Later(e.retry_after.unwrap_or(1)),
        }
    }

    /// Looks up the stored results of `orphans`, counting those found;
    /// whether any was.
    async fn look_up(&mut self, orphans: &mut Vec<usize>) -> bool {
        if orphans.is_empty() {
            return false;
        }
        let found = super::results(&self.state, &self.record, orphans.iter().copied()).await;
        let any = !found.is_empty();
        for (i, r) in found {
            self.count(i, r.status == Status::Ok);
        }
        orphans.retain(|i| !self.progress.is_done(*i));
        any
    }

    /// Cancels `orphans` (when `cancel`) and waits up to [`SETTLE`] for
    /// their results.
    async fn settle(&mut self, orphans: &mut Vec<usize>, cancel: bool) {
        if cancel {
            self.cancel(orphans).await;
        }
        let until = Instant::now() + SETTLE;
        while !orphans.is_empty() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(250)).await;
            self.look_up(orphans).await;
        }
    }

    /// Asks for lines `sent` to be cancelled.
    async fn cancel(&self, sent: &[usize]) {
        for i in sent {
            let subject = subjects::cancel(&self.record.tenant, &lines::request_id(&self.record.id, *i));
            let _ = self.state.client.publish(subject, Bytes::new()).await;
        }
    }

    /// Writes the output and error files and ends the batch as `end`.
    async fn finish(mut self, end: BatchStatus) -> Outcome {
        let state = self.state.clone();
        let now = super::now_secs();
        let cancel_at = cancel_asked(&state, &self.record).await;
        {
            let f = self.record.file.as_mut().expect("a file batch");
            f.status = BatchStatus::Finalizing;
            f.at.entry(BatchStatus::Finalizing).or_insert(now);
            if let Some(t) = cancel_at {
                f.at.entry(BatchStatus::Cancelling).or_insert(t);
            }
        }
        if save(&state, &self.record).await.is_err() {
            return Outcome::Interrupted;
        }
        let (output, errors) = self.files(end).await;
        let id = self.record.id.clone();
        let tenant = self.record.tenant.clone();
        let mut written = Vec::new();
        for (data, suffix) in [(output, "output"), (errors, "error")] {
            if data.is_empty() {
                written.push(None);
                continue;
            }
            let name = format!("{id}_{suffix}.jsonl");
            match files::put(&state.files, &tenant, files::BATCH_OUTPUT, &name, &data).await {
                Ok(file) => written.push(Some(file.id)),
                Err(e) => {
                    tracing::warn!(batch = %id, error = %e.message, "writing a batch's file failed; trying again");
                    return Outcome::Interrupted;
                }
            }
        }
        let f = self.record.file.as_mut().expect("a file batch");
        f.output_file_id = written[0].clone();
        f.error_file_id = written[1].clone();
        f.status = end;
        f.at.insert(end, super::now_secs());
        // queued before the batch is seen ended: a retry queues the same
        // event id, which the duplicate window keeps once
        if let Some(url) = f.callback_url.clone() {
            let batch = super::view(&state, &self.record, &self.progress, None);
            let (event_id, kind) = (format!("evt_{id}_{}", end.as_str()), format!("batch.{}", end.as_str()));
            let event = webhooks::Event::new(event_id, kind, &tenant, url, batch, super::now_secs());
            if let Err(e) = webhooks::enqueue(&state.js, &event).await {
                tracing::warn!(batch = %id, error = %e, "queueing the batch's webhook failed; trying again");
                return Outcome::Interrupted;
            }
        }
        if save(&state, &self.record).await.is_err() {
            return Outcome::Interrupted;
        }
        tracing::info!(
            batch = %id, status = end.as_str(), completed = self.progress.completed, failed = self.progress.failed,
            "batch ended"
        );
        Outcome::Ended
    }

    /// The output file (lines answered) and the error file (lines failed,
    /// refused, or expired before they ran), in line order.
    async fn files(&self, end: BatchStatus) -> (Vec<u8>, Vec<u8>) {
        if self.lost.is_some() || self.lines.len() < self.total() {
            // the input is gone: no line can be named (the batch's errors say why)
            return (Vec::new(), Vec::new());
        }
        let kind = lines::endpoint_of(&self.record.endpoint);
        let done = (0..self.total()).filter(|i| self.progress.is_done(*i));
        let found: HashMap<usize, InferResult> =
            super::results(&self.state, &self.record, done).await.into_iter().collect();
        let (mut output, mut errors) = (Vec::new(), Vec::new());
        let id = &self.record.id;
        for i in 0..self.total() {
            let raw = self.line(i);
            let custom = lines::custom_id(raw);
            let (ok, line) = if let Some(r) = found.get(&i) {
                lines::output(kind, custom.as_deref().unwrap_or(""), r)
            } else if self.progress.is_done(i) {
                let (code, why) = match self.refused.get(&i) {
                    Some(why) => ("rate_limited".to_string(), why.clone()),
                    None => self.why_refused(i),
                };
                (false, lines::refused(id, i, custom.as_deref(), &code, &why))
            } else if end == BatchStatus::Expired && i >= self.progress.next {
                let why = "the batch's completion window ended before this line ran";
                (false, lines::refused(id, i, custom.as_deref(), "batch_expired", why))
            } else {
                continue;
            };
            let out = if ok { &mut output } else { &mut errors };
            serde_json::to_writer(&mut *out, &line).expect("JSON writes");
            out.push(b'\n');
        }
        (output, errors)
    }

    /// Why line `i`, counted finished without a stored result, did not
    /// run: an error code and message.
    fn why_refused(&self, i: usize) -> (String, String) {
        let f = self.record.file.as_ref().expect("a file batch");
        let read = lines::prepare(
            &self.state,
            &HttpHeaders::new(),
            &self.who,
            &self.record.id,
            self.record.priority,
            Duration::from_secs(1),
            (i, self.line(i)),
            Some(&self.record.endpoint),
        );
        let gone = |m: &str| ("result_missing".to_string(), m.to_string());
        match read {
            Err(e) => (e.code_str().to_string(), e.message),
            Ok(_) if f.errors.is_empty() => gone("its result is no longer stored (topology.results_max_age_secs)"),
            Ok(_) => gone("not run: the batch failed (see its errors)"),
        }
    }
}
