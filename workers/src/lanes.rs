//! Lanes: the consumers a worker pulls from, one per class, model and tenant.
//!
//! Requests published to `fleet.req.<class>.<model>` wait in the model's
//! shared lane, in arrival order; those published to
//! `fleet.req.<class>.<model>.<tenant>` wait in that tenant's lane, so a
//! flood in one lane never stands in front of another. `topology apply`
//! creates the shared lanes' consumers. Tenant lanes come and go with their
//! traffic: the [`survey`] lists which subjects hold requests, creates the
//! consumer of a new lane from its shared lane's configuration and hands it
//! to the pull loop, which closes a lane after a quiet minute (the server
//! then removes its consumer; a request arriving later is found again by
//! the next survey, and waits for it: at most `lane_scan_ms` on the first
//! request of a quiet tenant).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, FromConsumer, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use futures::{FutureExt, StreamExt};
use retro_fleet_schemas::{subjects, Priority};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A tenant lane's consumer is removed by the server after this long with
/// no worker pulling from it.
pub const LANE_CONSUMER_INACTIVE: Duration = Duration::from_secs(600);

/// One consumer the worker pulls from, with its open pull stream and the
/// message it took but has not started yet.
pub struct Lane {
    /// Class of its stream.
    pub priority: Priority,
    /// Model it serves.
    pub model: String,
    /// Tenant whose requests wait in it: the default tenant's for a shared lane.
    pub tenant: String,
    /// Whether this is the model's shared lane (never closed when quiet).
    shared: bool,
    consumer: PullConsumer,
    prefetch: usize,
    expires: Duration,
    stream: Option<pull::Stream>,
    parked: Option<jetstream::Message>,
    last_message: Instant,
}

impl Lane {
    /// The shared lane of `model` at `p`.
    pub fn shared(p: Priority, model: String, consumer: PullConsumer, prefetch: usize, expires: Duration) -> Lane {
        Lane::new(p, model, subjects::DEFAULT_TENANT.into(), true, consumer, prefetch, expires)
    }

    /// A tenant's lane.
    pub fn tenant(found: Found, prefetch: usize, expires: Duration) -> Lane {
        Lane::new(found.priority, found.model, found.tenant, false, found.consumer, prefetch, expires)
    }

    fn new(
        priority: Priority,
        model: String,
        tenant: String,
        shared: bool,
        consumer: PullConsumer,
        prefetch: usize,
        expires: Duration,
    ) -> Lane {
        let last_message = Instant::now();
        Lane { priority, model, tenant, shared, consumer, prefetch, expires, stream: None, parked: None, last_message }
    }

    /// The survey's key of this lane.
    pub fn key(&self) -> LaneKey {
        (self.priority, self.model.clone(), self.tenant.clone())
    }

