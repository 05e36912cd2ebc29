//! Command line: one binary, one subcommand per role or tool.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use figment::providers::Serialized;
use figment::Figment;
use futures::StreamExt;
use retro_fleet_schemas::{
    codec, headers, subjects, Envelope, InferRequest, InferResult, Input, Priority, SamplingParams,
};

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
        #[arg(long, value_delimiter = ',', value_parser = crate::keys_cli::parse_role)]
        roles: Vec<crate::ingress::auth::Role>,
    },
    /// Ids, tenants and roles of the keys.
    List,
    /// Delete a key: ingresses refuse it within moments.
    Revoke {
        /// Key id.
        id: String,
    },
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
        #[arg(long = "for", value_parser = crate::cache_cli::parse_age)]
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
    /// Submit a JSONL file in OpenAI's batch shape; prints the batch.
    Submit {
        /// The JSONL file.
        file: PathBuf,
        /// Priority of its requests (default: low).
        #[arg(long)]
        priority: Option<Priority>,
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
        #[command(flatten)]
        to: IngressArgs,
    },
    /// Print a batch's results as JSONL (finished lines, in input order).
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
        #[arg(long, value_parser = crate::cache_cli::parse_age)]
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

/// `retro-fleet topology apply`.
pub async fn topology_apply(config: &Config) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "topology").await?;
    let js = async_nats::jetstream::new(client);
    for line in crate::topology::apply(&js, &config.topology_plan()).await? {
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
        print!("{}", crate::registry::table(&list, retro_fleet_worker::unix_ms()));
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

/// `retro-fleet submit`.
pub async fn submit(
    config: &Config,
    model: String,
    priority: Priority,
    max_tokens: Option<u32>,
    timeout: u64,
    prompt: String,
) -> anyhow::Result<()> {
    let client = crate::nats::connect(&config.nats, "submit").await?;
    let js = async_nats::jetstream::new(client.clone());
    let req = InferRequest {
        v: retro_fleet_schemas::SCHEMA_VERSION,
        id: ulid::Ulid::new().to_string(),
        model,
        adapter: None,
        input: Input::Completion { prompt },
        params: SamplingParams { max_tokens, ..Default::default() },
        stream: false,
        cache: Default::default(),
        tenant: None,
        metadata: Default::default(),
    };
    let reply = client.new_inbox();
    let mut sub = client.subscribe(reply.clone()).await?;
    // past the wait, a worker answers `deadline_exceeded` instead of running it
    let deadline = retro_fleet_worker::unix_ms() + timeout.saturating_mul(1000);
    let h = Envelope::new(req.id.as_str()).reply(reply.as_str()).deadline_ms(deadline).headers();
    js.publish_with_headers(subjects::request(priority, &req.model), h, codec::encode(&req).into())
        .await?
        .await
        .context("the request streams refused the request (run `retro-fleet topology apply`?)")?;
    let wait = async {
        while let Some(m) = sub.next().await {
            let kind = m.headers.as_ref().and_then(|h| h.get(headers::KIND)).map(|v| v.as_str().to_string());
            if kind.as_deref() == Some(headers::KIND_RESULT) {
                return codec::decode::<InferResult>(None, &m.payload).map_err(anyhow::Error::from);
            }
        }
        anyhow::bail!("subscription closed")
    };
    let result = tokio::time::timeout(Duration::from_secs(timeout), wait)
        .await
        .with_context(|| format!("no result within {timeout} s for request {} (is a worker running?)", req.id))??;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

/// `retro-fleet model tiny-lora`.
pub fn model_tiny_lora(out: &std::path::Path, rank: usize, seed: u64) -> anyhow::Result<()> {
    if rank == 0 {
        anyhow::bail!("--rank must be at least 1");
    }
    retro_fleet_worker::lora::write_tiny_adapter(out, &Default::default(), rank, seed)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("wrote a rank-{rank} LoRA adapter for the tiny model to {}", out.display());
    Ok(())
}

/// `retro-fleet model tiny`.
pub fn model_tiny(out: &std::path::Path, layers: usize, hidden: usize) -> anyhow::Result<()> {
    if hidden == 0 || hidden % 8 != 0 || layers == 0 {
        anyhow::bail!("--hidden must be a positive multiple of 8 and --layers at least 1");
    }
    let sizes = retro_fleet_worker::tiny_model::Tiny { hidden, inter: hidden * 2, layers, ..Default::default() };
    retro_fleet_worker::tiny_model::write(out, &sizes).with_context(|| format!("writing {}", out.display()))?;
    println!("wrote a tiny Llama model to {} ({layers} layers, hidden {hidden})", out.display());
    Ok(())
}

/// `retro-fleet batch ...`.
pub async fn batch(config: &Config, action: BatchAction) -> anyhow::Result<()> {
    let client = |to: &IngressArgs| {
        let base = to.url.clone().unwrap_or_else(|| format!("http://{}", config.ingress.listen));
        crate::batch_cli::Client::new(&base, to.api_key.clone())
    };
    match action {
        BatchAction::Submit { file, priority, wait, to } => {
            let c = client(&to);
            let batch = c.submit(&file, priority.map(|p| p.as_str())).await?;
            let id = batch["id"].as_str().context("the ingress answered without a batch id")?.to_string();
            let batch = if wait { c.wait(&id).await? } else { batch };
            println!("{}", serde_json::to_string_pretty(&batch)?);
        }
        BatchAction::Status { id, to } => {
            println!("{}", serde_json::to_string_pretty(&client(&to).status(&id).await?)?)
        }
        BatchAction::Results { id, to } => print!("{}", client(&to).results(&id).await?),
    }
    Ok(())
}
