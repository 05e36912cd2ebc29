//! `retro-fleet replay`: sends recorded requests again, from the archive
//! (`FLEET_ARCHIVE`, see [`retro_fleet_schemas::archive`]) or from a JSONL
//! file of its records, at their original pacing, N times faster, or as
//! fast as the fleet takes them; with `--compare`, writes a report of which
//! answers are the same as the recorded ones (a shadow test of a new model
//! revision).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use futures::StreamExt;
use retro_fleet_schemas::archive::Recorded;
use retro_fleet_schemas::{codec, headers, subjects, CacheMode, Envelope, InferResult, Status};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::config::Config;

/// `replay`'s options.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Requests published within this age, e.g. 30m, 1h, 7d (default: all
    /// the archive keeps).
    #[arg(long, value_parser = super::cache::parse_age)]
    pub since: Option<Duration>,
    /// Requests published at least this long ago, e.g. 10m.
    #[arg(long, value_parser = super::cache::parse_age)]
    pub until: Option<Duration>,
    /// Only this tenant's requests.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Only requests for this model.
    #[arg(long)]
    pub model: Option<String>,
    /// At most this many requests (the earliest).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Read the records from this JSONL file (written by --save) instead of
    /// the archive.
    #[arg(long, value_name = "JSONL")]
    pub file: Option<PathBuf>,
    /// Write the selected records to this JSONL file instead of sending them.
    #[arg(long, value_name = "JSONL", conflicts_with = "compare")]
    pub save: Option<PathBuf>,
    /// Pacing: `1` as recorded, `20` twenty times faster, `max` as fast as
    /// --concurrency and the fleet allow.
    #[arg(long, default_value = "1", value_parser = parse_speed)]
    pub speed: Speed,
    /// Most requests waiting for their results at once.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Seconds to wait for each result (default: the time its caller
    /// allowed, at most 300; 60 when it set none).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Send every request to this model instead (a shadow test of a new
    /// model or revision).
    #[arg(long, value_name = "MODEL")]
    pub to_model: Option<String>,
    /// The result cache: `bypass` computes every request again.
    #[arg(long, value_enum, default_value = "bypass")]
    pub cache: ReplayCache,
    /// Write a JSON report to this file: the run's figures, and how many
    /// answers are the same as, different from, or failed against the
    /// recorded ones, with the first differences.
    #[arg(long, value_name = "JSON")]
    pub compare: Option<PathBuf>,
}

/// How long a replayed request whose record names no deadline may take.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest a replayed request waits for its result unless `--timeout` says.
const MAX_TIMEOUT: Duration = Duration::from_secs(300);

/// The `Fleet-Caller` of replayed requests: their usage is metered apart
/// from the callers' own.
const CALLER: &str = "replay";

/// The metadata key a replayed request carries: the id it replays.
const REPLAY_OF: &str = "replay_of";

/// Differences written to the report, at most.
const REPORTED_DIFFERENCES: usize = 100;

/// `retro-fleet replay`.
pub async fn replay(config: &Config, args: ReplayArgs) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "replay").await?;
    let js = config.nats.jetstream(client.clone());
    let mut records = match &args.file {
        Some(path) => read_file(path)?,
        None => read_archive(&js, &args).await?,
    };
    let now_ms = retro_fleet_worker::unix_ms();
    let ago = |d: Duration| now_ms.saturating_sub(d.as_millis() as u64);
    let (from_ms, to_ms) = (args.since.map_or(0, ago), args.until.map_or(u64::MAX, ago));
    // replayed requests are recorded too, marked: they are not sent again
    records.retain(|r| {
        (from_ms..=to_ms).contains(&r.at_ms)
            && args.tenant.as_deref().is_none_or(|t| t == r.tenant)
            && args.model.as_deref().is_none_or(|m| m == r.request.model)
            && !r.request.metadata.contains_key(REPLAY_OF)
    });
    records.sort_by_key(|r| r.at_ms);
    if let Some(n) = args.limit {
        records.truncate(n);
    }
    if let Some(path) = &args.save {
        save(path, &records)?;
        eprintln!("saved {} recorded request(s) to {}", records.len(), path.display());
        return Ok(());
    }
    if records.is_empty() {
        anyhow::bail!(
            "no recorded request matches (is the archive on? set topology.archive_max_age_secs and run \
             `retro-fleet topology apply`)"
        );
    }
    let run = send_all(&client, &js, &args, &records).await?;
    let summary = run.summary(&records, args.speed);
    eprint!("{}", summary.text);
    if let Some(path) = &args.compare {
        let report = compare(&records, &run.answers);
        let (same, total) = (report["same"].as_u64().unwrap_or(0), records.len() as f64);
        eprintln!(
            "compare: {same} same ({:.1} %), {} different, {} failed; report in {}",
            same as f64 * 100.0 / total,
            report["different"],
            report["failed"],
            path.display()
        );
        let mut doc = summary.json;
        doc.as_object_mut().expect("an object").extend(report.as_object().expect("an object").clone());
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The records of a JSONL file written by `replay --save`.
fn read_file(path: &Path) -> anyhow::Result<Vec<Recorded>> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Recorded = serde_json::from_str(&line).with_context(|| {
            format!("{}:{}: not a recorded request (write one with `replay --save`)", path.display(), n + 1)
        })?;
        out.push(r);
    }
    Ok(out)
}

