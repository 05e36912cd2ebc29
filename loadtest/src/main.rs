//! Load generator for retro-fleet over NATS.
//!
//! Sends requests to the fleet's request streams with a reply subject and
//! measures the round trip to the reply, either with a fixed window of
//! requests in flight or open-loop at a rate. `--floor` also measures the
//! bare JetStream round trip (publish with a reply header → pull → reply →
//! ack, no retro-fleet code) in the same run, alternating rounds, and prints
//! the ratio fleet/floor.
//!
//! `--http NAME=URL` (repeatable) loads ingresses over HTTP instead
//! (`POST /v1/infer`, or `/v1/chat/completions` with `--api openai`, which
//! any OpenAI-compatible server answers), alternating rounds between them; the first is the
//! reference the others are compared with. `--serve-http-floor ADDR` runs
//! the bare HTTP floor for them to be compared with (see [`http_floor`]).
//!
//! # Layout
//! - [`load`]: sending requests over NATS and timing their replies; the report.
//! - [`workload`]: what each request asks (prompt size, greedy sampling, repeated prompts).
//! - [`floor`]: the bare JetStream round trip (publish → pull → reply → ack).
//! - [`http`]: load over HTTP (`POST /v1/infer`) against one or more ingresses.
//! - [`http_floor`]: the bare HTTP → JetStream → reply floor.
//! - [`direct`]: the model called in-process, with no fleet around it.
//! - [`report`]: the HTML report (`--report`), its charts drawn as SVG.

mod direct;
mod floor;
mod http;
mod http_floor;
mod load;
mod report;
mod workload;

use std::time::Duration;

use clap::Parser;
use retro_fleet_schemas::Priority;

use load::{Mode, Report, Target};
use retro_fleet_worker::backend::cohort::Admission;

