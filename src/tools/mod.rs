//! The command line: one binary, one subcommand per role or tool. This
//! module defines it (clap); each tool for people is a module below it.
//!
//! # Layout
//! - [`ops`]: `topology apply`, `workers` (list, drain, resume), `queues` (depths, pause, resume).
//! - [`submit`]: `submit`: one request over NATS, its result printed.
//! - [`batch`]: `batch`: submit, follow and fetch batches over HTTP.
//! - [`dlq`]: `dlq`: list, show and replay dead letters.
//! - [`replay`]: `replay`: send recorded traffic again, paced, and compare the answers.
//! - [`cache`]: `cache warm | purge`: fleet-wide cache tools.
//! - [`keys`]: `keys`: API keys in NATS KV, followed live by ingresses.
//! - [`tenants`]: `tenants`: tenants' settings (weights) in NATS KV, followed live by workers.
//! - [`model`]: `model tiny | tiny-lora`: the small demo model and a LoRA adapter for it.
//!
//! The serving roles (`up`, `ingress`, `worker`, `scaler`) are run by
//! [`crate::roles`] and [`crate::scaler`]; the actions the tools share with
//! the admin API are in [`crate::ops`].

pub mod batch;
pub mod cache;
pub mod dlq;
pub mod keys;
pub mod model;
pub mod ops;
pub mod replay;
pub mod submit;
pub mod tenants;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use figment::providers::Serialized;
use figment::Figment;
use retro_fleet_schemas::Priority;

use crate::config::Config;

