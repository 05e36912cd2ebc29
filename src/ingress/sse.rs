//! Server-Sent Events plumbing shared by the streaming handlers: a stream
//! of events fed by a task that ends when the client goes away.

use std::convert::Infallible;

use axum::response::sse::Event;
use futures::Stream;

/// A stream fed by a task (keeps the SSE code free of hand-written state machines).
pub fn task_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    // When the client goes away the response stream is dropped, and with it
    // the task: its reply waiter then cancels the request.
    let task = AbortOnDrop(tokio::spawn(f(tx)).abort_handle());
    futures::stream::unfold((rx, task), |(mut rx, task)| async move { rx.recv().await.map(|e| (Ok(e), (rx, task))) })
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The error that ends a stream whose answer was restarted after a fault
/// and no longer continues the text sent so far (see `replies::Streamed`).
pub fn diverged(id: &str) -> super::error::ApiError {
    super::error::ApiError::new(
        retro_fleet_schemas::ErrorCode::BackendError,
        "the answer was restarted after a worker failed and no longer continues the text streamed so far; \
         its complete text is stored under the request id (GET /v1/results/{id})",
    )
    .with_id(id)
}