/// Writes `records` as JSONL, one record per line.
fn save(path: &Path, records: &[Recorded]) -> anyhow::Result<()> {
    let mut out =
        std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?);
    for r in records {
        serde_json::to_writer(&mut out, r)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// The archived requests of the tenant and model asked for, from those
/// settled within `--since`.
async fn read_archive(js: &async_nats::jetstream::Context, args: &ReplayArgs) -> anyhow::Result<Vec<Recorded>> {
    let stream = js.get_stream(subjects::ARCHIVE_STREAM).await.context(
        "the archive stream is missing: set topology.archive_max_age_secs and run `retro-fleet topology apply`",
    )?;
    // a record is written when its request is settled, after it was published
    let deliver_policy = match args.since {
        Some(age) => DeliverPolicy::ByStartTime { start_time: time::OffsetDateTime::now_utc() - age },
        None => DeliverPolicy::All,
    };
    let filter = subjects::archive(args.tenant.as_deref().unwrap_or("*"), args.model.as_deref().unwrap_or("*"));
    let consumer = stream
        .create_consumer(pull::OrderedConfig { filter_subject: filter, deliver_policy, ..Default::default() })
        .await?;
    let pending = consumer.cached_info().num_pending;
    let bar = bar(pending, "reading the archive {bar:40} {pos}/{len}");
    let mut out = Vec::new();
    if pending > 0 {
        let mut messages = consumer.messages().await?;
        for _ in 0..pending {
            let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
            let m = next.ok().flatten().context("the archive stopped answering")??;
            bar.inc(1);
            match codec::decode::<Recorded>(None, &m.payload) {
                Ok(r) => out.push(r),
                Err(e) => tracing::warn!(subject = %m.subject, error = %e, "an archive record is unreadable; skipped"),
            }
            // the oldest records may be dropped while this reads
            if m.info().is_ok_and(|i| i.pending == 0) {
                break;
            }
        }
    }
    bar.finish_and_clear();
    Ok(out)
}

fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(indicatif::ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    bar
}

/// What became of one replayed request.
struct Answer {
    /// Its result, or why there is none.
    result: Result<InferResult, String>,
    /// Publish to result.
    latency: Duration,
    /// How late it was sent against its schedule.
    lag: Duration,
}

/// A replay's answers, by record index, and how long it took.
struct Run {
    answers: Vec<Option<Answer>>,
    elapsed: Duration,
}

/// Results waited for, by the index of their record.
type Waiting = Arc<Mutex<HashMap<usize, oneshot::Sender<InferResult>>>>;

/// Sends every record at its time (`--speed`), at most `--concurrency` at
/// once, and collects their results.
async fn send_all(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    args: &ReplayArgs,
    records: &[Recorded],
) -> anyhow::Result<Run> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.*")).await?;
    let waiting: Waiting = Arc::default();
    let demux = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Some(m) = replies.next().await {
                let kind = m.headers.as_ref().and_then(|h| h.get(headers::KIND)).map(|v| v.as_str().to_string());
                if kind.as_deref() != Some(headers::KIND_RESULT) {
                    continue; // a stream chunk
                }
                let index = m.subject.rsplit('.').next().and_then(|i| i.parse::<usize>().ok());
                let Some(tx) = index.and_then(|i| waiting.lock().expect("waiting").remove(&i)) else { continue };
                if let Ok(r) = codec::decode::<InferResult>(None, &m.payload) {
                    let _ = tx.send(r);
                }
            }
        })
    };
    let bar = bar(records.len() as u64, "replaying {bar:40} {pos}/{len} answered ({per_sec}, eta {eta}) {msg}");
    let (done_tx, mut done) = mpsc::unbounded_channel::<(usize, Answer)>();
    let slots = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let start = Instant::now();
    let first_ms = records.first().map_or(0, |r| r.at_ms);
    let scheduler = {
        let (js, records, waiting) = (js.clone(), records.to_vec(), waiting.clone());
        let (speed, to_model, cache) = (args.speed, args.to_model.clone(), args.cache);
        let timeout = args.timeout.map(Duration::from_secs);
        tokio::spawn(async move {
            for (i, r) in records.into_iter().enumerate() {
                let due = match speed {
                    Speed::Max => start,
                    Speed::Times(x) => start + Duration::from_secs_f64((r.at_ms - first_ms) as f64 / 1000.0 / x),
                };
                tokio::time::sleep_until(due.into()).await;
                let permit = slots.clone().acquire_owned().await.expect("never closed");
                let lag = Instant::now().saturating_duration_since(due);
                let (js, waiting, done) = (js.clone(), waiting.clone(), done_tx.clone());
                let request = resend(r, to_model.as_deref(), cache);
                let reply = format!("{inbox}.{i}");
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let result = one(&js, &waiting, i, request, reply, timeout).await;
                    drop(permit);
                    let _ = done.send((i, Answer { result, latency: sent.elapsed(), lag }));
                });
            }
        })
    };
    let mut answers: Vec<Option<Answer>> = (0..records.len()).map(|_| None).collect();
    let mut failed = 0;
    for _ in 0..records.len() {
        let Some((i, a)) = done.recv().await else { break };
        failed += usize::from(!a.result.as_ref().is_ok_and(|r| r.status == Status::Ok));
        answers[i] = Some(a);
        bar.inc(1);
        if failed > 0 {
            bar.set_message(format!("{failed} failed"));
        }
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    scheduler.abort();
    demux.abort();
    Ok(Run { answers, elapsed })
}

