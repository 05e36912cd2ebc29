//! Operator control of one worker over core NATS, addressed by its registry
//! key: `fleet.ctl.drain.<key>` makes it stop taking requests (the ones it
//! runs finish; it stays up and the registry shows it `draining`), and
//! `fleet.ctl.resume.<key>` lets it pull again. Stopping the process is
//! SIGTERM's job; a drain leaves the decision to the operator.
//!
//! Every control request is answered with the worker's [`ControlState`].

use futures::StreamExt;
use retro_fleet_schemas::registry::kv_key;
use retro_fleet_schemas::subjects;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A worker's answer to a control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ControlState {
    /// Worker id.
    pub id: String,
    /// Whether it takes no new requests.
    pub draining: bool,
    /// Requests still running.
    pub inflight: u32,
}

/// Answers drain and resume requests for `worker_id` until `stop` fires.
/// `quiet` is the pull loop's drain switch.
pub async fn listen(
    client: async_nats::Client,
    worker_id: String,
    quiet: watch::Sender<bool>,
    inflight: prometheus::IntGauge,
    stop: CancellationToken,
) {
    let key = kv_key(&worker_id);
    let (drain, resume) = (subjects::drain(&key), subjects::resume(&key));
    let subs = futures::future::try_join(client.subscribe(drain.clone()), client.subscribe(resume.clone())).await;
    let (drains, resumes) = match subs {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot subscribe to drain/resume; this worker cannot be drained remotely");
            return;
        }
    };
    let mut both = futures::stream::select(drains.map(|m| (true, m)), resumes.map(|m| (false, m)));
    loop {
        let (drain, msg) = tokio::select! {
            m = both.next() => match m { Some(m) => m, None => return },
            _ = stop.cancelled() => return,
        };
        let was = quiet.send_replace(drain);
        if was != drain {
            tracing::info!(worker = %worker_id, draining = drain, "operator {}", if drain { "drained this worker" } else { "resumed this worker" });
        }
        let state = ControlState { id: worker_id.clone(), draining: drain, inflight: inflight.get().max(0) as u32 };
        if let Some(reply) = msg.reply {
            let body = serde_json::to_vec(&state).expect("control state is JSON");
            if let Err(e) = client.publish(reply, body.into()).await {
                tracing::debug!(error = %e, "control reply failed");
            }
        }
    }
}