    /// Opens the pull stream if it is closed.
    pub async fn open(&mut self) {
        if self.stream.is_none() {
            match self.consumer.stream().max_messages_per_batch(self.prefetch).expires(self.expires).messages().await {
                Ok(s) => self.stream = Some(s),
                Err(e) => {
                    tracing::warn!(priority = %self.priority, model = %self.model, tenant = %self.tenant, error = %e, "opening the pull stream failed; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }

    /// Whether a message is here, taking one from the pull stream if it has arrived.
    pub fn peek(&mut self) -> bool {
        if self.parked.is_none() {
            if let Some(stream) = self.stream.as_mut() {
                match stream.next().now_or_never() {
                    Some(Some(Ok(m))) => self.park(m),
                    Some(Some(Err(e))) => tracing::debug!(priority = %self.priority, error = %e, "pull stream error"),
                    Some(None) => self.stream = None,
                    None => {}
                }
            }
        }
        self.parked.is_some()
    }

    /// Keeps `msg` until it is taken.
    pub fn park(&mut self, msg: jetstream::Message) {
        self.last_message = Instant::now();
        self.parked = Some(msg);
    }

    /// The message [`Lane::peek`] found.
    pub fn take(&mut self) -> Option<jetstream::Message> {
        self.parked.take()
    }

    /// The next message from the server, for lanes with none here yet.
    pub fn arrival(&mut self) -> Option<futures::future::BoxFuture<'_, Option<Result<jetstream::Message, String>>>> {
        if self.parked.is_some() {
            return None;
        }
        let stream = self.stream.as_mut()?;
        Some(stream.next().map(|m| m.map(|r| r.map_err(|e| e.to_string()))).boxed())
    }

    /// Forgets the pull stream after it ended.
    pub fn ended(&mut self) {
        self.stream = None;
    }

    /// Whether this tenant lane has been quiet for `idle` with nothing here.
    pub fn quiet_for(&self, idle: Duration) -> bool {
        !self.shared && self.parked.is_none() && self.last_message.elapsed() >= idle
    }

    /// Hands back what was taken but not started, and every message the
    /// pull stream already brought (nak, so other workers get them at once),
    /// then closes the stream. Returns how many were handed back and how many
    /// could not be (they come back after `ack_wait`).
    pub async fn hand_back(&mut self, client: &async_nats::Client) -> (usize, usize) {
        let (mut handed_back, mut kept) = (0, 0);
        while let Some(msg) = self.take().or_else(|| self.peek().then(|| self.take()).flatten()) {
            let nak = msg.ack_with(AckKind::Nak(None));
            match crate::shutdown::final_op(client, "hand back a prefetched message", nak).await {
                Some(Ok(())) => handed_back += 1,
                _ => kept += 1,
            }
        }
        self.stream = None;
        (handed_back, kept)
    }
}

/// Class, model and tenant of a lane.
pub type LaneKey = (Priority, String, String);

/// A tenant lane the survey found, with its consumer.
pub struct Found {
    /// Class.
    pub priority: Priority,
    /// Model.
    pub model: String,
    /// Tenant.
    pub tenant: String,
    /// The lane's consumer (created if it was not there).
    pub consumer: PullConsumer,
}

/// Lanes the pull loop has open, shared with the survey so it hands over
/// only new ones.
pub type Open = Arc<Mutex<HashSet<LaneKey>>>;

/// Every `every` until `stop`, lists the subjects of each request stream
/// that hold requests, and sends the pull loop each tenant lane of a model
/// in `shared` (the shared lanes this worker pulls, as templates) that it
/// does not have open.
pub async fn survey(
    js: jetstream::Context,
    shared: Vec<(Priority, String, PullConsumer)>,
    open: Open,
    found: mpsc::Sender<Found>,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        for p in Priority::ALL {
            let new = match waiting_lanes(&js, p).await {
                Ok(lanes) => lanes,
                Err(e) => {
                    tracing::debug!(priority = %p, error = %e, "listing the request subjects failed");
                    continue;
                }
            };
            for (model, tenant) in new {
                let key = (p, model, tenant);
                if open.lock().expect("lanes lock").contains(&key) {
                    continue;
                }
                let Some((_, _, template)) = shared.iter().find(|(sp, m, _)| *sp == p && *m == key.1) else { continue };
                match lane_consumer(&js, template, &key).await {
                    Ok(consumer) => {
                        let (priority, model, tenant) = key;
                        if found.send(Found { priority, model, tenant, consumer }).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(priority = %p, model = %key.1, tenant = %key.2, error = %e, "creating a tenant lane's consumer failed")
                    }
                }
            }
        }
    }
}

/// The `(model, tenant)` of the tenant lanes of `p` holding requests.
async fn waiting_lanes(
    js: &jetstream::Context,
    p: Priority,
) -> Result<Vec<(String, String)>, Box<dyn std::error::Error + Send + Sync>> {
    let stream = js.get_stream(subjects::request_stream(p)).await?;
    let mut listed = stream.info_with_subjects(format!("fleet.req.{}.*.*", p.as_str())).await?;
    let mut lanes = Vec::new();
    while let Some(entry) = listed.next().await {
        let (subject, _count) = entry?;
        if let Some((_, model, Some(tenant))) = subjects::parse_request(&subject) {
            if subjects::is_token(tenant) {
                lanes.push((model.to_string(), tenant.to_string()));
            }
        }
    }
    Ok(lanes)
}

/// The consumer of lane `key`, configured as its shared lane `template`
/// but for the tenant's subject, created if missing.
async fn lane_consumer(
    js: &jetstream::Context,
    template: &PullConsumer,
    key: &LaneKey,
) -> Result<PullConsumer, Box<dyn std::error::Error + Send + Sync>> {
    let (p, model, tenant) = key;
    // read now, not at start: a class an operator paused since is paused
    // for the new lane too
    let shared = template.clone().info().await?.config.clone();
    let mut config = pull::Config::try_from_consumer_config(shared)?;
    config.durable_name = Some(subjects::tenant_consumer(model, tenant));
    config.name = None;
    config.description = Some(format!("retro-fleet workers of `{model}` for tenant `{tenant}`"));
    config.filter_subject = subjects::lane(*p, model, tenant);
    config.inactive_threshold = LANE_CONSUMER_INACTIVE;
    let stream = js.get_stream(subjects::request_stream(*p)).await?;
    let name = subjects::tenant_consumer(model, tenant);
    Ok(stream.get_or_create_consumer(&name, config).await?)
}