/// How fast to replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// The recorded pacing, this many times faster.
    Times(f64),
    /// As fast as `--concurrency` and the fleet allow.
    Max,
}

/// Parses `--speed`: `max`, or a factor like `1`, `20`, `0.5`.
pub fn parse_speed(s: &str) -> Result<Speed, String> {
    if s == "max" {
        return Ok(Speed::Max);
    }
    match s.trim_start_matches(['x', '×']).parse::<f64>() {
        Ok(x) if x > 0.0 && x.is_finite() => Ok(Speed::Times(x)),
        _ => Err(format!("`{s}` is not a speed: use a factor like 1, 20 or 0.5, or `max`")),
    }
}

/// How a replay uses the result cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReplayCache {
    /// Every replayed request is computed, and nothing is cached.
    Bypass,
    /// As the recorded request asked.
    Original,
    /// Computed, and the cache overwritten with the new answers.
    Refresh,
}

/// The request to send again for `r`: a new id, its deadline to come.
fn resend(r: Recorded, to_model: Option<&str>, cache: ReplayCache) -> (Recorded, String) {
    let mut r = r;
    let original = std::mem::replace(&mut r.request.id, ulid::Ulid::new().to_string());
    r.request.metadata.insert(REPLAY_OF.into(), original);
    if let Some(m) = to_model {
        r.request.model = m.to_string();
    }
    r.request.cache = match cache {
        ReplayCache::Bypass => CacheMode::Bypass,
        ReplayCache::Refresh => CacheMode::Refresh,
        ReplayCache::Original => r.request.cache,
    };
    // only the result is waited for
    r.request.stream = false;
    let subject = subjects::tenant_request(r.priority, &r.request.model, &r.tenant);
    (r, subject)
}

