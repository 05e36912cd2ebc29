//! Reading a stored result: `FLEET_RESULTS` keeps the one result of each
//! request at `fleet.res.<tenant>.<id>` (first writer wins). Workers read it
//! back when a request is redelivered or a second delivery lost the race to
//! store; the ingress serves `GET /v1/results/{id}` and follows duplicate
//! ids with it; `dlq replay` checks it before replaying.

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DirectGetErrorKind, LastRawMessageErrorKind};
use async_nats::jetstream::Context;

use crate::{codec, headers, subjects, DecodeError, InferResult};

/// Why a stored result could not be read (not "there is none": that is `Ok(None)`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoredError {
    /// The results stream cannot be reached or does not exist.
    #[error("results stream: {0}")]
    Stream(#[from] async_nats::jetstream::context::GetStreamError),
    /// The read itself failed.
    #[error("reading the result failed: {0}")]
    Read(#[from] async_nats::jetstream::stream::DirectGetError),
    /// The read from the stream's leader failed.
    #[error("reading the result from the stream's leader failed: {0}")]
    ReadLeader(#[from] async_nats::jetstream::stream::LastRawMessageError),
    /// Something is stored but it is not a result.
    #[error("stored result unreadable: {0}")]
    Decode(#[from] DecodeError),
}

/// The message stored for request `id` of `tenant`, if any.
pub async fn stored_message(js: &Context, tenant: &str, id: &str) -> Result<Option<StreamMessage>, StoredError> {
    let stream = js.get_stream_no_info(subjects::RESULTS_STREAM).await?;
    match stream.direct_get_last_for_subject(subjects::result(tenant, id)).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The result stored for request `id` of `tenant`, if any.
pub async fn stored_result(js: &Context, tenant: &str, id: &str) -> Result<Option<InferResult>, StoredError> {
    let Some(m) = stored_message(js, tenant, id).await? else { return Ok(None) };
    decode(&m)
}

/// [`stored_result`] as the results stream's leader has it. A direct get
/// may be answered by a replica a write has not reached yet; the leader has
/// every write it acknowledged, so "none" from it is final.
pub async fn stored_result_at_leader(js: &Context, tenant: &str, id: &str) -> Result<Option<InferResult>, StoredError> {
    let stream = js.get_stream_no_info(subjects::RESULTS_STREAM).await?;
    match stream.get_last_raw_message_by_subject(&subjects::result(tenant, id)).await {
        Ok(m) => decode(&m),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The result a stored message holds.
pub fn decode(m: &StreamMessage) -> Result<Option<InferResult>, StoredError> {
    let content_type = m.headers.get(headers::CONTENT_TYPE).map(|v| v.as_str());
    Ok(Some(codec::decode(content_type, &m.payload)?))
}
