//! `retro-fleet topology apply | workers | queues`: looking at the fleet
//! and steering it (the actions themselves are in [`crate::ops`]).

use retro_fleet_schemas::WorkerInfo;

use super::{QueuesAction, WorkersAction};
use crate::config::Config;

/// `retro-fleet topology apply`.
pub async fn topology_apply(config: &Config) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "topology").await?;
    let js = async_nats::jetstream::new(client);
    for line in crate::topology::apply(&js, &config.topology_plan()).await? {
        println!("{line}");
    }
    Ok(())
}

/// `retro-fleet topology status`.
pub async fn topology_status(config: &Config) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "topology").await?;
    let js = async_nats::jetstream::new(client);
    for line in crate::topology::status(&js, &config.topology_plan()).await? {
        println!("{line}");
    }
    Ok(())
}

/// `retro-fleet workers`.
pub async fn workers(config: &Config, json: bool) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "workers").await?;
    let js = async_nats::jetstream::new(client);
    let list = crate::registry::list(&js, config.topology.worker_ttl_secs.max(1) * 1000).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!("{}", table(&list, retro_fleet_worker::unix_ms()));
    }
    Ok(())
}

/// `retro-fleet workers drain|resume ID`.
pub async fn workers_action(config: &Config, action: WorkersAction) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "workers").await?;
    let (id, drain) = match &action {
        WorkersAction::Drain { id } => (id, true),
        WorkersAction::Resume { id } => (id, false),
    };
    let s = crate::ops::drain_worker(&client, id, drain).await?;
    let state = if s.draining { "draining" } else { "taking requests" };
    println!("worker {}: {state}, {} request(s) in flight", s.id, s.inflight);
    Ok(())
}

/// `retro-fleet queues [pause|resume PRIORITY]`.
pub async fn queues(config: &Config, action: Option<QueuesAction>) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "queues").await?;
    let js = async_nats::jetstream::new(client);
    let (priority, resume, duration) = match action {
        None => {
            println!("{}", serde_json::to_string_pretty(&crate::ops::queues(&js).await?)?);
            return Ok(());
        }
        Some(QueuesAction::Pause { duration: Some(d), .. }) if d.is_zero() => {
            anyhow::bail!("--for must be at least one second (leave it out to pause until resumed)")
        }
        Some(QueuesAction::Pause { priority, duration }) => (priority, false, duration),
        Some(QueuesAction::Resume { priority }) => (priority, true, None),
    };
    for c in crate::ops::pause_priority(&js, priority, resume, duration).await? {
        match (c.paused, c.remaining_secs) {
            (false, _) => println!("{}: delivering", c.consumer),
            (true, Some(s)) if duration.is_some() => println!("{}: paused for {s} s", c.consumer),
            (true, _) => println!("{}: paused until resumed", c.consumer),
        }
    }
    Ok(())
}

/// `retro-fleet usage`: metered usage added up, as a table or JSON.
pub async fn usage(config: &Config, q: &crate::usage::Query, json: bool) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "usage").await?;
    let rows = crate::usage::read(&async_nats::jetstream::new(client), q).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!(
        "{:<16} {:<24} {:<16} {:<10} {:>9} {:>7} {:>7} {:>12} {:>12}",
        "TENANT", "KEY", "MODEL", "DAY", "REQUESTS", "FAILED", "CACHED", "PROMPT", "COMPLETION"
    );
    for r in &rows {
        println!(
            "{:<16} {:<24} {:<16} {:<10} {:>9} {:>7} {:>7} {:>12} {:>12}",
            dash(&r.tenant),
            dash(&r.key),
            dash(&r.model),
            dash(&r.day),
            r.requests,
            r.failed,
            r.cached,
            r.prompt_tokens,
            r.completion_tokens
        );
    }
    Ok(())
}

/// A table of `workers`, one line each, for people.
pub fn table(workers: &[WorkerInfo], now_ms: u64) -> String {
    let mut s = format!(
        "{:<28} {:<20} {:>9} {:>10} {:>9} {:>10} {:>6}  {}\n",
        "ID", "MODELS", "INFLIGHT", "COMPLETED", "REQ/S", "LATENCY", "AGE", "STATE"
    );
    for w in workers {
        let latency = w.latency_ms.map(|l| format!("{l:.1}ms")).unwrap_or_else(|| "-".into());
        let age = now_ms.saturating_sub(w.updated_ms) as f64 / 1e3;
        s.push_str(&format!(
            "{:<28} {:<20} {:>9} {:>10} {:>9.1} {:>10} {:>5.1}s  {}\n",
            w.id,
            w.models.join(","),
            format!("{}/{}", w.inflight, w.capacity),
            w.completed,
            w.throughput,
            latency,
            age,
            if w.draining { "draining" } else { "serving" },
        ));
    }
    if workers.is_empty() {
        s.push_str("(no live workers)\n");
    }
    s
}
