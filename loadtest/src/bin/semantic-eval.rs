//! How well the semantic cache tells a rephrasing from a different
//! question, on a labelled set anyone can rerun.
//!
//! Every pair of `loadtest/fixtures/semantic-pairs.jsonl` is one cached
//! question and one new question: a `paraphrase` (the cached answer is
//! right for it), a `near_miss` (one fact or a negation changed: the
//! cached answer is wrong) or `unrelated`. For each embedder and
//! threshold, each pair goes through the cache's own index
//! ([`retro_fleet_worker::cache::semantic::Index`], with its negation
//! rule): a hit on a paraphrase is a good hit, any other hit a false one.
//! Rates are over all pairs (as vCache counts them). It also prints, per
//! embedder, the most good hits any threshold gives while false hits stay
//! within `--bound`, and what embedding one prompt costs.
//!
//! ```text
//! cargo run --release -p retro-fleet-loadtest --bin semantic-eval
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use retro_fleet_worker::cache::semantic::{Index, Probe};
use retro_fleet_worker::cache::Key;
use retro_fleet_worker::embed::{self, BertConfig, Builtin, Embedder, EmbedderConfig};
use serde::Deserialize;

/// Hit and false-hit rates of the semantic cache's embedders on a labelled set.
#[derive(Debug, Parser)]
#[command(name = "semantic-eval", version, about)]
struct Args {
    /// The labelled pairs (JSON lines: cached, query, label).
    #[arg(long, default_value = "loadtest/fixtures/semantic-pairs.jsonl")]
    pairs: PathBuf,
    /// A sentence-transformers directory to compare with the lexical embedder
    /// (default: where `scripts/install-deps.sh` unpacks all-MiniLM-L6-v2).
    #[arg(long, env = "FLEET_MINILM_DIR")]
    model: Option<PathBuf>,
    /// Thresholds to print a row for (besides each embedder's default).
    #[arg(long, value_delimiter = ',', default_value = "0.8,0.85,0.9,0.95")]
    thresholds: Vec<f64>,
    /// The false-hit rate (share of all pairs) the best-threshold search stays within.
    #[arg(long, default_value_t = 0.02)]
    bound: f64,
    /// Prompts embedded one at a time to measure the cost of one.
    #[arg(long, default_value_t = 200)]
    cost_samples: usize,
}

#[derive(Deserialize)]
struct Pair {
    cached: String,
    query: String,
    label: String,
}

struct Scored {
    cached: Probe,
    query: Probe,
    paraphrase: bool,
}

/// Good and false hits at `threshold`, through the cache's index.
fn hits(pairs: &[Scored], threshold: f64) -> (usize, usize) {
    let (mut good, mut bad) = (0, 0);
    for p in pairs {
        let mut idx = Index::new(1);
        idx.insert(0, p.cached.clone(), Key(1), u64::MAX);
        if idx.nearest(0, &p.query, threshold, 0).is_some() {
            if p.paraphrase {
                good += 1
            } else {
                bad += 1
            }
        }
    }
    (good, bad)
}

fn embed_all(e: &dyn Embedder, pairs: &[Pair]) -> Result<Vec<Scored>> {
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(16) {
        let texts: Vec<&str> = chunk.iter().flat_map(|p| [p.cached.as_str(), p.query.as_str()]).collect();
        let mut v = e.embed(&texts)?.vectors.into_iter();
        for p in chunk {
            let (c, q) = (v.next().context("vector")?, v.next().context("vector")?);
            out.push(Scored {
                cached: Probe::new(&p.cached, c),
                query: Probe::new(&p.query, q),
                paraphrase: p.label == "paraphrase",
            });
        }
    }
    Ok(out)
}

/// p50 and p95 of embedding one prompt, in ms.
fn cost(e: &dyn Embedder, pairs: &[Pair], samples: usize) -> Result<(f64, f64)> {
    let mut ms = Vec::new();
    for p in pairs.iter().cycle().take(samples.max(1)) {
        let t = Instant::now();
        e.embed(&[&p.query])?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok((ms[ms.len() / 2], ms[(ms.len() * 95 / 100).min(ms.len() - 1)]))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.pairs)
        .with_context(|| format!("reading {} (run from the repository's root)", args.pairs.display()))?;
    let pairs: Vec<Pair> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("line {}", i + 1)))
        .collect::<Result<_>>()?;
    if pairs.is_empty() {
        bail!("no pairs in {}", args.pairs.display());
    }
    let count = |l: &str| pairs.iter().filter(|p| p.label == l).count();
    println!(
        "{} pairs: {} paraphrase, {} near_miss, {} unrelated; rates are shares of all pairs\n",
        pairs.len(),
        count("paraphrase"),
        count("near_miss"),
        count("unrelated")
    );
    let mut embedders: Vec<Arc<dyn Embedder>> = vec![embed::load(&EmbedderConfig::Builtin(Builtin::Lexical))?];
    let model = args.model.clone().unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/retro-fleet/models/all-MiniLM-L6-v2")
    });
    match embed::load(&EmbedderConfig::Bert(BertConfig { path: model })) {
        Ok(e) => embedders.push(e),
        Err(e) => eprintln!("skipping the BERT embedder: {e}\n"),
    }
    let n = pairs.len() as f64;
    println!(
        "{:<18} {:>9} {:>6} {:>9} {:>7} {:>10}",
        "embedder", "threshold", "hits", "hit rate", "false", "false rate"
    );
    let mut summary = Vec::new();
    for e in &embedders {
        let scored = embed_all(e.as_ref(), &pairs)?;
        let mut ts = args.thresholds.clone();
        ts.push(e.default_threshold());
        ts.sort_by(f64::total_cmp);
        ts.dedup();
        for t in ts {
            let (good, bad) = hits(&scored, t);
            let mark = if t == e.default_threshold() { " (default)" } else { "" };
            println!(
                "{:<18} {:>9.3} {:>6} {:>8.1}% {:>7} {:>9.1}%{mark}",
                e.name(),
                t,
                good,
                100.0 * good as f64 / n,
                bad,
                100.0 * bad as f64 / n
            );
        }
        // the most good hits any threshold gives within the bound
        let best = (0..=1000)
            .map(|i| 0.5 + i as f64 * 0.0005)
            .map(|t| (t, hits(&scored, t)))
            .filter(|(_, (_, bad))| *bad as f64 / n <= args.bound)
            .max_by_key(|(_, (good, _))| *good);
        let (p50, p95) = cost(e.as_ref(), &pairs, args.cost_samples)?;
        summary.push((e.name().to_owned(), best, p50, p95));
    }
    println!(
        "\nbest threshold with false hits within {:.1}% of pairs, and the cost of embedding one prompt:",
        args.bound * 100.0
    );
    for (name, best, p50, p95) in summary {
        match best {
            Some((t, (good, bad))) => println!(
                "{name:<18} threshold {t:.4}: {good} hits ({:.1}%), {bad} false ({:.1}%); embed p50 {p50:.3} ms, p95 {p95:.3} ms",
                100.0 * good as f64 / n,
                100.0 * bad as f64 / n
            ),
            None => println!("{name:<18} no threshold keeps false hits within the bound; embed p50 {p50:.3} ms"),
        }
    }
    Ok(())
}