/// Load generator for retro-fleet (NATS requests → replies).
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about)]
struct Args {
    /// NATS server URL.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Requests per measured round.
    #[arg(long, short = 'n', default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight (closed loop). Ignored with --rate.
    #[arg(long, short, default_value_t = 64)]
    window: usize,
    /// Open loop: requests per second instead of a window.
    #[arg(long)]
    rate: Option<f64>,
    /// Bytes of prompt text per request.
    #[arg(long, default_value_t = 256)]
    prompt_bytes: usize,
    /// Cache mode of every request (`use`, `bypass`, `refresh` or
    /// `semantic`); with `semantic`, fresh prompts differ in meaning.
    #[arg(long, default_value = "use", value_parser = parse_cache_mode)]
    cache_mode: retro_fleet_schemas::CacheMode,
    /// Greedy sampling (temperature 0), so the fleet may answer from its cache.
    #[arg(long)]
    greedy: bool,
    /// Share of requests repeating one of --distinct popular prompts (0..1);
    /// the others ask prompts never asked before.
    #[arg(long, default_value_t = 0.0)]
    repeat: f64,
    /// Number of popular prompts that --repeat draws from.
    #[arg(long, default_value_t = 100)]
    distinct: usize,
    /// `max_tokens` of every request (default: the model's).
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Ask for streamed tokens and report the time to the first one.
    #[arg(long)]
    stream: bool,
    /// Every answer must be JSON fitting the JSON Schema in this file
    /// (`params.constraint`, or `response_format` with --api openai): the
    /// cost of constrained decoding.
    #[arg(long, value_name = "FILE")]
    json_schema: Option<std::path::PathBuf>,
    /// Also call the mistral.rs model in this directory directly in-process
    /// (no fleet) with the same requests and window, in alternating rounds,
    /// and print fleet/direct in tokens per second.
    #[arg(long, value_name = "MODEL_DIR")]
    direct: Option<std::path::PathBuf>,
    /// How requests enter the direct engine: `cohort` (as the workers do by
    /// default) and/or `continuous` (mistral.rs's own scheduling),
    /// comma-separated; each is measured in its own rounds.
    #[arg(long, default_value = "cohort", value_delimiter = ',')]
    direct_admission: Vec<Admission>,
    /// Model(s) to call, comma-separated (each served by a running worker);
    /// several are measured in alternating rounds and compared with the first.
    #[arg(long, default_value = "echo", value_delimiter = ',')]
    model: Vec<String>,
    /// Priority class.
    #[arg(long, default_value = "normal")]
    priority: Priority,
    /// Also measure the bare JetStream floor, alternating rounds.
    #[arg(long)]
    floor: bool,
    /// Only the floor (no fleet needed).
    #[arg(long)]
    floor_only: bool,
    /// The floor also stores each result in a stream before acking (one
    /// more JetStream write per request), replying while the write is in
    /// flight: less than the fleet's contract (see --floor-contract).
    #[arg(long)]
    floor_store: bool,
    /// The floor does what retro-fleet's contract asks of NATS: the result
    /// stored first-writer-wins with a TTL before the reply is sent, each
    /// message handled in a task of its own (and, HTTP, a `Nats-Msg-Id` on
    /// each request).
    #[arg(long, conflicts_with = "floor_store")]
    floor_contract: bool,
    /// Copies of the floor's streams (3 against a cluster whose fleet
    /// streams have 3, so both pay for replication).
    #[arg(long, default_value_t = 1)]
    floor_replicas: usize,
    /// Measured rounds per target (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds to wait for stragglers after the last request was sent.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Open loop at each of these rates (requests per second, comma-separated)
    /// in turn, instead of --rate or --window: latency against offered load.
    #[arg(long, value_delimiter = ',', conflicts_with = "rate")]
    sweep: Vec<f64>,
    /// Write an HTML report with pictures (latency percentiles against
    /// offered load, throughput over time) to this file, and each picture
    /// beside it as FILE-<chart>.svg.
    #[arg(long, value_name = "FILE")]
    report: Option<std::path::PathBuf>,
    /// Write the reports as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// HTTP mode: an ingress as NAME=http://HOST:PORT (repeat to compare).
    #[arg(long = "http")]
    http: Vec<http::HttpTarget>,
    /// HTTP mode: the API to call (`openai` streams with --stream and
    /// reports the time to the first visible text; `embeddings` sends
    /// `--embed-batch` texts per request to `/v1/embeddings`).
    #[arg(long, value_enum, default_value = "native")]
    api: http::Api,
    /// HTTP mode with `--api embeddings`: texts per request.
    #[arg(long, default_value_t = 1)]
    embed_batch: usize,
    /// HTTP mode: send `Authorization: Bearer TOKEN`.
    #[arg(long)]
    bearer: Option<String>,
    /// Serve the bare HTTP floor on ADDR (e.g. 127.0.0.1:18090) until
    /// stopped, instead of generating load: an axum handler that publishes
    /// to a work-queue stream and waits for a bare puller's reply on one
    /// muxed inbox. Load it with `--http floor=http://ADDR`. With
    /// --floor-store the puller stores each reply while it answers; with
    /// --floor-contract, before.
    #[arg(long, value_name = "ADDR")]
    serve_http_floor: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let json_schema = match &args.json_schema {
        Some(path) => {
            let text = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            Some(serde_json::from_slice(&text).map_err(|e| anyhow::anyhow!("{} is not JSON: {e}", path.display()))?)
        }
        None => None,
    };
    let workload = workload::Workload {
        prompt_bytes: args.prompt_bytes,
        greedy: args.greedy,
        repeat: args.repeat.clamp(0.0, 1.0),
        distinct: args.distinct.max(1),
        max_tokens: args.max_tokens,
        stream: args.stream,
        json_schema,
        embed_batch: args.embed_batch,
        cache: args.cache_mode,
    };
    if !args.http.is_empty() {
        return http_main(&args, &workload).await;
    }
    let client = async_nats::connect(&args.nats).await.map_err(|e| {
        anyhow::anyhow!("cannot connect to NATS at {}: {e} (start the fleet with `make up`)", args.nats)
    })?;
    let store = match (args.floor_store, args.floor_contract) {
        (_, true) => floor::Store::Contract,
        (true, _) => floor::Store::Pipelined,
        _ => floor::Store::None,
    };
    if let Some(listen) = &args.serve_http_floor {
        return http_floor::serve(client, listen, store).await;
    }
    let mode = match args.rate {
        Some(r) => Mode::Rate(r),
        None => Mode::Window(args.window.max(1)),
    };
    let mut targets = Vec::new();
    if !args.floor_only {
        for m in &args.model {
            let mut t = Target::fleet(m, args.priority);
            if args.model.len() > 1 {
                t.name = m.clone();
            }
            targets.push(t);
        }
    }
    let floor_measured = args.floor || args.floor_only;
    let floor_worker = if floor_measured {
        let w = floor::start(client.clone(), store, args.floor_replicas).await?;
        targets.push(Target::floor());
        Some(w)
    } else {
        None
    };
    let wait = Duration::from_secs(args.timeout);
    let warmup = (args.requests / 10).clamp(100, 2_000);
    let mut direct_models = Vec::new();
    if let Some(dir) = &args.direct {
        for a in &args.direct_admission {
            let name = match a {
                Admission::Cohort => "direct",
                Admission::Continuous => "direct-continuous",
            };
            direct_models.push((name, direct::load(dir, *a).await?));
        }
    }
    let mut steps = Vec::new();
    for mode in modes(&args, mode) {
        for t in &targets {
            load::run(&client, t, warmup, mode, &workload, wait).await?;
        }
        for (name, m) in &direct_models {
            direct::run(name, m, warmup, args.window, &workload).await?;
        }
        let mut reports: Vec<Vec<Report>> = vec![Vec::new(); targets.len() + direct_models.len()];
        for round in 0..args.rounds.max(1) {
            for (i, t) in targets.iter().enumerate() {
                let r = load::run(&client, t, args.requests, mode, &workload, wait).await?;
                eprintln!("round {}: {}", round + 1, r.line());
                reports[i].push(r);
            }
            for (j, (name, m)) in direct_models.iter().enumerate() {
                let r = direct::run(name, m, args.requests, args.window, &workload).await?;
                eprintln!("round {}: {}", round + 1, r.line());
                reports[targets.len() + j].push(r);
            }
        }
        let medians: Vec<Report> = reports.iter().map(|rs| load::median(rs.clone())).collect();
        steps.push(report::Step { mode, rounds: reports, medians });
    }
    if let Some(w) = floor_worker {
        w.stop().await;
    }
    for report::Step { mode, medians, .. } in &steps {
        println!("median of {} rounds, {} requests each, {}:", args.rounds.max(1), args.requests, mode);
        for r in medians {
            println!("{}", r.line());
        }
        for direct in &medians[targets.len()..] {
            let fleet = &medians[0];
            let name = direct.target.replace("direct", "fleet/direct");
            println!("{name}: {:.2}", fleet.tokens_per_s / direct.tokens_per_s.max(f64::MIN_POSITIVE));
        }
        // each NATS target against the floor when measured, else against the first
        let reference = targets.iter().position(|t| t.name == "floor").unwrap_or(0);
        for (_, r) in medians.iter().enumerate().take(targets.len()).filter(|(i, _)| *i != reference) {
            let base = &medians[reference];
            println!("{}/{}: {:.2}", r.target, base.target, r.throughput / base.throughput);
            println!("p50 added by {} over {}: {:.3} ms", r.target, base.target, r.p50_ms - base.p50_ms);
        }
    }
    write_out(&args, "", &steps)?;
    let reports: Vec<&Report> = steps.iter().flat_map(|s| s.rounds.iter().flatten()).collect();
    let lost: usize = reports.iter().map(|r| r.lost).sum();
    let dup: usize = reports.iter().map(|r| r.duplicates).sum();
    if lost > 0 || dup > 0 {
        anyhow::bail!("{lost} requests lost and {dup} duplicated");
    }
    Ok(())
}

