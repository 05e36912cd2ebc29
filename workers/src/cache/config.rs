//! The cache's settings (`[worker.cache]`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::embed::EmbedderConfig;

/// Cache settings of a worker (`[worker.cache]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Cache answers at all.
    pub enabled: bool,
    /// Memory tier budget in bytes.
    pub memory_bytes: usize,
    /// Disk tier budget in bytes (0: memory only).
    pub disk_bytes: usize,
    /// Disk tier directory; default `<data_dir>/cache`. One worker process per directory.
    pub dir: Option<PathBuf>,
    /// How long an answer stays valid, in seconds (a request's `Fleet-Cache-Ttl` overrides it).
    pub ttl_secs: u64,
    /// Cache only reproducible requests (temperature 0 or a seed).
    pub deterministic_only: bool,
    /// Let one worker compute an answer while other workers wait for it (claims in KV `fleet_cache_claims`).
    pub coalesce_across_workers: bool,
    /// How long a worker waits for another worker's claimed answer before computing it itself, in ms.
    pub claim_wait_ms: u64,
    /// Replay recent `FLEET_RESULTS` into the cache when the worker starts.
    pub warm_on_start: bool,
    /// How far back `warm_on_start` replays, in seconds.
    pub warm_window_secs: u64,
    /// Models whose answers may be served to similar prompts (requests opt in with cache mode `semantic`).
    pub semantic_models: Vec<String>,
    /// How prompts are compared: `"lexical"` (no model, shared words only)
    /// or `{ path = "<sentence-transformers directory>" }` (docs/CACHE.md).
    pub semantic_embedder: EmbedderConfig,
    /// Models whose prompts another embedder compares, e.g.
    /// `{ coder = { path = "/models/code-embedder" } }` (each also in `semantic_models`).
    pub semantic_embedders: BTreeMap<String, EmbedderConfig>,
    /// Least cosine similarity for a semantic hit (0..1); default: the
    /// embedder's own, measured on the labelled set (lexical 0.95, MiniLM 0.975).
    pub semantic_threshold: Option<f64>,
    /// Most prompts held by the semantic index.
    pub semantic_max_entries: usize,
    /// Learn each model's threshold so that at most this share of semantic
    /// lookups gets a wrong answer (e.g. 0.02); needs
    /// `semantic_verify_fraction` (docs/CACHE.md). Unset: the static threshold.
    pub semantic_error_bound: Option<f64>,
    /// Share of semantic candidates (hits or near hits) also computed and
    /// compared with the cached answer; a disagreement vetoes the entry for
    /// that neighbour and, with `semantic_error_bound`, teaches the threshold.
    pub semantic_verify_fraction: f64,
    /// Least similarity of a candidate; default: the threshold less 0.1.
    pub semantic_verify_floor: Option<f64>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: true,
            memory_bytes: 256 << 20,
            disk_bytes: 1 << 30,
            dir: None,
            ttl_secs: 86_400,
            deterministic_only: true,
            coalesce_across_workers: false,
            claim_wait_ms: 30_000,
            warm_on_start: false,
            warm_window_secs: 86_400,
            semantic_models: Vec::new(),
            semantic_embedder: EmbedderConfig::default(),
            semantic_embedders: BTreeMap::new(),
            semantic_threshold: None,
            semantic_max_entries: 100_000,
            semantic_error_bound: None,
            semantic_verify_fraction: 0.0,
            semantic_verify_floor: None,
        }
    }
}
