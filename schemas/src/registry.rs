//! Worker registry entries (KV bucket `fleet_workers`, one key per worker,
//! JSON values) and the scaler's reports (`fleet.scaling.<model>`, JSON).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A worker's heartbeat, written to `fleet_workers` under its id every few
/// seconds. The bucket's max age is the TTL: a worker that stops writing
/// disappears from the registry by itself; one that shuts down deletes its key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkerInfo {
    /// Schema version of this message.
    #[serde(default = "crate::version::default_version")]
    pub v: u32,
    /// Worker id.
    pub id: String,
    /// Models it serves.
    pub models: Vec<String>,
    /// Most requests it runs at once.
    pub capacity: u32,
    /// Requests running now.
    pub inflight: u32,
    /// Requests finished since it started (any outcome).
    pub completed: u64,
    /// Requests finished per second over the last heartbeat interval.
    pub throughput: f64,
    /// Mean backend time per request over the last interval, in ms
    /// (`None` when nothing finished).
    pub latency_ms: Option<f64>,
    /// The same figures per model it serves.
    #[serde(default)]
    pub per_model: BTreeMap<String, ModelLoad>,
    /// Whether it takes no new work: shutting down, or drained by an operator.
    #[serde(default)]
    pub draining: bool,
    /// When it started, unix ms.
    pub started_ms: u64,
    /// When this heartbeat was written, unix ms.
    pub updated_ms: u64,
    /// Running totals since it started, for readers that want rates and
    /// percentiles over their own window (the console).
    #[serde(default)]
    pub totals: Totals,
}

/// A worker's running totals since it started. A reader takes the
/// difference of two heartbeats and adds it up across workers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Totals {
    /// Requests that finished with an error.
    #[serde(default)]
    pub failed: u64,
    /// Cache lookups answered from the cache (memory, disk, semantic or
    /// another worker's answer).
    #[serde(default)]
    pub cache_hits: u64,
    /// Cache lookups that found nothing.
    #[serde(default)]
    pub cache_misses: u64,
    /// Finished requests whose time from publish to result was at most each
    /// bound of `latency_bounds_s`, cumulative like a Prometheus histogram;
    /// one more entry counts them all.
    #[serde(default)]
    pub latency_counts: Vec<u64>,
    /// The bounds of `latency_counts`, in seconds.
    #[serde(default)]
    pub latency_bounds_s: Vec<f64>,
}

/// One model's load on one worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelLoad {
    /// Requests finished since start.
    pub completed: u64,
    /// Requests finished per second over the last interval.
    pub throughput: f64,
    /// Mean backend time over the last interval, in ms.
    pub latency_ms: Option<f64>,
    /// How long this worker took to load the model, in ms (the scaler
    /// counts workers it recommended as coming for this long).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<u64>,
}

/// A count per priority class (requests, or milliseconds).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PerPriority {
    /// High priority.
    pub high: u64,
    /// Normal priority.
    pub normal: u64,
    /// Low priority.
    pub low: u64,
}

/// The scaler's view of one model, published on `fleet.scaling.<model>`
/// after every sample and served at `GET /v1/scaling`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelScaling {
    /// Schema version of this message.
    #[serde(default = "crate::version::default_version")]
    pub v: u32,
    /// Model name.
    pub model: String,
    /// When the sample was taken, unix ms.
    pub at_ms: u64,
    /// Recommended worker replicas.
    pub replicas: u32,
    /// What this sample alone asks for (before the scale-down cool-down).
    pub desired: u32,
    /// Why: `stable`, `scale_up`, `scale_down`, `idle`, `at_max` or
    /// `loading` (held while recommended workers load the model).
    pub reason: String,
    /// Live workers serving the model (from the registry).
    pub workers: u32,
    /// Waiting plus unacknowledged requests, per priority.
    pub backlog: PerPriority,
    /// Age of the oldest request no worker has taken yet, ms, per priority
    /// (0: none waiting; a paused class is not counted).
    #[serde(default)]
    pub oldest_wait_ms: PerPriority,
    /// Backlog weighted by priority.
    pub weighted_backlog: f64,
    /// Requests arriving per second.
    pub arrival_rate: f64,
    /// Requests completed per second.
    pub completion_rate: f64,
    /// Service rate of one worker used for the recommendation, requests/s.
    pub service_rate: f64,
    /// Seconds until the backlog is gone at the current completion and
    /// arrival rates; `None` when it is not shrinking.
    pub drain_secs: Option<f64>,
    /// Seconds to drain with the recommended replicas; `None` if they cannot keep up.
    pub drain_secs_at_recommended: Option<f64>,
    /// Trend of the backlog over the window, requests/s (positive: growing).
    pub lag_slope: Option<f64>,
    /// Mean backend latency reported by the workers, ms.
    pub latency_ms: Option<f64>,
    /// Trend of that latency over the window, ms/s.
    pub latency_slope: Option<f64>,
    /// Warnings: `lag_growing`, `lag_anomaly`, `latency_anomaly`,
    /// `no_workers_with_backlog`.
    pub warnings: Vec<String>,
}

/// Whether `s` is usable as a KV key (worker ids become keys).
pub fn is_kv_key(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && !s.ends_with('.')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'.' | b'/'))
}

/// `id` with every character a KV key cannot hold replaced by `_`.
pub fn kv_key(id: &str) -> String {
    let k: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=') { c } else { '_' }).collect();
    if k.is_empty() {
        "_".into()
    } else {
        k
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_keys() {
        assert_eq!(kv_key("host-1.local:42"), "host-1_local_42");
        assert!(is_kv_key(&kv_key("a b/c*>")));
        assert!(is_kv_key(&kv_key("")));
        assert!(!is_kv_key("a b"));
    }

    #[test]
    fn worker_info_reads_without_optional_fields() {
        let json = r#"{"id":"w","models":["echo"],"capacity":4,"inflight":0,"completed":0,
            "throughput":0.0,"latency_ms":null,"started_ms":1,"updated_ms":2}"#;
        let w: WorkerInfo = serde_json::from_str(json).unwrap();
        assert_eq!(w.v, crate::version::SCHEMA_VERSION);
        assert!(w.per_model.is_empty() && !w.draining);
    }
}
