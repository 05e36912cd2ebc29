//! The NATS topology: request streams per priority, results, dead letters
//! and the worker consumers, created or updated idempotently.

pub mod batch;
mod config;
mod report;

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::{kv, Context};
use retro_fleet_schemas::{subjects, Priority};

use config::limit;
pub use config::{Storage, TopologyConfig};
use report::{err, placing};
pub use report::{Applied, Change, TopologyError};

/// Stream configuration of the request stream of `p`.
pub fn request_stream(p: Priority, t: &TopologyConfig) -> stream::Config {
    stream::Config {
        name: subjects::request_stream(p).to_string(),
        description: Some(format!("retro-fleet {p}-priority requests")),
        subjects: vec![subjects::request_wildcard(p)],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        max_messages: t.max_msgs,
        max_bytes: t.max_bytes,
        max_message_size: t.max_msg_size,
        max_age: Duration::from_secs(t.max_age_secs),
        duplicate_window: Duration::from_secs(t.duplicate_window_secs),
        // A full queue refuses new requests, so publishers get pushback
        // instead of silently losing the oldest.
        discard: DiscardPolicy::New,
        num_replicas: t.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// Stream configuration of `FLEET_RESULTS`.
pub fn results_stream(t: &TopologyConfig) -> stream::Config {
    stream::Config {
        name: subjects::RESULTS_STREAM.to_string(),
        description: Some("retro-fleet results, by tenant and request id".into()),
        subjects: vec![subjects::RESULTS_WILDCARD.to_string()],
        retention: RetentionPolicy::Limits,
        storage: match t.results_storage {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        },
        max_age: Duration::from_secs(t.results_max_age_secs),
        max_bytes: limit(t.results_max_bytes),
        max_messages: limit(t.results_max_msgs),
        duplicate_window: Duration::from_secs(t.duplicate_window_secs),
        max_messages_per_subject: 1,
        discard: DiscardPolicy::Old,
        num_replicas: t.replicas,
        allow_direct: true,
        // a result kept for less than max_age carries `Nats-TTL`
        allow_message_ttl: true,
        ..Default::default()
    }
}

/// Stream configuration of `FLEET_DLQ`.
pub fn dlq_stream(t: &TopologyConfig) -> stream::Config {
    stream::Config {
        name: subjects::DLQ_STREAM.to_string(),
        description: Some("retro-fleet dead letters: original request plus error".into()),
        subjects: vec![subjects::DLQ_WILDCARD.to_string()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(t.dlq_max_age_secs),
        duplicate_window: Duration::from_secs(t.duplicate_window_secs),
        discard: DiscardPolicy::Old,
        num_replicas: t.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// Stream configuration of `FLEET_USAGE`: one record per answered request,
/// kept `usage_max_age_secs`; its duplicate window drops a request's second
/// record.
pub fn usage_stream(t: &TopologyConfig) -> stream::Config {
    stream::Config {
        name: subjects::USAGE_STREAM.to_string(),
        description: Some("retro-fleet usage: one record per answered request".into()),
        subjects: vec![subjects::USAGE_WILDCARD.to_string()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(t.usage_max_age_secs),
        duplicate_window: Duration::from_secs(t.duplicate_window_secs),
        discard: DiscardPolicy::Old,
        num_replicas: t.replicas,
        ..Default::default()
    }
}

/// Stream configuration of `FLEET_ARCHIVE`: every settled request with its
/// result, kept `archive_max_age_secs` and up to `archive_max_bytes`
/// (oldest first); its duplicate window drops a request's second record.
pub fn archive_stream(t: &TopologyConfig) -> stream::Config {
    stream::Config {
        name: subjects::ARCHIVE_STREAM.to_string(),
        description: Some("retro-fleet archive: recorded requests and their results, for replay".into()),
        subjects: vec![subjects::ARCHIVE_WILDCARD.to_string()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: Duration::from_secs(t.archive_max_age_secs),
        max_bytes: limit(t.archive_max_bytes),
        duplicate_window: Duration::from_secs(t.duplicate_window_secs),
        discard: DiscardPolicy::Old,
        num_replicas: t.replicas,
        ..Default::default()
    }
}

/// Consumer configuration of the worker consumer for `model` on `p`'s stream.
pub fn worker_consumer(p: Priority, model: &str, t: &TopologyConfig) -> pull::Config {
    pull::Config {
        durable_name: Some(subjects::consumer(model)),
        description: Some(format!("retro-fleet workers of `{model}`")),
        filter_subject: subjects::request(p, model),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: Duration::from_secs(t.ack_wait_secs),
        // Unlimited at the server: a message whose deliveries all died with
        // their workers would otherwise stay in the stream, never delivered
        // and never answered. Workers apply `max_deliver` themselves.
        max_deliver: -1,
        max_ack_pending: t.max_ack_pending,
        max_waiting: 4096,
        ..Default::default()
    }
}

fn stream_diff(want: &stream::Config, have: &stream::Config) -> Vec<&'static str> {
    let mut d = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            d.push(name)
        }
    };
    check("subjects", want.subjects == have.subjects);
    check("max_msgs", limit(want.max_messages) == limit(have.max_messages));
    check("max_bytes", limit(want.max_bytes) == limit(have.max_bytes));
    check("max_msg_size", limit(want.max_message_size.into()) == limit(have.max_message_size.into()));
    check("max_age", want.max_age == have.max_age);
    check("duplicate_window", want.duplicate_window == have.duplicate_window);
    check("max_msgs_per_subject", limit(want.max_messages_per_subject) == limit(have.max_messages_per_subject));
    check("discard", want.discard == have.discard);
    check("replicas", want.num_replicas.max(1) == have.num_replicas.max(1));
    check("allow_direct", want.allow_direct == have.allow_direct);
    check("allow_msg_ttl", want.allow_message_ttl == have.allow_message_ttl);
    check("description", want.description == have.description);
    d
}

fn consumer_diff(want: &pull::Config, have: &async_nats::jetstream::consumer::Config) -> Vec<&'static str> {
    let mut d = Vec::new();
    let mut check = |name, same: bool| {
        if !same {
            d.push(name)
        }
    };
    check("filter_subject", want.filter_subject == have.filter_subject);
    check("ack_wait", want.ack_wait == have.ack_wait);
    check("max_deliver", want.max_deliver == have.max_deliver);
    check("max_ack_pending", want.max_ack_pending == have.max_ack_pending);
    check("max_waiting", want.max_waiting == have.max_waiting);
    check("description", want.description == have.description);
    d
}

async fn apply_stream(js: &Context, want: stream::Config) -> Result<Applied, TopologyError> {
    let name = want.name.clone();
    let change = match js.get_stream(&name).await {
        Ok(mut s) => {
            let have = s.info().await.map_err(|e| err(format!("stream {name}"))(e.into()))?.config.clone();
            let diff = stream_diff(&want, &have);
            if diff.is_empty() {
                Change::Unchanged
            } else {
                let replicas = want.num_replicas;
                js.update_stream(&want)
                    .await
                    .map_err(|e| placing(format!("update stream {name}"), replicas)(e.into()))?;
                Change::Updated(diff)
            }
        }
        Err(_) => match js.create_stream(want.clone()).await {
            Ok(_) => Change::Created,
            // Another process created it between our look and our create.
            Err(_) if js.get_stream(&name).await.is_ok() => Change::Unchanged,
            Err(e) => return Err(placing(format!("create stream {name}"), want.num_replicas)(e.into())),
        },
    };
    Ok(Applied { kind: "stream", name, change })
}

async fn apply_consumer(js: &Context, stream_name: &str, want: pull::Config) -> Result<Applied, TopologyError> {
    let durable = want.durable_name.clone().unwrap_or_default();
    let name = format!("{stream_name}/{durable}");
    let stream = js.get_stream(stream_name).await.map_err(|e| err(format!("stream {stream_name}"))(e.into()))?;
    let change = match stream.get_consumer::<pull::Config>(&durable).await {
        Ok(mut c) => {
            let have = c.info().await.map_err(|e| err(format!("consumer {name}"))(e.into()))?.config.clone();
            let diff = consumer_diff(&want, &have);
            if diff.is_empty() {
                Change::Unchanged
            } else {
                // an operator's pause (`retro-fleet queues pause`) outlives the update
                let want = pull::Config { pause_until: have.pause_until, ..want };
                stream.update_consumer(want).await.map_err(|e| err(format!("update consumer {name}"))(e.into()))?;
                Change::Updated(diff)
            }
        }
        Err(_) => match stream.create_consumer(want).await {
            Ok(_) => Change::Created,
            Err(_) if stream.get_consumer::<pull::Config>(&durable).await.is_ok() => Change::Unchanged,
            Err(e) => return Err(err(format!("create consumer {name}"))(e.into())),
        },
    };
    Ok(Applied { kind: "consumer", name, change })
}

/// Configuration of the worker registry bucket `fleet_workers`: one key
/// per worker, its max age the heartbeat TTL.
pub fn workers_bucket(t: &TopologyConfig) -> async_nats::jetstream::kv::Config {
    async_nats::jetstream::kv::Config {
        bucket: subjects::WORKERS_BUCKET.to_string(),
        description: "retro-fleet worker registry (heartbeats)".into(),
        history: 1,
        max_age: Duration::from_secs(t.worker_ttl_secs.max(1)),
        storage: StorageType::Memory,
        num_replicas: t.replicas,
        ..Default::default()
    }
}

/// Configuration of the checkpoint bucket `fleet_checkpoints`: one key per
/// running generation, removed when its request is settled; a crash's
/// leftovers expire after an hour (longer than any generation).
pub fn checkpoints_bucket(t: &TopologyConfig) -> kv::Config {
    kv::Config {
        bucket: subjects::CHECKPOINTS_BUCKET.to_string(),
        description: "retro-fleet generated tokens of running requests (resumed after a worker dies)".into(),
        history: 1,
        max_age: Duration::from_secs(3600),
        storage: StorageType::File,
        num_replicas: t.replicas,
        ..Default::default()
    }
}

/// Configuration of the tenants bucket `fleet_tenants`: operators'
/// settings per tenant, kept until changed (a few revisions of history).
pub fn tenants_bucket(t: &TopologyConfig) -> kv::Config {
    kv::Config {
        bucket: subjects::TENANTS_BUCKET.to_string(),
        description: "retro-fleet settings per tenant (weights)".into(),
        history: 5,
        storage: StorageType::File,
        num_replicas: t.replicas,
        ..Default::default()
    }
}

async fn apply_bucket(js: &Context, want: async_nats::jetstream::kv::Config) -> Result<Applied, TopologyError> {
    let name = want.bucket.clone();
    let stream_name = format!("KV_{name}");
    let replicas = want.num_replicas;
    let change = match js.get_stream(&stream_name).await {
        Ok(mut s) => {
            let have = s.info().await.map_err(|e| err(format!("bucket {name}"))(e.into()))?.config.clone();
            let mut diff = Vec::new();
            if have.max_age != want.max_age {
                diff.push("max_age");
            }
            if have.num_replicas.max(1) != want.num_replicas.max(1) {
                diff.push("replicas");
            }
            if diff.is_empty() {
                Change::Unchanged
            } else {
                js.update_key_value(want)
                    .await
                    .map_err(|e| placing(format!("update bucket {name}"), replicas)(e.into()))?;
                Change::Updated(diff)
            }
        }
        Err(_) => match js.create_key_value(want).await {
            Ok(_) => Change::Created,
            Err(_) if js.get_stream(&stream_name).await.is_ok() => Change::Unchanged,
            Err(e) => return Err(placing(format!("create bucket {name}"), replicas)(e.into())),
        },
    };
    Ok(Applied { kind: "kv", name, change })
}

/// What the topology is laid out from: `[topology]`, the model catalogue
/// and the two settings of other roles that size its buckets.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// `[topology]`.
    pub topology: TopologyConfig,
    /// The configured models (one worker consumer per model and priority).
    pub models: Vec<String>,
    /// Longest a rate-limit counter can matter, in seconds (the ingress's
    /// longest window).
    pub rate_limit_age_secs: u64,
    /// How long a worker waits on another's compute claim, in ms.
    pub claim_wait_ms: u64,
}

/// Creates or updates every stream and every worker consumer of the
/// configured models. Running it twice changes nothing the second time.
pub async fn apply(js: &Context, plan: &Plan) -> Result<Vec<Applied>, TopologyError> {
    let t = &plan.topology;
    let mut report = Vec::new();
    for p in Priority::ALL {
        report.push(apply_stream(js, request_stream(p, t)).await?);
    }
    report.push(apply_stream(js, results_stream(t)).await?);
    report.push(apply_stream(js, dlq_stream(t)).await?);
    if t.metering {
        report.push(apply_stream(js, usage_stream(t)).await?);
    }
    if t.archive_max_age_secs > 0 {
        report.push(apply_stream(js, archive_stream(t)).await?);
    }
    report.push(apply_stream(js, batch::batch_runs_stream(t)).await?);
    report.push(apply_consumer(js, subjects::BATCH_RUNS_STREAM, batch::batch_runners(t)).await?);
    report.push(batch::apply_files(js, batch::files_store(t)).await?);
    report.push(apply_stream(js, batch::webhooks_stream(t)).await?);
    report.push(apply_consumer(js, subjects::WEBHOOKS_STREAM, batch::webhook_senders()).await?);
    report.push(apply_stream(js, batch::webhook_log_stream(t)).await?);
    report.push(apply_bucket(js, workers_bucket(t)).await?);
    report.push(apply_bucket(js, checkpoints_bucket(t)).await?);
    report.push(apply_bucket(js, tenants_bucket(t)).await?);
    for p in Priority::ALL {
        for model in &plan.models {
            report.push(apply_consumer(js, subjects::request_stream(p), worker_consumer(p, model, t)).await?);
        }
    }
    for bucket in cache_buckets(plan).into_iter().chain(ingress_buckets(plan)) {
        report.push(apply_bucket(js, bucket).await?);
    }
    Ok(report)
}

/// KV buckets of the ingress: batch records (kept as long as results), API
/// keys added at run time, and shared rate-limit counters (kept until any
/// counter would be full again).
pub fn ingress_buckets(plan: &Plan) -> Vec<kv::Config> {
    let t = &plan.topology;
    vec![
        kv::Config {
            bucket: subjects::BATCHES_BUCKET.to_string(),
            description: "retro-fleet batches: records and custom ids".into(),
            history: 1,
            max_age: Duration::from_secs(t.results_max_age_secs.max(1)),
            storage: StorageType::File,
            num_replicas: t.replicas,
            ..Default::default()
        },
        kv::Config {
            bucket: subjects::API_KEYS_BUCKET.to_string(),
            description: "retro-fleet API keys (hashed) added at run time".into(),
            history: 5,
            storage: StorageType::File,
            num_replicas: t.replicas,
            ..Default::default()
        },
        kv::Config {
            bucket: subjects::RATELIMIT_BUCKET.to_string(),
            description: "retro-fleet distributed rate-limit counters".into(),
            history: 1,
            max_age: Duration::from_secs(plan.rate_limit_age_secs.max(1)),
            storage: StorageType::Memory,
            num_replicas: t.replicas,
            ..Default::default()
        },
    ]
}

/// Opens a bucket of the topology, creating it as configured when missing
/// (a process that starts before `topology apply` still works; another
/// process creating it at the same moment is fine).
pub async fn open_bucket(js: &Context, want: kv::Config) -> anyhow::Result<kv::Store> {
    if let Ok(kv) = js.get_key_value(&want.bucket).await {
        return Ok(kv);
    }
    let name = want.bucket.clone();
    match js.create_key_value(want).await {
        Ok(kv) => Ok(kv),
        Err(e) => js.get_key_value(&name).await.map_err(|_| anyhow::anyhow!("KV bucket {name}: {e}")),
    }
}

/// The configuration of bucket `name` among [`ingress_buckets`].
pub fn ingress_bucket(plan: &Plan, name: &str) -> kv::Config {
    ingress_buckets(plan).into_iter().find(|b| b.bucket == name).expect("an ingress bucket")
}

/// KV buckets of the cache: model generations (kept, a few revisions of
/// history) and compute claims (short-lived: twice the claim wait).
pub fn cache_buckets(plan: &Plan) -> Vec<kv::Config> {
    let t = &plan.topology;
    vec![
        kv::Config {
            bucket: subjects::MODELS_BUCKET.to_string(),
            description: "retro-fleet cache generation per model".into(),
            history: 5,
            storage: StorageType::File,
            num_replicas: t.replicas,
            ..Default::default()
        },
        kv::Config {
            bucket: subjects::CACHE_CLAIMS_BUCKET.to_string(),
            description: "retro-fleet claims: one worker computes, others wait for its answer".into(),
            history: 1,
            max_age: Duration::from_millis(plan.claim_wait_ms.max(1_000) * 2),
            storage: StorageType::Memory,
            num_replicas: t.replicas,
            ..Default::default()
        },
    ]
}

/// Where each stream, bucket and worker consumer of the topology lives: its
/// replicas, its leader and how current the other copies are, one line
/// each (`retro-fleet topology status`).
pub async fn status(js: &Context, plan: &Plan) -> Result<Vec<String>, TopologyError> {
    let t = &plan.topology;
    let mut streams: Vec<String> = Priority::ALL.map(|p| subjects::request_stream(p).to_string()).to_vec();
    streams.extend(
        [
            subjects::RESULTS_STREAM,
            subjects::DLQ_STREAM,
            subjects::BATCH_RUNS_STREAM,
            subjects::WEBHOOKS_STREAM,
            subjects::WEBHOOK_LOG_STREAM,
        ]
        .map(str::to_string),
    );
    if t.archive_max_age_secs > 0 {
        streams.push(subjects::ARCHIVE_STREAM.to_string());
    }
    streams.push(format!("OBJ_{}", subjects::FILES_BUCKET));
    let buckets = [workers_bucket(t), checkpoints_bucket(t), tenants_bucket(t)]
        .into_iter()
        .chain(cache_buckets(plan))
        .chain(ingress_buckets(plan));
    streams.extend(buckets.map(|b| format!("KV_{}", b.bucket)));
    let mut lines = vec![format!("{:<34} {:>8}  {:<8} copies", "stream / consumer", "replicas", "leader")];
    for name in &streams {
        let mut s = match js.get_stream(name).await {
            Ok(s) => s,
            Err(e) => {
                lines.push(format!("{name:<34} missing ({e}): run `retro-fleet topology apply`"));
                continue;
            }
        };
        let info = s.info().await.map_err(|e| err(format!("stream {name}"))(e.into()))?.clone();
        lines.push(placement(name, info.config.num_replicas, info.cluster.as_ref()));
        if !name.starts_with("FLEET_REQ_") {
            continue;
        }
        for model in &plan.models {
            let durable = subjects::consumer(model);
            let Ok(mut c) = s.get_consumer::<pull::Config>(&durable).await else { continue };
            if let Ok(ci) = c.info().await {
                let label = format!("  {durable}");
                lines.push(placement(
                    &label,
                    ci.config.num_replicas.max(info.config.num_replicas),
                    ci.cluster.as_ref(),
                ));
            }
        }
    }
    Ok(lines)
}

/// One line of [`status`].
fn placement(name: &str, replicas: usize, cluster: Option<&async_nats::jetstream::stream::ClusterInfo>) -> String {
    let leader = cluster.and_then(|c| c.leader.clone()).unwrap_or_else(|| "none".into());
    let copies: Vec<String> = cluster
        .map(|c| c.replicas.iter().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|p| match (p.offline, p.current, p.lag) {
            (true, _, _) => format!("{} offline", p.name),
            (false, true, _) => format!("{} current", p.name),
            (false, false, lag) => format!("{} lagging {} ops", p.name, lag.unwrap_or(0)),
        })
        .collect();
    let copies = if copies.is_empty() { "-".to_string() } else { copies.join(", ") };
    format!("{name:<34} {:>8}  {leader:<8} {copies}", replicas.max(1))
}

/// Whether every stream of the topology exists and, on a cluster, has a
/// leader (readiness): a stream between leaders takes no writes, so an
/// ingress reports itself not ready rather than accept calls it cannot
/// queue yet (its publishes would be sent again until a leader is elected).
pub async fn streams_present(js: &Context) -> Result<(), String> {
    let names =
        Priority::ALL.map(subjects::request_stream).into_iter().chain([subjects::RESULTS_STREAM, subjects::DLQ_STREAM]);
    for name in names {
        let stream = js.get_stream(name).await.map_err(|e| format!("stream {name}: {e}"))?;
        if let Some(c) = &stream.cached_info().cluster {
            let leaderless = c.leader.as_deref().is_none_or(str::is_empty);
            if c.raft_group.is_some() && leaderless {
                return Err(format!("stream {name} has no leader (an election is under way)"));
            }
        }
    }
    Ok(())
}
