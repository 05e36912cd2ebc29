//! Worker and model configuration (read by the root crate's figment config).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How one worker pulls and runs requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Worker id in logs, results and the registry; default `<hostname>-<pid>`.
    pub id: Option<String>,
    /// Models this worker serves; empty means every configured model.
    pub models: Vec<String>,
    /// Most requests in flight at once (backpressure: nothing more is pulled).
    pub max_inflight: usize,
    /// Most messages taken in one pull.
    pub batch_size: usize,
    /// Guaranteed share of pulled slots for normal requests while high ones wait (0 to 0.5).
    pub normal_share: f64,
    /// Guaranteed share of pulled slots for low requests while higher ones wait (0 to 0.5).
    pub low_share: f64,
    /// How long one pull request waits at the server before it is renewed, in ms.
    pub idle_wait_ms: u64,
    /// Grace period for in-flight work on shutdown, in ms.
    pub drain_timeout_ms: u64,
    /// Largest prompt (bytes of text) a worker accepts.
    pub max_prompt_bytes: usize,
    /// How often to look for requests to models no one serves, in ms (0 = never).
    pub unrouted_sweep_ms: u64,
    /// How often to look for tenants' lanes (`fleet.req.<class>.<model>.<tenant>`)
    /// holding requests, in ms (10 to 10,000). A tenant quiet for a minute
    /// waits up to this long on its next first request.
    pub lane_scan_ms: u64,
    /// Slots beyond `max_inflight` that tenants running less than their
    /// share may take, so their requests start at once instead of waiting
    /// behind another tenant's flood (0 = they wait for a slot to free).
    pub fair_burst: usize,
    /// Memory budget of loaded model instances in bytes, estimated from
    /// their weight files (0: no limit). Loading past it first unloads idle
    /// instances of the least recently used models.
    pub model_memory_bytes: u64,
    /// The result cache.
    pub cache: crate::cache::CacheConfig,
    /// Circuit breaker of each model instance.
    pub breaker: crate::breaker::BreakerConfig,
    /// How often to write this worker's entry in the registry (KV
    /// `fleet_workers`), in ms (0 = never). Keep it well below the
    /// registry's TTL (`topology.worker_ttl_secs`).
    pub heartbeat_ms: u64,
    /// Threads of `retro-fleet worker`'s async runtime (messaging, cache;
    /// models compute on their own threads and load on a loader thread).
    /// 1 runs it all on one thread, which batches socket writes and costs
    /// a third less CPU per message than a multi-threaded runtime.
    pub threads: usize,
    /// Streamed text: at most one chunk per this many ms after the first
    /// visible text (which goes out at once); pieces generated meanwhile
    /// travel together. 0 sends every piece as it comes (one NATS message
    /// per token); at most 10,000.
    pub stream_interval_ms: u64,
    /// About how many chunks a second this worker's streams send together:
    /// each stream's interval is its share (16 ms each for 16 streams at
    /// 1,000), at most `stream_interval_ms`. A lone stream's text flows;
    /// many streams coalesce. 0: every stream waits `stream_interval_ms`.
    pub stream_chunks_per_sec: u32,
    /// How often a generation writes its tokens so far to KV
    /// `fleet_checkpoints`, in ms (0 = never): when its worker dies, the
    /// next attempt goes on from the last checkpoint instead of starting
    /// again. At most 10,000.
    pub checkpoint_interval_ms: u64,
}

