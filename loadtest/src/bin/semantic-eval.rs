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
//! Learned thresholds: the pairs are shuffled and split in two, `--splits`
//! times. The first half streams through the cache's own
//! [`Calibration`](retro_fleet_worker::cache::calibrate::Calibration) as
//! lookups, a `--verify` share of candidates checked (the label stands in
//! for comparing answers); the threshold it learns is then scored on the
//! second half, next to the static default on the same half. It prints
//! the means, and in how many splits the false-hit rate broke the bound.
//!
//! ```text
//! cargo run --release -p retro-fleet-loadtest --bin semantic-eval
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use retro_fleet_worker::cache::ann::Ann;
use retro_fleet_worker::cache::calibrate::{Calibration, Learning};
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
    /// Shares of candidates checked while learning, one row each.
    #[arg(long, value_delimiter = ',', default_value = "1.0,0.25")]
    verify: Vec<f64>,
    /// Seed of the shuffles that split learning and test pairs.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Bucket sizes at which to time a scan against a graph search (random
    /// 384-number unit vectors in 64 topics, queries near a stored one);
    /// nothing else runs.
    #[arg(long, value_delimiter = ',')]
    index_sizes: Vec<usize>,
    /// Random splits into learning and test halves to average over.
    #[arg(long, default_value_t = 50)]
    splits: usize,
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

/// The similarity of a pair's query to its cached prompt through the
/// cache's index (with its negation rule): `None` below `least`.
fn nearest(p: &Scored, least: f64) -> Option<f64> {
    let mut idx = Index::new(1);
    idx.insert(0, p.cached.clone(), Key(1), u64::MAX);
    idx.nearest(0, &p.query, least, 0).map(|(_, s)| s)
}

/// The threshold learned from `learn` (a `verify` share of candidates checked).
fn learned(learn: &[&Scored], l: &Learning, fallback: f64, rng: &mut fastrand::Rng) -> (f64, u64) {
    let mut c = Calibration::default();
    for p in learn {
        let s = nearest(p, l.floor);
        c.lookup(s.is_some());
        if let Some(s) = s.filter(|_| rng.f64() < l.verify) {
            c.observe(s, p.paraphrase);
        }
    }
    (c.threshold(l, fallback), c.observed())
}

/// Good and false hits at `threshold`, through the cache's index.
fn hits_of<'a>(pairs: impl IntoIterator<Item = &'a Scored>, threshold: f64) -> (usize, usize) {
    let (mut good, mut bad) = (0, 0);
    for p in pairs {
        if nearest(p, threshold).is_some() {
            if p.paraphrase {
                good += 1
            } else {
                bad += 1
            }
        }
    }
    (good, bad)
}

/// Good and false hits at `threshold` over all pairs.
fn hits(pairs: &[Scored], threshold: f64) -> (usize, usize) {
    hits_of(pairs, threshold)
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
    if !args.index_sizes.is_empty() {
        index_sizes(&args.index_sizes, args.seed);
        return Ok(());
    }
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
    let mut all_scored = Vec::new();
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
        all_scored.push((e.clone(), scored));
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
    learned_rows(&args, &all_scored);
    Ok(())
}

