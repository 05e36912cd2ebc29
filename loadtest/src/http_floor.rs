//! The bare HTTP → JetStream → reply floor: the least work any HTTP front
//! of a fleet on NATS must do, with no retro-fleet code. One axum handler
//! publishes the body to a work-queue stream with a reply header and waits
//! for the publish ack, then for the reply on one wildcard inbox
//! subscription shared by every call (demultiplexed by a counter); the bare
//! puller of [`crate::floor`] replies with the body and acks (with
//! `--floor-store`, while storing it in a results stream; with
//! `--floor-contract`, after storing it as the fleet's contract requires,
//! each request carrying a `Nats-Msg-Id`).
//!
//! `loadtest --serve-http-floor ADDR` runs it as a process of its own, so a
//! benchmark loads it with `--http floor=http://ADDR` beside an ingress and
//! reads each process's CPU time as it does for the fleet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::oneshot;

use crate::floor;

struct Floor {
    js: jetstream::Context,
    inbox: String,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
    next: AtomicU64,
    /// Requests carry a `Nats-Msg-Id` (one per call, as the ingress's).
    msg_ids: bool,
}

/// Serves `POST /v1/infer` on `listen` until the process is stopped; the
/// puller stores each reply as `store` says.
pub async fn serve(client: async_nats::Client, listen: &str, store: floor::Store) -> anyhow::Result<()> {
    let worker = floor::start(client.clone(), store, 1).await?;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(format!("{inbox}.*")).await?;
    let state = Arc::new(Floor {
        js: jetstream::new(client.clone()),
        inbox,
        waiting: Mutex::new(HashMap::new()),
        next: AtomicU64::new(0),
        msg_ids: store == floor::Store::Contract,
    });
    let demux = state.clone();
    tokio::spawn(async move {
        while let Some(m) = replies.next().await {
            let Some(n) = m.subject.rsplit('.').next().and_then(|s| s.parse::<u64>().ok()) else { continue };
            if let Some(tx) = demux.waiting.lock().expect("waiting").remove(&n) {
                let _ = tx.send(m.payload);
            }
        }
    });
    let app = Router::new().route("/v1/infer", post(infer)).with_state(state);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("HTTP floor listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    worker.stop().await;
    Ok(())
}

async fn infer(State(f): State<Arc<Floor>>, body: Bytes) -> Result<Bytes, StatusCode> {
    let n = f.next.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = oneshot::channel();
    f.waiting.lock().expect("waiting").insert(n, tx);
    let mut h = HeaderMap::new();
    h.insert("Fleet-Reply", format!("{}.{n}", f.inbox).as_str());
    if f.msg_ids {
        h.insert(async_nats::header::NATS_MESSAGE_ID, format!("{}.{n}", f.inbox).as_str());
    }
    let published = match f.js.publish_with_headers(floor::SUBJECT, h, body).await {
        Ok(ack) => ack.await.is_ok(),
        Err(_) => false,
    };
    if !published {
        f.waiting.lock().expect("waiting").remove(&n);
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    match tokio::time::timeout(Duration::from_secs(30), rx).await {
        Ok(Ok(reply)) => Ok(reply),
        _ => {
            f.waiting.lock().expect("waiting").remove(&n);
            Err(StatusCode::GATEWAY_TIMEOUT)
        }
    }
}
