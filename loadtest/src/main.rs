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
//! (`POST /v1/infer`), alternating rounds between them; the first is the
//! reference the others are compared with.

mod floor;
mod http;
mod load;

use std::time::Duration;

use clap::Parser;
use retro_fleet_schemas::Priority;

use load::{Mode, Report, Target};

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
    /// Model to call (must be served by a running worker).
    #[arg(long, default_value = "echo")]
    model: String,
    /// Priority class.
    #[arg(long, default_value = "normal")]
    priority: Priority,
    /// Also measure the bare JetStream floor, alternating rounds.
    #[arg(long)]
    floor: bool,
    /// Only the floor (no fleet needed).
    #[arg(long)]
    floor_only: bool,
    /// The floor also stores each result in a stream before acking, as the
    /// fleet's contract requires (one more JetStream write per request).
    #[arg(long)]
    floor_store: bool,
    /// Measured rounds per target (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds to wait for stragglers after the last request was sent.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Write the reports as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// HTTP mode: an ingress as NAME=http://HOST:PORT (repeat to compare).
    #[arg(long = "http")]
    http: Vec<http::HttpTarget>,
    /// HTTP mode: send `Authorization: Bearer TOKEN`.
    #[arg(long)]
    bearer: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.http.is_empty() {
        return http_main(&args).await;
    }
    let client = async_nats::connect(&args.nats).await.map_err(|e| {
        anyhow::anyhow!("cannot connect to NATS at {}: {e} (start the fleet with `make up`)", args.nats)
    })?;
    let mode = match args.rate {
        Some(r) => Mode::Rate(r),
        None => Mode::Window(args.window.max(1)),
    };
    let mut targets = Vec::new();
    if !args.floor_only {
        targets.push(Target::fleet(&args.model, args.priority));
    }
    let floor_worker = if args.floor || args.floor_only {
        let w = floor::start(client.clone(), args.floor_store).await?;
        targets.push(Target::floor());
        Some(w)
    } else {
        None
    };
    let wait = Duration::from_secs(args.timeout);
    let warmup = (args.requests / 10).clamp(100, 2_000);
    for t in &targets {
        load::run(&client, t, warmup, mode, args.prompt_bytes, wait).await?;
    }
    let mut reports: Vec<Vec<Report>> = vec![Vec::new(); targets.len()];
    for round in 0..args.rounds.max(1) {
        for (i, t) in targets.iter().enumerate() {
            let r = load::run(&client, t, args.requests, mode, args.prompt_bytes, wait).await?;
            eprintln!("round {}: {}", round + 1, r.line());
            reports[i].push(r);
        }
    }
    if let Some(w) = floor_worker {
        w.stop().await;
    }
    let medians: Vec<Report> = reports.iter().map(|rs| load::median(rs.clone())).collect();
    println!("median of {} rounds, {} requests each, {}:", args.rounds.max(1), args.requests, mode);
    for r in &medians {
        println!("{}", r.line());
    }
    if medians.len() == 2 {
        let ratio = medians[0].throughput / medians[1].throughput;
        println!("fleet/floor: {ratio:.2}");
        println!("p50 added by the fleet: {:.3} ms", medians[0].p50_ms - medians[1].p50_ms);
    }
    let json = serde_json::json!({ "mode": mode.to_string(), "requests": args.requests, "rounds": reports, "median": medians });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    let lost: usize = reports.iter().flatten().map(|r| r.lost).sum();
    let dup: usize = reports.iter().flatten().map(|r| r.duplicates).sum();
    if lost > 0 || dup > 0 {
        anyhow::bail!("{lost} requests lost and {dup} duplicated");
    }
    Ok(())
}

/// HTTP mode: alternating rounds over the `--http` targets.
async fn http_main(args: &Args) -> anyhow::Result<()> {
    let client = http::client(args.window)?;
    let warmup = (args.requests / 10).clamp(100, 2_000);
    let bearer = args.bearer.as_deref();
    for t in &args.http {
        http::run(&client, t, warmup, args.window, args.prompt_bytes, &args.model, bearer).await?;
    }
    let mut reports: Vec<Vec<Report>> = vec![Vec::new(); args.http.len()];
    for round in 0..args.rounds.max(1) {
        for (i, t) in args.http.iter().enumerate() {
            let r = http::run(&client, t, args.requests, args.window, args.prompt_bytes, &args.model, bearer).await?;
            eprintln!("round {}: {}", round + 1, r.line());
            reports[i].push(r);
        }
    }
    let medians: Vec<Report> = reports.iter().map(|rs| load::median(rs.clone())).collect();
    println!("median of {} rounds, {} requests each, HTTP window {}:", args.rounds.max(1), args.requests, args.window);
    for r in &medians {
        println!("{}", r.line());
    }
    for r in medians.iter().skip(1) {
        println!(
            "{}/{}: {:.3} (throughput), p50 {:+.3} ms",
            r.target,
            medians[0].target,
            r.throughput / medians[0].throughput,
            r.p50_ms - medians[0].p50_ms
        );
    }
    if let Some(path) = &args.json {
        let json = serde_json::json!({ "mode": format!("http window {}", args.window), "requests": args.requests, "rounds": reports, "median": medians });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)?;
    }
    let lost: usize = reports.iter().flatten().map(|r| r.lost).sum();
    if lost > 0 {
        anyhow::bail!("{lost} HTTP requests failed");
    }
    Ok(())
}
