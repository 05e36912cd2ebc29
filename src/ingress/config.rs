//! The ingress's settings (`[ingress]`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the ingress is built from: its section and what it must know of
/// the rest of the fleet.
#[derive(Debug, Clone)]
pub struct Setup {
    /// `[ingress]`.
    pub ingress: IngressConfig,
    /// The fleet's layout: models, buckets, the workers' registry TTL.
    pub plan: crate::topology::Plan,
    /// Each model's own `max_tokens` default, where it has one: what a
    /// request that sets none is charged for its output.
    pub output_defaults: BTreeMap<String, u64>,
    /// What `GET /v1/admin/config` shows: the whole configuration, every
    /// secret already redacted.
    pub config_view: serde_json::Value,
    /// Meters the answers this ingress gives from its memory (metering on).
    pub meter: Option<std::sync::Arc<retro_fleet_worker::usage::Meter>>,
}

/// HTTP ingress settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngressConfig {
    /// Address to listen on.
    pub listen: String,
    /// How long a synchronous call waits for its result, in ms (also its deadline).
    pub request_timeout_ms: u64,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Largest prompt in bytes of text (413 beyond).
    pub max_prompt_bytes: usize,
    /// Seconds a client is told to wait (`Retry-After`) when a queue is full.
    pub retry_after_secs: u64,
    /// Connection caps and header/body timeouts (`[ingress.connections]`).
    pub connections: super::conn::ConnectionLimits,
    /// Authentication: API keys and JWTs (off by default for local use).
    pub auth: super::auth::AuthConfig,
    /// Rate limits per caller and route class.
    pub rate_limit: super::ratelimit::RateLimitConfig,
    /// Most lines in one batch (`POST /v1/batches`).
    pub max_batch_lines: usize,
    /// Largest batch body in bytes (413 beyond).
    pub max_batch_bytes: usize,
    /// Deadline of each batch request, in seconds from submission.
    pub batch_timeout_secs: u64,
    /// Largest file upload in bytes (`POST /v1/files`, 413 beyond).
    pub max_file_bytes: usize,
    /// Most lines of one file batch running at once: what a batch may take
    /// of its class, whatever its size.
    pub batch_max_in_flight: usize,
    /// File batches this ingress runs at once (others wait their turn, or
    /// run on other ingresses).
    pub batch_runners: usize,
    /// The ingress's memory of recent answers (the first cache level).
    pub cache: super::answers::AnswerCacheConfig,
    /// On SIGTERM, how long calls in flight may still finish, in ms; those
    /// still waiting then are answered 503 (retry: the request id is kept).
    pub drain_timeout_ms: u64,
    /// How long the result of a synchronous call (streamed or not) is kept
    /// in `FLEET_RESULTS`, in seconds: its caller has it already, so only
    /// as long as a retry with the same id may come (the duplicate window)
    /// or a caller whose wait timed out may fetch it. 0 keeps it as long
    /// as asynchronous results (`topology.results_max_age_secs`). A caller
    /// may ask for longer with `X-Result-Ttl`.
    pub sync_result_ttl_secs: u64,
    /// Threads of `retro-fleet ingress`'s async runtime (0: one per core).
    pub threads: usize,
    /// Completion webhooks (`[ingress.webhooks]`; off without allowed hosts).
    pub webhooks: super::webhooks::WebhookConfig,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            listen: "127.0.0.1:8080".into(),
            request_timeout_ms: 30_000,
            max_body_bytes: 2 << 20,
            max_prompt_bytes: 256 * 1024,
            retry_after_secs: 1,
            connections: Default::default(),
            auth: Default::default(),
            rate_limit: Default::default(),
            max_batch_lines: 50_000,
            max_batch_bytes: 64 << 20,
            batch_timeout_secs: 24 * 3600,
            max_file_bytes: 200 << 20,
            batch_max_in_flight: 64,
            batch_runners: 4,
            cache: Default::default(),
            drain_timeout_ms: 30_000,
            sync_result_ttl_secs: 120,
            threads: 0,
            webhooks: Default::default(),
        }
    }
}