/// retro-fleet: LLM inference workers behind NATS JetStream.
///
/// Configuration: built-in defaults < retro-fleet.toml (or --config) <
/// FLEET_* environment (FLEET_WORKER__MAX_INFLIGHT=64) < flags.
#[derive(Debug, Parser)]
#[command(name = "retro-fleet", version, about, long_about)]
pub struct Cli {
    /// Config file (default: ./retro-fleet.toml when it exists).
    #[arg(long, short, global = true, env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma-separated (also NATS_URL).
    #[arg(long, global = true)]
    pub nats_url: Option<String>,
    /// Log format: auto, json or pretty.
    #[arg(long, global = true)]
    pub log_format: Option<String>,
    /// Log level or filter, e.g. `debug` or `info,mistralrs_core=info`
    /// (default `info`, with the model engine's own lines at `warn`;
    /// RUST_LOG wins over both).
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole fleet in one process (ingress + worker), starting a
    /// local nats-server when none answers.
    Up {
        /// HTTP address of the ingress.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run the HTTP ingress alone.
    Ingress {
        /// HTTP address to listen on.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run a worker alone.
    Worker {
        /// Models to serve (comma-separated; default: all configured).
        #[arg(long, value_delimiter = ',')]
        models: Option<Vec<String>>,
        /// Most requests in flight.
        #[arg(long)]
        max_inflight: Option<usize>,
        /// Worker id.
        #[arg(long)]
        id: Option<String>,
    },
    /// Run the scaler alone: samples queues and workers, recommends
    /// replicas per model (`/metrics`, `GET /v1/scaling`, `fleet.scaling.<model>`).
    Scaler {
        /// HTTP address for /metrics, /health/* and /v1/scaling (sets `metrics_listen`).
        #[arg(long)]
        listen: Option<String>,
    },
    /// List the live workers in the registry (KV `fleet_workers`), or drain
    /// and resume one.
    Workers {
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<WorkersAction>,
    },
    /// Metered usage (FLEET_USAGE) added up, as a table or JSON.
    Usage {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this credential (`key:<id>`, `jwt:<iss>/<tenant>/<sub>`).
        #[arg(long)]
        key: Option<String>,
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// First UTC day, YYYY-MM-DD (inclusive).
        #[arg(long, value_parser = parse_day)]
        from: Option<time::Date>,
        /// Last UTC day, YYYY-MM-DD (inclusive).
        #[arg(long, value_parser = parse_day)]
        to: Option<time::Date>,
        /// Dimensions to group by: tenant, key, model, day (comma-separated).
        #[arg(long, default_value = "tenant,model,day")]
        group_by: String,
        /// Print JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Depth of every request queue, or pause and resume a priority class.
    Queues {
        #[command(subcommand)]
        action: Option<QueuesAction>,
    },
    /// Create or update streams and consumers.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Print the effective configuration as TOML (secrets redacted).
    Config {
        /// Print secrets (API key hashes, JWT secrets, NATS passwords) as well.
        #[arg(long)]
        show_secrets: bool,
    },
    /// Model tools.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
    /// API keys kept in NATS KV (`fleet_api_keys`), followed live by ingresses.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Tenants' settings kept in NATS KV (`fleet_tenants`), followed live by workers.
    Tenants {
        #[command(subcommand)]
        action: TenantsAction,
    },
    /// Result cache tools (every worker at once).
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Send one request over NATS and print its result as JSON.
    Submit {
        /// Model name.
        #[arg(long, default_value = "echo")]
        model: String,
        /// Priority class.
        #[arg(long, default_value = "normal")]
        priority: Priority,
        /// Most tokens to generate.
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Seconds to wait for the result.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// The prompt.
        prompt: String,
    },
    /// Dead letters: list, show, replay.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Batches: submit a JSONL file, follow it, fetch its results.
    Batch {
        #[command(subcommand)]
        action: BatchAction,
    },
    /// Send recorded requests again, from the archive (FLEET_ARCHIVE, on
    /// when topology.archive_max_age_secs is set) or a JSONL file of its
    /// records, paced as recorded (or N times faster, or as fast as the
    /// fleet takes them); --compare reports which answers changed.
    Replay(replay::ReplayArgs),
}

/// `workers` actions. A worker is named by its id (`retro-fleet workers`).
#[derive(Debug, Subcommand)]
pub enum WorkersAction {
    /// Stop one worker taking requests: what it runs finishes, and it stays
    /// up (shown as draining) until resumed. Stopping it is SIGTERM's job.
    Drain {
        /// Worker id.
        id: String,
    },
    /// Let a drained worker take requests again.
    Resume {
        /// Worker id.
        id: String,
    },
}

/// `keys` actions.
#[derive(Debug, Subcommand)]
pub enum KeysAction {
    /// Make a new random key; prints it once (the fleet stores its SHA-256).
    Add {
        /// Key id (in logs and rate-limit keys; never secret).
        id: String,
        /// Tenant of every request made with the key.
        #[arg(long)]
        tenant: String,
        /// Roles: submit, read, admin (comma-separated).
        #[arg(long, value_delimiter = ',', value_parser = keys::parse_role)]
        roles: Vec<crate::ingress::auth::Role>,
        /// Highest priority class its requests may use [default: high].
        #[arg(long)]
        max_priority: Option<Priority>,
        /// Highest priority class its batches may use [default: normal].
        #[arg(long)]
        max_batch_priority: Option<Priority>,
        #[command(flatten)]
        budget: BudgetArgs,
    },
    /// Set (or, with no limit given, remove) a key's own budget.
    Budget {
        /// Key id.
        id: String,
        #[command(flatten)]
        budget: BudgetArgs,
    },
    /// Ids, tenants, roles and budgets of the keys.
    List,
    /// Delete a key: ingresses refuse it within moments.
    Revoke {
        /// Key id.
        id: String,
    },
}

/// `tenants` actions.
#[derive(Debug, Subcommand)]
pub enum TenantsAction {
    /// Every tenant with settings.
    List,
    /// Set a tenant's settings (a setting left out gets its default).
    Set {
        /// Tenant.
        tenant: String,
        /// Share of each worker's slots against other tenants with work in
        /// the same class (positive, at most 1000).
        #[arg(long, default_value_t = 1.0)]
        weight: f64,
        #[command(flatten)]
        budget: BudgetArgs,
    },
}

/// A budget on the command line: what may be used per UTC day or month.
#[derive(Debug, Clone, clap::Args)]
pub struct BudgetArgs {
    /// Prompt and completion tokens per period (none: no token budget).
    #[arg(long, value_name = "TOKENS")]
    pub budget_tokens: Option<u64>,
    /// Requests per period (none: no request budget).
    #[arg(long, value_name = "REQUESTS")]
    pub budget_requests: Option<u64>,
    /// The budget's period: day or month (UTC).
    #[arg(long, value_name = "PERIOD", default_value = "month", value_parser = parse_period)]
    pub budget_per: retro_fleet_schemas::Period,
}

impl BudgetArgs {
    /// The budget asked for; none when neither limit is given.
    pub fn budget(&self) -> Option<retro_fleet_schemas::Budget> {
        (self.budget_tokens.is_some() || self.budget_requests.is_some()).then_some(retro_fleet_schemas::Budget {
            tokens: self.budget_tokens,
            requests: self.budget_requests,
            per: self.budget_per,
        })
    }
}

fn parse_period(s: &str) -> Result<retro_fleet_schemas::Period, String> {
    retro_fleet_schemas::Period::parse(s).ok_or_else(|| format!("`{s}` is not a period: use day or month"))
}

/// `queues` actions.
#[derive(Debug, Subcommand)]
pub enum QueuesAction {
    /// Stop delivering a priority class to every worker (requests still
    /// queue): JetStream pauses its worker consumers.
    Pause {
        /// Priority class.
        priority: Priority,
        /// Resume by itself after this long (`90`, `15m`, `2h`, `7d`); default: until resumed.
        #[arg(long = "for", value_parser = cache::parse_age)]
        duration: Option<std::time::Duration>,
    },
    /// Deliver a paused priority class again.
    Resume {
        /// Priority class.
        priority: Priority,
    },
}

/// `dlq` actions. Filters are `key=value` (keys: model, priority, code, id,
/// tenant); several must all match.
#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// One line per dead letter, oldest first.
    List {
        /// Only letters matching, e.g. `--filter model=echo --filter code=decode_error`.
        #[arg(long)]
        filter: Vec<String>,
        /// Most letters shown.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// One dead letter in full: headers, error and payload.
    Show {
        /// Its sequence number (from `dlq list`).
        seq: u64,
    },
    /// Re-publish dead letters to their request streams with a fresh
    /// delivery history, then delete them from the DLQ.
    Replay {
        /// Only letters matching.
        #[arg(long)]
        filter: Vec<String>,
        /// Most letters replayed.
        #[arg(long, default_value_t = usize::MAX)]
        limit: usize,
        /// Keep the letters in the DLQ after replaying them.
        #[arg(long)]
        keep: bool,
        /// Print what would be replayed, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `batch` actions (over HTTP, through the ingress).
#[derive(Debug, Subcommand)]
pub enum BatchAction {
    /// Submit a JSONL file in OpenAI's batch shape (uploaded, then a batch
    /// created from it); prints the batch.
    Submit {
        /// The JSONL file.
        file: PathBuf,
        /// Priority of its requests (default: low).
        #[arg(long)]
        priority: Option<Priority>,
        /// How long the batch may take (`24h`, `90m`, `30s`); it then
        /// expires with the lines done so far.
        #[arg(long, default_value = "24h")]
        window: String,
        /// Follow progress with a bar until every line has finished.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        to: IngressArgs,
    },
    /// Print a batch with its request counts.
    Status {
        /// Batch id.
        id: String,
        /// Follow progress with a bar until the batch ends.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        to: IngressArgs,
    },
    /// Cancel a batch: lines not yet sent never run, running ones stop.
    Cancel {
        /// Batch id.
        id: String,
        #[command(flatten)]
        to: IngressArgs,
    },
    /// Print a batch's results as JSONL: its output file, then its error
    /// file, each in input order.
    Results {
        /// Batch id.
        id: String,
        #[command(flatten)]
        to: IngressArgs,
    },
}

/// Which ingress, and the credential.
#[derive(Debug, clap::Args)]
pub struct IngressArgs {
    /// Ingress base URL (default: http:// + ingress.listen).
    #[arg(long)]
    pub url: Option<String>,
    /// API key or JWT.
    #[arg(long, env = "FLEET_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// `model` actions.
#[derive(Debug, Subcommand)]
pub enum ModelAction {
    /// Write a small random LoRA adapter (PEFT format) for the tiny model.
    TinyLora {
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Adapter rank.
        #[arg(long, default_value_t = 4)]
        rank: usize,
        /// Seed of the random weights (different seeds, different adapters).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Write a tiny random-weights Llama model (safetensors, tokenizer, chat
    /// template) that mistral.rs loads: for demos and tests, no download.
    Tiny {
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// Decoder layers.
        #[arg(long, default_value_t = 2)]
        layers: usize,
        /// Hidden size (a multiple of 8).
        #[arg(long, default_value_t = 64)]
        hidden: usize,
    },
}

/// `cache` actions.
#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Replay stored results (FLEET_RESULTS) into every running worker's cache.
    Warm {
        /// Only results stored within this age, e.g. 30m, 6h, 7d (default: all kept).
        #[arg(long, value_parser = cache::parse_age)]
        since: Option<Duration>,
        /// Only results from this stream sequence on (wins over --since).
        #[arg(long)]
        from_seq: Option<u64>,
        /// Give up waiting for the workers after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Make every worker forget the cached answers of models (all when none named).
    Purge {
        /// Models to purge.
        #[arg(long = "model", value_name = "MODEL")]
        models: Vec<String>,
    },
}

/// `topology` actions.
#[derive(Debug, Subcommand)]
pub enum TopologyAction {
    /// Create or update every stream and worker consumer (idempotent).
    Apply,
    /// Each stream's, bucket's and worker consumer's replicas, leader and
    /// how current the other copies are.
    Status,
}

impl Cli {
    /// Loads the configuration with this command line's flags on top.
    pub fn load_config(&self) -> Result<Config, figment::Error> {
        let mut flags = Figment::new();
        if let Some(url) = &self.nats_url {
            flags = flags.merge(Serialized::default("nats.url", url));
        }
        if let Some(f) = &self.log_format {
            flags = flags.merge(Serialized::default("log.format", f));
        }
        if let Some(l) = &self.log_level {
            flags = flags.merge(Serialized::default("log.level", l));
        }
        match &self.command {
            Command::Up { listen: Some(l) } | Command::Ingress { listen: Some(l) } => {
                flags = flags.merge(Serialized::default("ingress.listen", l));
            }
            Command::Scaler { listen: Some(l) } => {
                flags = flags.merge(Serialized::default("metrics_listen", l));
            }
            Command::Worker { models, max_inflight, id } => {
                if let Some(m) = models {
                    flags = flags.merge(Serialized::default("worker.models", m));
                }
                if let Some(n) = max_inflight {
                    flags = flags.merge(Serialized::default("worker.max_inflight", n));
                }
                if let Some(i) = id {
                    flags = flags.merge(Serialized::default("worker.id", i));
                }
            }
            _ => {}
        }
        Config::load(self.config.as_deref(), flags)
    }
}

fn parse_day(s: &str) -> Result<time::Date, String> {
    crate::usage::parse_day(s).ok_or_else(|| format!("`{s}` is not a day: write YYYY-MM-DD"))
}