/// Publishes one request and waits for its result.
async fn one(
    js: &async_nats::jetstream::Context,
    waiting: &Waiting,
    i: usize,
    (r, subject): (Recorded, String),
    reply: String,
    timeout: Option<Duration>,
) -> Result<InferResult, String> {
    let recorded = r.timeout_ms.map_or(DEFAULT_TIMEOUT, |ms| Duration::from_millis(ms).min(MAX_TIMEOUT));
    let timeout = timeout.unwrap_or(recorded);
    let (tx, rx) = oneshot::channel();
    waiting.lock().expect("waiting").insert(i, tx);
    let deadline = retro_fleet_worker::unix_ms().saturating_add(timeout.as_millis() as u64);
    let h = Envelope::new(r.request.id.as_str())
        .tenant(r.tenant.as_str())
        .caller(CALLER)
        .reply(reply)
        .deadline_ms(deadline)
        .headers();
    let published = async { js.publish_with_headers(subject, h, codec::encode(&r.request).into()).await?.await };
    if let Err(e) = published.await {
        waiting.lock().expect("waiting").remove(&i);
        return Err(format!("publishing failed: {e}"));
    }
    // a second to spare past the deadline, for a worker's deadline answer
    match tokio::time::timeout(timeout + Duration::from_secs(1), rx).await {
        Ok(Ok(result)) => Ok(result),
        _ => {
            waiting.lock().expect("waiting").remove(&i);
            Err(format!("no result within {} ms", timeout.as_millis()))
        }
    }
}

/// What a run did, for people and as JSON.
struct Summary {
    text: String,
    json: Value,
}

impl Run {
    fn summary(&self, records: &[Recorded], speed: Speed) -> Summary {
        let answers: Vec<&Answer> = self.answers.iter().flatten().collect();
        let ok = answers.iter().filter(|a| a.result.as_ref().is_ok_and(|r| r.status == Status::Ok)).count();
        let unanswered = answers.iter().filter(|a| a.result.is_err()).count();
        let mut codes: BTreeMap<String, usize> = BTreeMap::new();
        for a in &answers {
            if let Ok(InferResult { error: Some(e), .. }) = &a.result {
                *codes.entry(e.code.as_str().to_string()).or_default() += 1;
            }
        }
        let span = records.last().map_or(0, |l| l.at_ms - records[0].at_ms) as f64 / 1000.0;
        let expected = match speed {
            Speed::Times(x) => Some(span / x),
            Speed::Max => None,
        };
        let elapsed = self.elapsed.as_secs_f64();
        let mut latencies: Vec<Duration> = answers.iter().filter(|a| a.result.is_ok()).map(|a| a.latency).collect();
        let mut lags: Vec<Duration> = answers.iter().map(|a| a.lag).collect();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (p50, p95, p99) = (pct(&mut latencies, 0.5), pct(&mut latencies, 0.95), pct(&mut latencies, 0.99));
        let (lag95, lag_max) = (pct(&mut lags, 0.95), lags.iter().max().copied().unwrap_or_default());
        let pacing = match (speed, expected) {
            (Speed::Times(x), Some(e)) => format!("expected {e:.1} s: a {span:.1} s span at ×{x}"),
            _ => "as fast as the fleet took them".to_string(),
        };
        let errors: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let text = format!(
            "replayed {} requests in {elapsed:.1} s ({pacing}), {:.1} req/s\n\
             ok {ok}, errors {} {}, no result {unanswered}\n\
             latency (publish to result): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms; sent late by p95 {:.1} ms, \
             at most {:.1} ms\n",
            records.len(),
            records.len() as f64 / elapsed.max(1e-9),
            codes.values().sum::<usize>(),
            if errors.is_empty() { String::new() } else { format!("({})", errors.join(", ")) },
            ms(p50),
            ms(p95),
            ms(p99),
            ms(lag95),
            ms(lag_max),
        );
        let json = json!({
            "requests": records.len(), "elapsed_secs": elapsed, "expected_secs": expected, "span_secs": span,
            "ok": ok, "errors": codes, "no_result": unanswered,
            "latency_ms": {"p50": ms(p50), "p95": ms(p95), "p99": ms(p99)},
            "late_ms": {"p95": ms(lag95), "max": ms(lag_max)},
        });
        Summary { text, json }
    }
}