impl WorkerConfig {
    /// Values the types admit but that cannot work, as a message naming the
    /// key (`worker.…`) and its range.
    pub fn check(&self) -> Result<(), String> {
        if self.max_inflight == 0 {
            return Err("`worker.max_inflight` must be at least 1: a worker holding no request takes none".into());
        }
        if self.batch_size == 0 {
            return Err("`worker.batch_size` must be at least 1: it is how many messages one pull may bring".into());
        }
        for (key, share) in [("normal_share", self.normal_share), ("low_share", self.low_share)] {
            if !(0.0..=0.5).contains(&share) {
                return Err(format!(
                    "`worker.{key}` is {share}; it is a fraction of the worker's slots from 0 to 0.5 \
                     (the rest go to higher priorities first)"
                ));
            }
        }
        if !(10..=MAX_INTERVAL_MS).contains(&self.lane_scan_ms) {
            return Err(format!(
                "`worker.lane_scan_ms` is {}; it is from 10 to {MAX_INTERVAL_MS} (ms between looks for tenants' \
                 lanes; requests in a lane no worker looks for are never served)",
                self.lane_scan_ms
            ));
        }
        if self.stream_interval_ms > MAX_INTERVAL_MS {
            return Err(format!(
                "`worker.stream_interval_ms` is {}; at most {MAX_INTERVAL_MS} (ms between streamed chunks)",
                self.stream_interval_ms
            ));
        }
        if self.checkpoint_interval_ms > MAX_INTERVAL_MS {
            return Err(format!(
                "`worker.checkpoint_interval_ms` is {}; at most {MAX_INTERVAL_MS} (ms between checkpoints; 0 turns them off)",
                self.checkpoint_interval_ms
            ));
        }
        Ok(())
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: None,
            models: Vec::new(),
            max_inflight: 256,
            batch_size: 128,
            normal_share: 0.2,
            low_share: 0.1,
            idle_wait_ms: 1_000,
            drain_timeout_ms: 30_000,
            max_prompt_bytes: 256 * 1024,
            unrouted_sweep_ms: 5_000,
            lane_scan_ms: 250,
            fair_burst: 16,
            model_memory_bytes: 0,
            cache: Default::default(),
            breaker: Default::default(),
            heartbeat_ms: 2_000,
            threads: 1,
            stream_interval_ms: 20,
            stream_chunks_per_sec: 1_000,
            checkpoint_interval_ms: 1_000,
        }
    }
}

/// A model the fleet serves, by backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelConfig {
    /// Returns the input (for tests, demos and overhead benchmarks).
    Echo {
        /// Revision reported in results.
        #[serde(default)]
        revision: Option<String>,
    },
    /// Sleeps a fixed latency per request, then returns fixed text (for scaling benchmarks).
    Synthetic {
        /// Time each request takes, in ms.
        #[serde(default = "default_latency_ms")]
        latency_ms: u64,
        /// Words of output per request when the request sets no `max_tokens`.
        #[serde(default = "default_output_tokens")]
        output_tokens: u32,
        /// Most requests served at once by one worker (further ones queue in the worker).
        #[serde(default)]
        concurrency: Option<usize>,
        /// Revision reported in results.
        #[serde(default)]
        revision: Option<String>,
        /// Fraction of calls (0..1) that fail with a retryable `backend_error`,
        /// to exercise retries, circuit breakers and dead letters.
        #[serde(default)]
        fail_rate: f64,
    },
    /// A text model run by mistral.rs (needs the `mistralrs` feature, on by default).
    Mistralrs {
        /// Directory with `config.json`, `tokenizer.json`, `tokenizer_config.json`
        /// and safetensors weights (or holding `gguf_file`), or a Hugging Face
        /// model id `org/name` (see [`crate::hub`]).
        path: std::path::PathBuf,
        /// GGUF file inside `path`, for a quantized model.
        #[serde(default)]
        gguf_file: Option<String>,
        /// In-situ quantization of safetensors weights, e.g. `q4k`, `q8_0`.
        #[serde(default)]
        isq: Option<String>,
        /// Sequences one instance batches together.
        #[serde(default = "default_max_num_seqs")]
        max_num_seqs: usize,
        /// How requests enter the engine: `cohort` (together, so the engine
        /// batches them; see [`Admission`]) or `continuous`.
        #[serde(default)]
        admission: Admission,
        /// With `cohort`: how long a request that finds the engine idle waits
        /// for companions, in milliseconds (at most 10,000). Only when the
        /// last cohort had some: a lone caller never waits.
        #[serde(default = "default_gather_ms")]
        gather_ms: u64,
        /// `max_tokens` of requests that set none.
        #[serde(default = "default_max_tokens")]
        default_max_tokens: u32,
        /// Most instances in each worker (a pool; see `balance`, `grow_at`).
        #[serde(default = "default_instances")]
        instances: usize,
        /// Instances loaded at start; 0 loads the first on the first request.
        #[serde(default = "default_instances")]
        warm_instances: usize,
        /// Requests in flight on every loaded instance before another is
        /// loaded; default `max_num_seqs`.
        #[serde(default)]
        grow_at: Option<usize>,
        /// Unload an instance idle this many seconds (0: never).
        #[serde(default)]
        idle_unload_secs: u64,
        /// Routing over loaded instances: `least_busy` or `round_robin`.
        #[serde(default)]
        balance: Balance,
        /// Revision reported in results; default: a hash of the model files.
        #[serde(default)]
        revision: Option<String>,
        /// LoRA adapters by name: directories in PEFT format
        /// (`adapter_config.json`, `adapter_model.safetensors`). Each is
        /// merged into a copy of the weights and served by its own instance.
        #[serde(default)]
        adapters: BTreeMap<String, std::path::PathBuf>,
    },
    /// A sentence-embedding model (a sentence-transformers BERT such as
    /// all-MiniLM-L6-v2) run in process with candle: it answers texts to
    /// embed (`POST /v1/embeddings`, input type `embed`), one unit vector
    /// each (needs the `mistralrs` feature, which brings candle).
    Embedding {
        /// Directory with `config.json`, `model.safetensors` and `tokenizer.json`.
        path: std::path::PathBuf,
        /// Revision reported in results; default: a hash of the model files.
        #[serde(default)]
        revision: Option<String>,
    },
}

