//! `retro-fleet cache warm | purge`: fleet-wide cache tools for people.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use retro_fleet_schemas::subjects;
use retro_fleet_worker::cache::warm::{WarmFrom, WarmProgress};

use crate::config::Config;

/// Parses `90s`, `15m`, `2h`, `7d` (or plain seconds).
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 90s, 15m, 2h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3_600,
        "d" => n * 86_400,
        _ => return Err(format!("unknown unit in `{s}`: use s, m, h or d")),
    };
    Ok(Duration::from_secs(secs))
}

/// Asks every worker to replay `FLEET_RESULTS` into its cache and shows
/// their combined progress until each one is done.
pub async fn warm(config: &Config, from: WarmFrom, timeout: Duration) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "cache-warm").await?;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(subjects::CACHE_WARM, inbox, Bytes::from(serde_json::to_vec(&from)?))
        .await
        .context("sending the warm request")?;
    client.flush().await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} warming {msg} [{bar:30}] {pos}/{len} results ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let mut workers: BTreeMap<String, WarmProgress> = BTreeMap::new();
    let started = tokio::time::Instant::now();
    // Workers answer at once; after a quiet second with everyone done, stop.
    loop {
        let all_done = !workers.is_empty() && workers.values().all(|p| p.done);
        let wait = if all_done { Duration::from_secs(1) } else { Duration::from_secs(5) };
        match tokio::time::timeout(wait, replies.next()).await {
            Ok(Some(m)) => {
                let Ok(p) = serde_json::from_slice::<WarmProgress>(&m.payload) else { continue };
                workers.insert(p.worker.clone(), p);
                bar.set_length(workers.values().map(|p| p.total).sum());
                bar.set_position(workers.values().map(|p| p.scanned).sum());
                bar.set_message(format!("{} worker(s)", workers.len()));
            }
            Ok(None) => break,
            Err(_) if workers.is_empty() => {
                bar.finish_and_clear();
                anyhow::bail!(
                    "no worker answered on {} (is a worker with its cache enabled running?)",
                    subjects::CACHE_WARM
                );
            }
            Err(_) if all_done => break,
            Err(_) => {}
        }
        if started.elapsed() > timeout {
            bar.finish_and_clear();
            anyhow::bail!("warming did not finish within {timeout:?}; workers keep going in the background");
        }
    }
    bar.finish_and_clear();
    for p in workers.values() {
        match &p.error {
            Some(e) => println!("{:<24} failed: {e}", p.worker),
            None => println!(
                "{:<24} scanned {:>8}  cached {:>8}  expired {:>8}",
                p.worker, p.scanned, p.inserted, p.expired
            ),
        }
    }
    if workers.values().any(|p| p.error.is_some()) {
        anyhow::bail!("some workers could not warm their cache");
    }
    Ok(())
}

/// Gives each model a new cache generation: every worker stops serving the
/// model's earlier answers at once (they age out of memory and disk).
pub async fn purge(config: &Config, models: Vec<String>) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "cache-purge").await?;
    let js = async_nats::jetstream::new(client);
    let configured: std::collections::BTreeSet<String> = config.models.keys().cloned().collect();
    for (m, generation) in crate::ops::cache::purge(&js, &configured, models).await? {
        println!("purged the cache of `{m}` (generation {generation})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages() {
        assert_eq!(parse_age("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_age("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_age("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_age("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_age("soon").is_err());
        assert!(parse_age("5y").is_err());
    }
}