/// HTTP mode: alternating rounds over the `--http` targets, each round
/// starting with the next one.
async fn http_main(args: &Args, workload: &workload::Workload) -> anyhow::Result<()> {
    // open loop: keep enough connections for the bursts of a 1 ms timer
    // (new connections under load fail and skew the tail)
    let fastest = args.sweep.iter().copied().chain(args.rate).reduce(f64::max);
    let pool = fastest.map_or(args.window, |r| args.window.max((r / 100.0) as usize).max(1024));
    let client = http::client(pool)?;
    let mode = match args.rate {
        Some(r) => Mode::Rate(r),
        None => Mode::Window(args.window.max(1)),
    };
    let model = args.model.first().map(String::as_str).unwrap_or("echo");
    let warmup = (args.requests / 10).clamp(100, 2_000);
    let bearer = args.bearer.as_deref();
    let mut steps = Vec::new();
    for mode in modes(args, mode) {
        for t in &args.http {
            http::run(&client, t, args.api, warmup, mode, workload, model, bearer).await?;
        }
        let mut reports: Vec<Vec<Report>> = vec![Vec::new(); args.http.len()];
        for round in 0..args.rounds.max(1) {
            // each round starts with the next target, so none always follows
            // the same one (a server may still be busy when its round ends)
            let n = args.http.len();
            for i in (0..n).map(|k| (k + round) % n) {
                let t = &args.http[i];
                let r = http::run(&client, t, args.api, args.requests, mode, workload, model, bearer).await?;
                eprintln!("round {}: {}", round + 1, r.line());
                reports[i].push(r);
            }
        }
        let medians: Vec<Report> = reports.iter().map(|rs| load::median(rs.clone())).collect();
        println!("median of {} rounds, {} requests each, HTTP {mode}:", args.rounds.max(1), args.requests);
        for r in &medians {
            println!("{}", r.line());
        }
        for r in medians.iter().skip(1) {
            let base = &medians[0];
            let first_text = match (r.ttft_p50_ms, base.ttft_p50_ms) {
                (Some(a), Some(b)) => format!(", first text p50 {:+.3} ms", a - b),
                _ => String::new(),
            };
            println!(
                "{}/{}: {:.3} (throughput), p50 {:+.3} ms, p99 {:.2}x{first_text}",
                r.target,
                base.target,
                r.throughput / base.throughput,
                r.p50_ms - base.p50_ms,
                r.p99_ms / base.p99_ms.max(f64::MIN_POSITIVE),
            );
        }
        steps.push(report::Step { mode, rounds: reports, medians });
    }
    write_out(args, "http ", &steps)?;
    let reports: Vec<&Report> = steps.iter().flat_map(|s| s.rounds.iter().flatten()).collect();
    let lost: usize = reports.iter().map(|r| r.lost).sum();
    if lost > 0 {
        anyhow::bail!("{lost} HTTP requests failed");
    }
    Ok(())
}

