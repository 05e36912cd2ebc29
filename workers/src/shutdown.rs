//! The NATS operations a worker still makes after its drain, each bounded
//! so a stopping process never waits for a lost connection.

/// How long each NATS operation after a shutdown's drain may take (the
/// last heartbeat, the registry delete, handing prefetched messages back, the
/// final flush). With no connection they are skipped: nothing after the
/// drain waits for a reconnect, so a process exits within its drain bound
/// even when NATS is gone.
pub const FINAL_OP_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(300);

/// Runs one of a shutdown's final NATS operations (`what` names it in the
/// log): skipped when `client` is not connected, given up after
/// [`FINAL_OP_TIMEOUT`]. `None` when it did not run to its end.
pub async fn final_op<F: std::future::Future>(client: &async_nats::Client, what: &str, op: F) -> Option<F::Output> {
    if client.connection_state() != async_nats::connection::State::Connected {
        tracing::info!(op = what, "not connected to NATS at shutdown: skipped");
        return None;
    }
    match tokio::time::timeout(FINAL_OP_TIMEOUT, op).await {
        Ok(r) => Some(r),
        Err(_) => {
            tracing::warn!(op = what, timeout = ?FINAL_OP_TIMEOUT, "NATS did not answer at shutdown: given up");
            None
        }
    }
}
