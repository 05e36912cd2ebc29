//! The bare JetStream round trip: the least work any fleet on NATS must do.
//! A work-queue stream, one pull consumer pulling batches of 256, a reply
//! on core NATS, an ack. No decoding; a results stream only as [`Store`]
//! says.

use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use tokio::task::JoinHandle;

/// Stream and subject of the floor.
pub const STREAM: &str = "LOADTEST_FLOOR";
/// Subject requests to the floor go to.
pub const SUBJECT: &str = "loadtest.floor.req";

/// A running floor worker.
pub struct FloorWorker {
    task: JoinHandle<()>,
}

impl FloorWorker {
    /// Stops the worker.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Stream a storing floor writes its results to.
pub const RESULTS_STREAM: &str = "LOADTEST_FLOOR_RESULTS";

/// What the floor's puller does with a result besides replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Nothing: reply and ack.
    None,
    /// Writes it to a results stream (unique subject per request) while it
    /// replies, and acks once it is stored: one more JetStream write per
    /// request, but the caller may hear of a result not yet stored.
    Pipelined,
    /// Does what retro-fleet's contract asks of NATS and no more: each
    /// message in a task of its own writes the result first-writer-wins
    /// (expected subject sequence 0) with a per-message TTL to a stream of
    /// one message per subject, waits until it is stored, then replies and
    /// acks. The HTTP floor also gives each request a `Nats-Msg-Id`.
    Contract,
}

/// How long a contract floor's results are kept (the ingress's default for
/// a synchronous call's result).
const RESULT_TTL: &str = "120s";

/// (Re)creates the floor stream and starts its worker on a separate
/// connection, storing results as `store` says. Its streams have
/// `replicas` copies (3 on a cluster, as the fleet's).
pub async fn start(client: async_nats::Client, store: Store, replicas: usize) -> anyhow::Result<FloorWorker> {
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream(STREAM).await;
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await?;
    let _ = js.delete_stream(RESULTS_STREAM).await;
    if store != Store::None {
        let contract = store == Store::Contract;
        js.create_stream(stream::Config {
            name: RESULTS_STREAM.into(),
            subjects: vec!["loadtest.floor.res.>".into()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
            max_messages_per_subject: if contract { 1 } else { 0 },
            allow_message_ttl: contract,
            ..Default::default()
        })
        .await?;
    }
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("floor".into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    // Its own connection, as a worker process would have.
    let server = client.server_info();
    let url = format!("nats://{}:{}", if server.host == "0.0.0.0" { "127.0.0.1" } else { &server.host }, server.port);
    let wclient = async_nats::connect(url).await?;
    let wjs = jetstream::new(wclient.clone());
    let task = tokio::spawn(async move {
        let Ok(mut messages) = consumer.stream().max_messages_per_batch(256).messages().await else { return };
        let mut n = 0u64;
        while let Some(Ok(msg)) = messages.next().await {
            n += 1;
            if store == Store::Contract {
                tokio::spawn(store_then_reply(wjs.clone(), wclient.clone(), msg, n));
                continue;
            }
            let stored = if store == Store::Pipelined {
                wjs.publish(format!("loadtest.floor.res.{n}"), msg.payload.clone()).await.ok()
            } else {
                None
            };
            if let Some(reply) = msg.headers.as_ref().and_then(|h| h.get("Fleet-Reply")) {
                let _ = wclient.publish(reply.as_str().to_string(), msg.payload.clone()).await;
            }
            match stored {
                // ack once stored, without holding up the next message
                Some(ack) => {
                    tokio::spawn(async move {
                        if ack.await.is_ok() {
                            let _ = msg.ack().await;
                        }
                    });
                }
                None => {
                    let _ = msg.ack().await;
                }
            }
        }
        let _ = client;
    });
    Ok(FloorWorker { task })
}

/// [`Store::Contract`]'s handling of one message.
async fn store_then_reply(js: jetstream::Context, client: async_nats::Client, msg: jetstream::Message, n: u64) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
    h.insert(async_nats::header::NATS_MESSAGE_TTL, RESULT_TTL);
    let stored = match js.publish_with_headers(format!("loadtest.floor.res.{n}"), h, msg.payload.clone()).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if !stored {
        return;
    }
    if let Some(reply) = msg.headers.as_ref().and_then(|h| h.get("Fleet-Reply")) {
        let _ = client.publish(reply.as_str().to_string(), msg.payload.clone()).await;
    }
    let _ = msg.ack().await;
}
