//! What every message's task needs, shared by all of them.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

use crate::backend::Backend;
use crate::cache::ResultCache;
use crate::config::WorkerConfig;
use crate::metrics::Metrics;

/// What every message handler needs; shared by all in-flight tasks.
pub struct Shared {
    /// Core NATS client (replies).
    pub client: async_nats::Client,
    /// JetStream context (results, dead letters).
    pub js: jetstream::Context,
    /// Backends of the models this worker serves.
    pub backends: HashMap<String, Arc<dyn Backend>>,
    /// Every model configured in the fleet (to tell "unknown" from "not mine").
    pub catalog: BTreeSet<String>,
    /// This worker's id.
    pub worker_id: String,
    /// Worker settings.
    pub cfg: WorkerConfig,
    /// Metrics handles.
    pub metrics: Metrics,
    /// Deliveries after which a retryable failure is dead-lettered.
    pub max_deliver: i64,
    /// The consumers' ack wait: a request still running is re-armed with an
    /// in-progress ack every third of it, so it is never redelivered while alive.
    pub ack_wait: Duration,
    /// The result cache, when enabled.
    pub cache: Option<Arc<ResultCache>>,
    /// Checkpoints of running generations, when enabled.
    pub checkpoints: Option<crate::checkpoint::Checkpoints>,
    /// Cancel tokens of running requests.
    pub cancels: Arc<crate::cancel::Cancels>,
    /// Drained by an operator: take no new requests (see [`crate::control`]).
    pub quiet: tokio::sync::watch::Sender<bool>,
    /// How often streams send chunks (shared: it counts the running streams).
    pub pace: super::chunks::Pace,
    /// Records each settled request in `FLEET_ARCHIVE` (off by default).
    pub archive: bool,
    /// Meters each answered request, when metering is on.
    pub meter: Option<Arc<crate::usage::Meter>>,
    /// How long each model took to load here, in ms (reported in heartbeats).
    pub load_ms: std::collections::BTreeMap<String, u64>,
}
