//! The topology of batch producers: the Object Store of the Files API
//! (`fleet_files`), the work queue of batches to run (`FLEET_BATCH_RUNS`
//! with its consumer `batch-runners`), and the webhooks' work queue
//! (`FLEET_WEBHOOKS`, consumer `webhook-senders`) and delivery log
//! (`FLEET_WEBHOOK_LOG`).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::object_store;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use retro_fleet_schemas::subjects;

use super::config::{limit, TopologyConfig};
use super::report::{err, placing, Applied, Change, TopologyError};

/// The Object Store of `/v1/files`: kept `files_max_age_secs`, at most
/// `files_max_bytes` (beyond it an upload is refused).
pub fn files_store(t: &TopologyConfig) -> object_store::Config {
    object_store::Config {
        bucket: subjects::FILES_BUCKET.to_string(),
        description: Some("retro-fleet files: batch input and output".into()),
        max_age: Duration::from_secs(t.files_max_age_secs),
        max_bytes: limit(t.files_max_bytes),
        storage: StorageType::File,
        num_replicas: t.replicas,
        ..Default::default()
    }
}

/// `FLEET_BATCH_RUNS`: one message per batch to run, removed when its
/// runner acknowledges it (the batch ended).
pub fn batch_runs_stream(t: &TopologyConfig) -> stream::Config {
    stream::Config {
        name: subjects::BATCH_RUNS_STREAM.to_string(),
        description: Some("retro-fleet batches to run, one message per batch".into()),
        subjects: vec![subjects::BATCH_RUNS_WILDCARD.to_string()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        duplicate_window: Duration::from_secs(t.duplicate_window_secs),
        discard: DiscardPolicy::New,
        num_replicas: t.replicas,
        ..Default::default()
    }
}

/// The consumer every ingress takes batches from: a message held is the
/// lease on its batch, for `batch_lease_secs` unless re-armed.
pub fn batch_runners(t: &TopologyConfig) -> pull::Config {
    pull::Config {
        durable_name: Some(subjects::BATCH_RUNNERS.to_string()),
        description: Some("retro-fleet ingresses running batches".into()),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: Duration::from_secs(t.batch_lease_secs.max(1)),
        max_deliver: -1,
        // the server's defaults, written out so that `apply` finds nothing to change
        max_ack_pending: 1000,
        max_waiting: 512,
        ..Default::default()
    }
}

/// How long webhook events wait for delivery, and their attempts are logged.
const WEBHOOKS_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// `FLEET_WEBHOOKS`: events waiting for delivery, removed once delivered
/// or given up, or after 7 days (no ingress delivers: none allows hosts).
pub fn webhooks_stream(t: &TopologyConfig) -> stream::Config {
    stream::Config {
        name: subjects::WEBHOOKS_STREAM.to_string(),
        description: Some("retro-fleet webhook events to deliver".into()),
        subjects: vec![subjects::WEBHOOK_SEND_WILDCARD.to_string()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        max_age: WEBHOOKS_KEPT,
        duplicate_window: Duration::from_secs(t.duplicate_window_secs),
        num_replicas: t.replicas,
        ..Default::default()
    }
}

/// `FLEET_WEBHOOK_LOG`: one message per delivery attempt, kept 7 days.
pub fn webhook_log_stream(t: &TopologyConfig) -> stream::Config {
    stream::Config {
        name: subjects::WEBHOOK_LOG_STREAM.to_string(),
        description: Some("retro-fleet webhook delivery attempts".into()),
        subjects: vec![subjects::WEBHOOK_LOG_WILDCARD.to_string()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: WEBHOOKS_KEPT,
        duplicate_window: Duration::from_secs(t.duplicate_window_secs),
        discard: DiscardPolicy::Old,
        num_replicas: t.replicas,
        ..Default::default()
    }
}

/// The consumer ingresses deliver webhook events from; an attempt not
/// settled within a minute (its ingress died) is made again.
pub fn webhook_senders() -> pull::Config {
    pull::Config {
        durable_name: Some(subjects::WEBHOOK_SENDERS.to_string()),
        description: Some("retro-fleet ingresses delivering webhooks".into()),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: Duration::from_secs(60),
        max_deliver: -1,
        max_ack_pending: 1000,
        max_waiting: 512,
        ..Default::default()
    }
}

/// The consumer of webhook events, creating the streams and itself when
/// missing.
pub async fn open_webhooks(
    js: &Context,
    t: &TopologyConfig,
) -> anyhow::Result<async_nats::jetstream::consumer::PullConsumer> {
    if js.get_stream(subjects::WEBHOOK_LOG_STREAM).await.is_err() {
        js.get_or_create_stream(webhook_log_stream(t)).await?;
    }
    let stream = match js.get_stream(subjects::WEBHOOKS_STREAM).await {
        Ok(s) => s,
        Err(_) => js.get_or_create_stream(webhooks_stream(t)).await?,
    };
    Ok(stream.get_or_create_consumer(subjects::WEBHOOK_SENDERS, webhook_senders()).await?)
}

/// Creates the Object Store, or updates its age, size and replicas.
pub async fn apply_files(js: &Context, want: object_store::Config) -> Result<Applied, TopologyError> {
    let name = want.bucket.clone();
    let stream_name = format!("OBJ_{name}");
    let replicas = want.num_replicas;
    let change = match js.get_stream(&stream_name).await {
        Ok(mut s) => {
            let have = s.info().await.map_err(|e| err(format!("object store {name}"))(e.into()))?.config.clone();
            let mut diff = Vec::new();
            if have.max_age != want.max_age {
                diff.push("max_age");
            }
            if limit(have.max_bytes) != limit(want.max_bytes) {
                diff.push("max_bytes");
            }
            if have.num_replicas.max(1) != want.num_replicas.max(1) {
                diff.push("replicas");
            }
            if diff.is_empty() {
                Change::Unchanged
            } else {
                let update = stream::Config {
                    max_age: want.max_age,
                    max_bytes: want.max_bytes,
                    num_replicas: want.num_replicas,
                    ..have
                };
                js.update_stream(&update)
                    .await
                    .map_err(|e| placing(format!("update object store {name}"), replicas)(e.into()))?;
                Change::Updated(diff)
            }
        }
        Err(_) => match js.create_object_store(want).await {
            Ok(_) => Change::Created,
            Err(_) if js.get_stream(&stream_name).await.is_ok() => Change::Unchanged,
            Err(e) => return Err(placing(format!("create object store {name}"), replicas)(e.into())),
        },
    };
    Ok(Applied { kind: "objects", name, change })
}

/// Opens the Object Store, creating it as configured when missing.
pub async fn open_files(js: &Context, want: object_store::Config) -> anyhow::Result<object_store::ObjectStore> {
    if let Ok(s) = js.get_object_store(&want.bucket).await {
        return Ok(s);
    }
    let name = want.bucket.clone();
    match js.create_object_store(want).await {
        Ok(s) => Ok(s),
        Err(e) => js.get_object_store(&name).await.map_err(|_| anyhow::anyhow!("object store {name}: {e}")),
    }
}

/// The consumer of batches to run, creating its stream and itself when
/// missing.
pub async fn open_runs(
    js: &Context,
    t: &TopologyConfig,
) -> anyhow::Result<async_nats::jetstream::consumer::PullConsumer> {
    let stream = match js.get_stream(subjects::BATCH_RUNS_STREAM).await {
        Ok(s) => s,
        Err(_) => js.get_or_create_stream(batch_runs_stream(t)).await?,
    };
    Ok(stream.get_or_create_consumer(subjects::BATCH_RUNNERS, batch_runners(t)).await?)
}
