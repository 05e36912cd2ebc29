//! `retro-fleet dlq list | show | replay`: dead letters for people (what
//! replay does is described in [`crate::ops::dlq`]).

use std::fmt::Write as _;

use async_nats::jetstream::{self, stream::Stream};

use crate::config::Config;
use crate::ops::dlq;

async fn dlq_stream(config: &Config) -> anyhow::Result<(jetstream::Context, Stream)> {
    let client = crate::nats::connect(&config.nats, "dlq").await?;
    let js = jetstream::new(client);
    let stream = dlq::open(&js).await?;
    Ok((js, stream))
}

/// `retro-fleet dlq list`.
pub async fn list(config: &Config, filter: &dlq::Filter, limit: usize) -> anyhow::Result<()> {
    let (_, stream) = dlq_stream(config).await?;
    let letters = dlq::read(&stream, filter, limit).await?;
    println!("{:>8}  {:<6}  {:<16}  {:<28}  {:<18}  {:>5}  message", "seq", "prio", "model", "id", "code", "deliv");
    for l in &letters {
        let mut message = l.message.clone();
        if message.chars().count() > 80 {
            message = message.chars().take(77).collect::<String>() + "...";
        }
        println!(
            "{:>8}  {:<6}  {:<16}  {:<28}  {:<18}  {:>5}  {}",
            l.seq,
            l.priority,
            l.model,
            l.id.as_deref().unwrap_or("-"),
            l.code,
            l.deliveries,
            message
        );
    }
    println!("{} dead letter(s)", letters.len());
    Ok(())
}

/// `retro-fleet dlq show SEQ`.
pub async fn show(config: &Config, seq: u64) -> anyhow::Result<()> {
    let (_, stream) = dlq_stream(config).await?;
    let l = dlq::get(&stream, seq).await?;
    let mut out = String::new();
    let _ = writeln!(out, "sequence: {}\ntime: {}\npriority: {}\nmodel: {}", l.seq, l.time, l.priority, l.model);
    let _ = writeln!(out, "id: {}\ntenant: {}", l.id.as_deref().unwrap_or("-"), l.tenant);
    let _ = writeln!(out, "error: {} ({} deliveries)\nmessage: {}", l.code, l.deliveries, l.message);
    let _ = writeln!(out, "headers:");
    for (k, v) in l.header_list() {
        let _ = writeln!(out, "  {k}: {v}");
    }
    let _ = writeln!(out, "payload ({} bytes):", l.payload.len());
    match l.payload_value() {
        Ok(v) => {
            let _ = writeln!(out, "{}", serde_json::to_string_pretty(&v)?);
        }
        Err(text) => {
            let _ = writeln!(out, "{text}");
        }
    }
    print!("{out}");
    Ok(())
}

/// `retro-fleet dlq replay`.
pub async fn replay(
    config: &Config,
    filter: &dlq::Filter,
    limit: usize,
    keep: bool,
    dry_run: bool,
) -> anyhow::Result<dlq::Replayed> {
    let (js, _) = dlq_stream(config).await?;
    let done = dlq::replay(&js, filter, limit, keep, dry_run).await?;
    for o in &done.letters {
        let label = format!("dead letter {} ({})", o.seq, o.id.as_deref().unwrap_or("no id"));
        match o.action {
            "skipped" => println!("skip {label}: {}", o.detail),
            "would_replay" => println!("would replay {label} to {}", o.detail),
            _ => println!("replayed {label} to {}", o.detail),
        }
    }
    println!("{} replayed, {} skipped", done.replayed, done.skipped);
    Ok(done)
}
