//! The bare JetStream round trip: the least work any fleet on NATS must do.
//! A work-queue stream, one pull consumer pulling batches of 256, a reply
//! on core NATS, an ack. No decoding, no results stream.

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

/// (Re)creates the floor stream and starts its worker on a separate
/// connection. With `store`, the worker also writes each reply to a results
/// stream (unique subject per request, as retro-fleet does) and acks only
/// once it is stored: the least work for the "result stored" contract.
/// Its streams have `replicas` copies (3 on a cluster, as the fleet's).
pub async fn start(client: async_nats::Client, store: bool, replicas: usize) -> anyhow::Result<FloorWorker> {
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
    if store {
        js.create_stream(stream::Config {
            name: RESULTS_STREAM.into(),
            subjects: vec!["loadtest.floor.res.>".into()],
            storage: stream::StorageType::File,
            num_replicas: replicas,
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
            let stored = if store {
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