/// The `q` quantile of `xs` (sorted here); zero when empty.
fn pct(xs: &mut [Duration], q: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    xs.sort_unstable();
    xs[((xs.len() - 1) as f64 * q).round() as usize]
}

/// How a replayed answer compares with the recorded one.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The same answer (or the same error code).
    Same,
    /// Both answered, differently.
    Different,
    /// The replay got no answer, or an error where the record has one.
    Failed,
}

fn verdict(recorded: &InferResult, replayed: Option<&Result<InferResult, String>>) -> Verdict {
    let Some(Ok(now)) = replayed else { return Verdict::Failed };
    let code = |r: &InferResult| r.error.as_ref().map(|e| e.code);
    let answer = |r: &InferResult| r.output.as_ref().map(|o| (o.text.clone(), o.tool_calls.clone()));
    match (recorded.status, now.status) {
        (Status::Ok, Status::Ok) if answer(recorded) == answer(now) => Verdict::Same,
        (Status::Ok, Status::Ok) => Verdict::Different,
        (Status::Ok, _) => Verdict::Failed,
        _ if code(recorded) == code(now) && now.status == recorded.status => Verdict::Same,
        _ => Verdict::Different,
    }
}

/// Same, different and failed answers against the recorded ones, with the
/// first differences.
fn compare(records: &[Recorded], answers: &[Option<Answer>]) -> Value {
    let (mut same, mut different, mut failed) = (0, 0, 0);
    let mut shown = Vec::new();
    for (r, a) in records.iter().zip(answers) {
        let replayed = a.as_ref().map(|a| &a.result);
        let v = verdict(&r.result, replayed);
        match v {
            Verdict::Same => same += 1,
            Verdict::Different => different += 1,
            Verdict::Failed => failed += 1,
        }
        if v != Verdict::Same && shown.len() < REPORTED_DIFFERENCES {
            let got = match replayed {
                Some(Ok(now)) => json!({"id": now.id, "status": now.status, "output": now.output, "error": now.error}),
                Some(Err(why)) => json!({"error": why}),
                None => json!({"error": "not sent"}),
            };
            shown.push(json!({
                "verdict": if v == Verdict::Different { "different" } else { "failed" },
                "recorded_id": r.request.id, "tenant": r.tenant, "model": r.request.model,
                "recorded": {"status": r.result.status, "output": r.result.output, "error": r.result.error},
                "replayed": got,
            }));
        }
    }
    json!({"same": same, "different": different, "failed": failed, "differences": shown})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(text: &str) -> InferResult {
        let mut r = InferResult::error("r", "m", retro_fleet_schemas::ErrorCode::Internal, "x");
        r.status = Status::Ok;
        r.error = None;
        r.output = Some(retro_fleet_schemas::Output::text(text, "stop"));
        r
    }

    #[test]
    fn answers_compare_by_text_and_errors_by_code() {
        let failed = InferResult::error("r", "m", retro_fleet_schemas::ErrorCode::DeadlineExceeded, "late");
        assert_eq!(verdict(&answered("a"), Some(&Ok(answered("a")))), Verdict::Same);
        assert_eq!(verdict(&answered("a"), Some(&Ok(answered("b")))), Verdict::Different);
        assert_eq!(verdict(&answered("a"), Some(&Ok(failed.clone()))), Verdict::Failed);
        assert_eq!(verdict(&answered("a"), Some(&Err("no result".into()))), Verdict::Failed);
        assert_eq!(verdict(&answered("a"), None), Verdict::Failed);
        assert_eq!(verdict(&failed, Some(&Ok(failed.clone()))), Verdict::Same);
        assert_eq!(verdict(&failed, Some(&Ok(answered("a")))), Verdict::Different);
    }

    #[test]
    fn speeds_are_factors_or_max() {
        assert_eq!(parse_speed("20"), Ok(Speed::Times(20.0)));
        assert_eq!(parse_speed("x2.5"), Ok(Speed::Times(2.5)));
        assert_eq!(parse_speed("max"), Ok(Speed::Max));
        assert!(parse_speed("0").is_err());
        assert!(parse_speed("fast").is_err());
    }
}
