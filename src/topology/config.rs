//! `[topology]`: the settings streams, consumers and buckets are laid out from.

use serde::{Deserialize, Serialize};

/// Stream and consumer settings (applied by `topology apply`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopologyConfig {
    /// Most messages waiting in each request stream; beyond it publishes are refused.
    pub max_msgs: i64,
    /// Most bytes in each request stream; beyond it publishes are refused.
    pub max_bytes: i64,
    /// Largest request message in bytes.
    pub max_msg_size: i32,
    /// Oldest a request may get in its stream, in seconds.
    pub max_age_secs: u64,
    /// Window in which a re-published request id is dropped as a duplicate, in seconds.
    pub duplicate_window_secs: u64,
    /// How long results are kept, in seconds, unless their request asks for
    /// less (`Fleet-Result-Ttl`: the ingress's synchronous calls do).
    pub results_max_age_secs: u64,
    /// Most bytes `FLEET_RESULTS` holds (0: no cap). At the cap the oldest
    /// results are dropped to make room (a result dropped early can no
    /// longer be fetched, and a re-sent id is computed again).
    pub results_max_bytes: i64,
    /// Most results `FLEET_RESULTS` holds (0: no cap); the oldest go first.
    pub results_max_msgs: i64,
    /// `file` or `memory` storage for `FLEET_RESULTS`. Memory halves the
    /// server's work per request but loses stored results when a
    /// single server restarts (with 3 replicas they survive one loss).
    /// Applied when the stream is created; changing it means recreating it.
    pub results_storage: Storage,
    /// How long dead letters are kept, in seconds.
    pub dlq_max_age_secs: u64,
    /// Time a worker has to ack before a message is redelivered, in seconds.
    /// A running request is re-armed every third of it, so this is how long
    /// a dead worker's request waits before another worker takes it over.
    pub ack_wait_secs: u64,
    /// Deliveries before a failing message is given up.
    pub max_deliver: i64,
    /// Most unacked messages per consumer across all workers.
    pub max_ack_pending: i64,
    /// Replicas of each stream (1 for a single server; 3 in a cluster).
    pub replicas: usize,
    /// How long a worker stays in the registry (KV `fleet_workers`) after
    /// its last heartbeat, in seconds.
    pub worker_ttl_secs: u64,
    /// Meter usage: workers and ingresses write one record per answered
    /// request to `FLEET_USAGE` (`GET /v1/usage` reads it).
    pub metering: bool,
    /// How long usage records are kept, in seconds (default 35 days: a
    /// month, and the days a monthly report is read in).
    pub usage_max_age_secs: u64,
    /// How long files of the Files API are kept, in seconds (default 30
    /// days; a batch's output file is a file).
    pub files_max_age_secs: u64,
    /// Most bytes the Files API's Object Store holds (0: no cap); beyond it
    /// an upload is refused.
    pub files_max_bytes: i64,
    /// How long an ingress running a file batch may go silent (dead, or
    /// cut off from NATS) before another takes the batch over, in seconds.
    /// Runners re-arm their lease every third of it.
    pub batch_lease_secs: u64,
    /// Record every settled request, with its result, in `FLEET_ARCHIVE`
    /// for this many seconds, for `retro-fleet replay` (0, the default:
    /// off; nothing is recorded).
    pub archive_max_age_secs: u64,
    /// Most bytes the archive holds (0: no cap); beyond it the oldest
    /// records go first.
    pub archive_max_bytes: i64,
    /// Tenants with a `tenant` label of their own on `fleet_tokens_total`,
    /// per process (the first seen); the others are counted as `other`.
    pub usage_tenant_labels: usize,
}

impl Default for TopologyConfig {
    fn default() -> Self {
        TopologyConfig {
            max_msgs: 1_000_000,
            max_bytes: 1 << 30,
            max_msg_size: 1 << 20,
            max_age_secs: 24 * 3600,
            duplicate_window_secs: 120,
            results_max_age_secs: 24 * 3600,
            results_max_bytes: 0,
            results_max_msgs: 0,
            results_storage: Storage::File,
            dlq_max_age_secs: 7 * 24 * 3600,
            ack_wait_secs: 5,
            max_deliver: 5,
            max_ack_pending: 10_000,
            replicas: 1,
            worker_ttl_secs: 10,
            metering: true,
            usage_max_age_secs: 35 * 24 * 3600,
            usage_tenant_labels: 100,
            files_max_age_secs: 30 * 24 * 3600,
            files_max_bytes: 10 << 30,
            batch_lease_secs: 30,
            archive_max_age_secs: 0,
            archive_max_bytes: 1 << 30,
        }
    }
}

/// JetStream storage of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Storage {
    /// On disk.
    File,
    /// In memory.
    Memory,
}

/// The server reports "no limit" as -1 where a client config says 0.
pub(super) fn limit(x: i64) -> i64 {
    if x <= 0 {
        -1
    } else {
        x
    }
}