impl ModelConfig {
    /// Values the types admit but that cannot work in model `name`, as a
    /// message naming the key (`models.<name>.…`).
    pub fn check(&self, name: &str) -> Result<(), String> {
        if let ModelConfig::Mistralrs { gather_ms, max_num_seqs, admission, .. } = self {
            let cohort = *admission == Admission::Cohort;
            if cohort && *gather_ms > MAX_INTERVAL_MS {
                return Err(format!(
                    "`models.{name}.gather_ms` is {gather_ms}; at most {MAX_INTERVAL_MS} (ms a cohort waits for companions)"
                ));
            }
            if *max_num_seqs == 0 {
                return Err(format!("`models.{name}.max_num_seqs` must be at least 1"));
            }
        }
        Ok(())
    }

    /// Tokens a request that sets no `max_tokens` may generate, where the
    /// backend has such a default (echo answers with its input).
    pub fn default_max_tokens(&self) -> Option<u32> {
        match self {
            ModelConfig::Echo { .. } | ModelConfig::Embedding { .. } => None,
            ModelConfig::Synthetic { output_tokens, .. } => Some(*output_tokens),
            ModelConfig::Mistralrs { default_max_tokens, .. } => Some(*default_max_tokens),
        }
    }

    /// A mistral.rs model in `path` answering at most `default_max_tokens`
    /// when a request sets none; every other setting at its default.
    pub fn mistralrs(path: std::path::PathBuf, default_max_tokens: u32) -> Self {
        ModelConfig::Mistralrs {
            path,
            gguf_file: None,
            isq: None,
            max_num_seqs: default_max_num_seqs(),
            admission: Default::default(),
            gather_ms: default_gather_ms(),
            default_max_tokens,
            instances: default_instances(),
            warm_instances: default_instances(),
            grow_at: None,
            idle_unload_secs: 0,
            balance: Default::default(),
            revision: None,
            adapters: Default::default(),
        }
    }
}

fn default_max_num_seqs() -> usize {
    32
}

fn default_gather_ms() -> u64 {
    2
}

fn default_max_tokens() -> u32 {
    256
}

fn default_instances() -> usize {
    1
}

fn default_latency_ms() -> u64 {
    50
}

fn default_output_tokens() -> u32 {
    16
}

/// How requests enter a mistral.rs engine (the cohort gate is `backend::cohort`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admission {
    /// Together, in cohorts of at most `max_num_seqs` (see the cohort module's docs).
    #[default]
    Cohort,
    /// As they come: the engine's own scheduling.
    Continuous,
}

impl std::str::FromStr for Admission {
    type Err = String;

    /// The names of the configuration file (`cohort`, `continuous`).
    fn from_str(s: &str) -> Result<Admission, String> {
        Admission::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s))
            .map_err(|e| e.to_string())
    }
}

/// How a model's pool spreads requests over its loaded instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The instance with the fewest requests in flight (ties: round robin).
    #[default]
    LeastBusy,
    /// Each loaded instance in turn.
    RoundRobin,
}

/// The fleet's model catalogue: name → model.
pub type Models = BTreeMap<String, ModelConfig>;

/// Longest setting of the intervals that pace a request (`gather_ms`,
/// `stream_interval_ms`), in ms: beyond it a setting is a mistake, not a wait.
pub const MAX_INTERVAL_MS: u64 = 10_000;

/// The catalogue used when none is configured: one `echo` model.
pub fn default_models() -> Models {
    BTreeMap::from([("echo".to_string(), ModelConfig::Echo { revision: None })])
}
