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

/// (Re)creates the floor stream and starts its worker on a separate connection.
pub async fn start(client: async_nats::Client) -> anyhow::Result<FloorWorker> {
    let js = jetstream::new(client.clone());
    let _ = js.delete_stream(STREAM).await;
    let stream = js
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec![SUBJECT.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
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
    let task = tokio::spawn(async move {
        let Ok(mut messages) = consumer.stream().max_messages_per_batch(256).messages().await else { return };
        while let Some(Ok(msg)) = messages.next().await {
            if let Some(reply) = msg.headers.as_ref().and_then(|h| h.get("Fleet-Reply")) {
                let _ = wclient.publish(reply.as_str().to_string(), msg.payload.clone()).await;
            }
            let _ = msg.ack().await;
        }
        let _ = client;
    });
    Ok(FloorWorker { task })
}