/// Thresholds learned on one half of the pairs, scored on the other, over
/// `--splits` shuffles: means, and how many splits broke the bound.
fn learned_rows(args: &Args, all: &[(Arc<dyn Embedder>, Vec<Scored>)]) {
    let Some(len) = all.first().map(|(_, s)| s.len()) else { return };
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let splits: Vec<Vec<usize>> = (0..args.splits.max(1))
        .map(|_| {
            let mut order: Vec<usize> = (0..len).collect();
            rng.shuffle(&mut order);
            order
        })
        .collect();
    let half = len / 2;
    println!(
        "\nlearned thresholds, false hits bounded at {:.1}% of lookups: learned on {half} pairs, scored on the other {}, \
         over {} random splits (means; `over` counts splits whose false-hit rate broke the bound)",
        args.bound * 100.0,
        len - half,
        splits.len()
    );
    println!(
        "{:<18} {:<13} {:>7} {:>9} {:>7} {:>9} {:>10} {:>6}",
        "embedder", "threshold", "checks", "value", "hits", "hit rate", "false rate", "over"
    );
    for (e, scored) in all {
        let mut kinds: Vec<(String, f64)> = vec![("static".into(), 0.0)];
        kinds.extend(args.verify.iter().map(|v| (format!("learned {:.0}%", v * 100.0), *v)));
        for (kind, verify) in kinds {
            let (mut checks, mut value, mut good, mut bad, mut over) = (0u64, 0.0, 0usize, 0usize, 0usize);
            for order in &splits {
                let (learn, test) = order.split_at(half);
                let learning: Vec<&Scored> = learn.iter().map(|&i| &scored[i]).collect();
                let l = Learning { bound: args.bound, floor: e.default_threshold() - 0.1, verify };
                let (t, n) = match verify > 0.0 {
                    true => learned(&learning, &l, e.default_threshold(), &mut rng),
                    false => (e.default_threshold(), 0),
                };
                let (g, b) = hits_of(test.iter().map(|&i| &scored[i]), t);
                checks += n;
                value += t.min(1.0);
                good += g;
                bad += b;
                over += usize::from(b as f64 / test.len() as f64 > args.bound);
            }
            let (k, nt) = (splits.len() as f64, (len - half) as f64);
            println!(
                "{:<18} {:<13} {:>7.0} {:>9.4} {:>7.1} {:>8.1}% {:>9.2}% {:>6}",
                e.name(),
                kind,
                checks as f64 / k,
                value / k,
                good as f64 / k,
                100.0 * good as f64 / k / nt,
                100.0 * bad as f64 / k / nt,
                over
            );
        }
    }
}

/// Times a scan against a graph search over buckets of `sizes` prompts:
/// per lookup, and how often the graph finds the stored prompt a query
/// was made near (a scan always does).
fn index_sizes(sizes: &[usize], seed: u64) {
    const DIM: usize = 384;
    const QUERIES: usize = 200;
    let mut rng = fastrand::Rng::with_seed(seed);
    let unit = |v: Vec<f32>| {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    println!("{:>8} {:>12} {:>12} {:>14} {:>8}", "prompts", "scan (µs)", "graph (µs)", "insert (µs)", "recall");
    for &n in sizes {
        // prompts come in topics: 64 centres, each prompt near one of them
        let centres: Vec<Vec<f32>> = (0..64).map(|_| unit((0..DIM).map(|_| rng.f32() - 0.5).collect())).collect();
        let vs: Vec<Vec<f32>> = (0..n)
            .map(|_| {
                let c = &centres[rng.usize(..centres.len())];
                unit(c.iter().map(|x| x + 0.06 * (rng.f32() - 0.5)).collect())
            })
            .collect();
        let t = Instant::now();
        let ann = Ann::new(n);
        for (i, v) in vs.iter().enumerate() {
            ann.insert(v, i);
        }
        let insert_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        let picks: Vec<usize> = (0..QUERIES).map(|_| rng.usize(..n)).collect();
        let queries: Vec<Vec<f32>> =
            picks.iter().map(|&i| unit(vs[i].iter().map(|x| x + 0.02 * (rng.f32() - 0.5)).collect())).collect();
        let t = Instant::now();
        for q in &queries {
            let best = vs.iter().map(|v| embed::similarity(q, v)).fold(f64::MIN, f64::max);
            std::hint::black_box(best);
        }
        let scan_us = t.elapsed().as_secs_f64() * 1e6 / QUERIES as f64;
        let t = Instant::now();
        let found: Vec<Vec<usize>> = queries.iter().map(|q| ann.search(q, 8, &|_| true)).collect();
        let graph_us = t.elapsed().as_secs_f64() * 1e6 / QUERIES as f64;
        let recall = picks.iter().zip(&found).filter(|(i, f)| f.contains(i)).count() as f64 / QUERIES as f64;
        println!("{n:>8} {scan_us:>12.1} {graph_us:>12.1} {insert_us:>14.1} {recall:>8.3}");
    }
}
