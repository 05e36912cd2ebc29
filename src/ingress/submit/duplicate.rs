//! A request id sent again within the duplicate window: JetStream kept the
//! first request and dropped this one, so this caller gets the first one's
//! result, read back from `FLEET_RESULTS` wherever the first call came
//! from (a first call waiting in this process also shares its reply).
//!
//! The first request is in one of three states, told apart by its message
//! in the priority stream (a worker stores the result before it acks, and
//! the ack removes the message):
//! - answered: its result is stored, and this caller gets it at once;
//! - running: its message is still in the stream; the result is awaited;
//! - spent: its message is gone and no result is kept (a retention shorter
//!   than the duplicate window — `X-Result-Ttl`, `sync_result_ttl_secs` —
//!   or the results stream's own limits): the id cannot run again until
//!   the window has passed, and the caller is told so (409) instead of
//!   waiting out its timeout. Found spent while waiting (its result expired
//!   between two looks), the wait ends with a `not_found` result.

use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::Context;
use retro_fleet_schemas::stored::{stored_result, stored_result_at_leader};
use retro_fleet_schemas::{subjects, ErrorCode, InferResult};

use super::validate::Prepared;
use crate::ingress::error::{ApiError, IngressCode};
use crate::ingress::replies::{Reply, Waiter};
use crate::ingress::state::AppState;

/// Feeds `waiter` the result of the first request with `p`'s id, stored at
/// `seq` in `p`'s priority stream: at once when it is stored, else as soon
/// as it is. A spent id is a 409 now, or an error result later. This
/// caller leaving does not cancel the first one's request.
pub async fn follow(state: &AppState, p: &Prepared, waiter: &mut Waiter, seq: u64) -> Result<(), ApiError> {
    waiter.disarm();
    let first = First {
        js: state.js.clone(),
        stream: subjects::request_stream(p.priority),
        seq,
        tenant: p.tenant.clone(),
        id: p.req.id.clone(),
    };
    tracing::debug!(id = %p.req.id, seq, "duplicate request id: following the first request's result");
    let feed = waiter.feeder();
    match first.state().await {
        State::Answered(r) => {
            let _ = feed.send(Reply::Result(r, None));
            return Ok(());
        }
        // the first request may be this caller's own (a publish sent again
        // after its ack was lost): then its replies are already here
        State::Spent if waiter.pending() => return Ok(()),
        State::Spent => return Err(ApiError::new(IngressCode::IdSpent, spent(&p.req.id)).with_id(&p.req.id)),
        State::Running => {}
    }
    let until = tokio::time::Instant::now() + p.timeout;
    let model = p.req.model.clone();
    tokio::spawn(async move {
        let mut every = Duration::from_millis(10);
        while !feed.is_closed() && tokio::time::Instant::now() < until {
            tokio::time::sleep(every).await;
            every = (every * 2).min(Duration::from_millis(500));
            let reply = match first.state().await {
                State::Running => continue,
                State::Answered(r) => r,
                State::Spent => Box::new(InferResult::error(&first.id, model, ErrorCode::NotFound, spent(&first.id))),
            };
            let _ = feed.send(Reply::Result(reply, None));
            return;
        }
    });
    Ok(())
}

/// What a caller sending a spent id is told.
fn spent(id: &str) -> String {
    format!(
        "request id `{id}` already ran within the duplicate window and its result is no longer kept; send the \
         request with a new id"
    )
}

/// The first request with an id.
struct First {
    js: Context,
    stream: &'static str,
    seq: u64,
    tenant: String,
    id: String,
}

enum State {
    Answered(Box<InferResult>),
    Running,
    Spent,
}

impl First {
    async fn state(&self) -> State {
        if let Ok(Some(r)) = stored_result(&self.js, &self.tenant, &self.id).await {
            return State::Answered(Box::new(r));
        }
        if self.queued().await != Some(false) {
            return State::Running; // or unknown for now: asked again later
        }
        // settled: its result was stored before the ack removed the message,
        // so the results stream's leader has it unless it is gone
        match stored_result_at_leader(&self.js, &self.tenant, &self.id).await {
            Ok(Some(r)) => State::Answered(Box::new(r)),
            Ok(None) => State::Spent,
            Err(_) => State::Running,
        }
    }

    /// Whether its message is still in the priority stream (`None`: the
    /// stream could not be asked).
    async fn queued(&self) -> Option<bool> {
        let stream = self.js.get_stream_no_info(self.stream).await.ok()?;
        match stream.get_raw_message(self.seq).await {
            Ok(_) => Some(true),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Some(false),
            Err(_) => None,
        }
    }
}