/// The loads to measure: each rate of `--sweep`, else `mode`.
fn modes(args: &Args, mode: Mode) -> Vec<Mode> {
    if args.sweep.is_empty() {
        vec![mode]
    } else {
        args.sweep.iter().map(|r| Mode::Rate(*r)).collect()
    }
}

/// `--json` (one object per load, a list of them for a sweep) and `--report`.
fn write_out(args: &Args, kind: &str, steps: &[report::Step]) -> anyhow::Result<()> {
    if let Some(path) = &args.json {
        let json: Vec<serde_json::Value> = steps
            .iter()
            .map(|s| {
                serde_json::json!({ "mode": format!("{kind}{}", s.mode), "requests": args.requests,
                                    "rounds": s.rounds, "median": s.medians })
            })
            .collect();
        let json = if json.len() == 1 { json[0].clone() } else { serde_json::Value::Array(json) };
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    if let Some(path) = &args.report {
        let title = format!("loadtest, {} requests per round, {} round(s)", args.requests, args.rounds.max(1));
        let write = |p: &std::path::Path, text: String| {
            std::fs::write(p, text).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", p.display()))
        };
        write(path, report::html(&title, steps))?;
        let stem = path.with_extension("");
        for (name, _, svg) in report::charts(steps) {
            write(&std::path::PathBuf::from(format!("{}-{name}.svg", stem.display())), svg)?;
        }
        eprintln!("report written to {} (and its charts beside it, as SVG)", path.display());
    }
    Ok(())
}

fn parse_cache_mode(s: &str) -> Result<retro_fleet_schemas::CacheMode, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}`: use `use`, `bypass`, `refresh` or `semantic`"))
}
