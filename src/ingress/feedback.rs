//! `POST /v1/cache/feedback`: a caller's verdict on an answer the semantic
//! cache gave one of its requests. The stored result (under the caller's
//! own tenant, so nobody judges another's answers) names the entry and the
//! similarity; every worker hears the verdict, and those holding the entry
//! apply it before they reply. A wrong answer stops the entry answering
//! that prompt (docs/CACHE.md).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::Json;
use futures::StreamExt;
use retro_fleet_schemas::stored::stored_result;
use retro_fleet_schemas::{subjects, CacheFeedback, CacheTier, ErrorCode, FeedbackAck, Verdict};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::auth::Principal;
use super::error::{parse_json, ApiError};
use super::state::AppState;

/// How long the first worker holding the entry has to reply.
const FIRST_REPLY: Duration = Duration::from_secs(2);
/// How long the others have after the one before.
const NEXT_REPLY: Duration = Duration::from_millis(200);

/// Body of `POST /v1/cache/feedback`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackBody {
    /// The request whose answer came from the semantic cache (`cache` is `semantic` in its result).
    pub request_id: String,
    /// Whether that answer was right for the request's prompt.
    pub verdict: Verdict,
}

/// Reply of `POST /v1/cache/feedback`.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FeedbackApplied {
    /// The request judged.
    pub request_id: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The entry that answered it.
    pub entry: String,
    /// Workers that hold the entry and applied the verdict (0: no worker
    /// holds it any more, it expired or its worker restarted).
    pub workers: usize,
}

/// `POST /v1/cache/feedback`.
pub async fn post(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Json<FeedbackApplied>, ApiError> {
    let b: FeedbackBody = raw.map_err(ApiError::from_body_rejection).and_then(|b| parse_json(&b))?;
    let not_found = || {
        ApiError::new(ErrorCode::NotFound, format!("no result for `{}` under your tenant", b.request_id))
            .param("request_id")
    };
    if !subjects::is_token(&b.request_id) {
        return Err(not_found());
    }
    let result = stored_result(&state.js, &who.tenant, &b.request_id)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?
        .ok_or_else(not_found)?;
    let (CacheTier::Semantic, Some(entry), Some(similarity)) =
        (result.cache, result.cache_entry.clone(), result.cache_similarity)
    else {
        let message = format!(
            "`{}` was answered from `{}`, not the semantic cache: feedback is about semantic answers",
            b.request_id,
            result.cache.as_str()
        );
        return Err(ApiError::new(ErrorCode::InvalidRequest, message).param("request_id"));
    };
    let msg = CacheFeedback {
        v: retro_fleet_schemas::SCHEMA_VERSION,
        model: result.model,
        entry: entry.clone(),
        similarity,
        verdict: b.verdict,
    };
    let workers = tell_workers(&state.client, &msg).await.map_err(|e| ApiError::new(ErrorCode::Internal, e))?;
    tracing::info!(id = %b.request_id, entry, verdict = b.verdict.as_str(), workers, "semantic cache feedback");
    Ok(Json(FeedbackApplied { request_id: b.request_id, verdict: b.verdict, entry, workers }))
}

/// Sends `msg` to every worker; the number that held the entry and applied it.
async fn tell_workers(client: &async_nats::Client, msg: &CacheFeedback) -> Result<usize, String> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    let payload = Bytes::from(serde_json::to_vec(msg).map_err(|e| e.to_string())?);
    client.publish_with_reply(subjects::CACHE_FEEDBACK, inbox, payload).await.map_err(|e| e.to_string())?;
    client.flush().await.map_err(|e| e.to_string())?;
    let mut workers = 0;
    let mut wait = FIRST_REPLY;
    while let Ok(Some(m)) = tokio::time::timeout(wait, replies.next()).await {
        if serde_json::from_slice::<FeedbackAck>(&m.payload).is_ok() {
            workers += 1;
            wait = NEXT_REPLY;
        }
    }
    Ok(workers)
}
