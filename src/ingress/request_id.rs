//! Request ids: every request gets one (the caller's `X-Request-Id` or a
//! new ULID), echoed on the response; handlers answer with the id the fleet
//! used ([`with_request_id`]).

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use retro_fleet_schemas::request::MAX_ID_LEN;
use retro_fleet_schemas::{subjects, ErrorCode};

use super::error::{ApiError, REQUEST_ID};

/// Marks (inside the ingress only; a caller's copy is removed) a request
/// whose `X-Request-Id` the ingress made, as opposed to one the caller chose.
pub const ID_MADE_HERE: &str = "x-retro-fleet-id-made-here";

/// Gives every request an id: the caller's `X-Request-Id` (1-128 of
/// `[A-Za-z0-9_-]`; it also becomes the id of a published request that
/// names none in its body) or a new ULID. It is echoed on the response.
pub async fn middleware(mut req: Request, next: Next) -> Response {
    // only this middleware says an id was made here (see [`ID_MADE_HERE`])
    req.headers_mut().remove(ID_MADE_HERE);
    let id = match req.headers().get(REQUEST_ID) {
        Some(v) => match v.to_str().ok().filter(|s| s.len() <= MAX_ID_LEN && subjects::is_token(s)) {
            Some(_) => v.clone(),
            None => {
                return ApiError::new(
                    ErrorCode::InvalidRequest,
                    "X-Request-Id must be 1-128 characters from [A-Za-z0-9_-]",
                )
                .param("headers.x-request-id")
                .into_response()
            }
        },
        None => {
            let id = HeaderValue::from_str(&ulid::Ulid::new().to_string()).expect("a ULID is a header value");
            req.headers_mut().insert(REQUEST_ID, id.clone());
            req.headers_mut().insert(ID_MADE_HERE, HeaderValue::from_static("1"));
            id
        }
    };
    let mut resp = next.run(req).await;
    if !resp.headers().contains_key(REQUEST_ID) {
        resp.headers_mut().insert(REQUEST_ID, id);
    }
    resp
}

/// Sets `X-Request-Id` to the id the fleet used for this request (a
/// handler's answer wins over the one [`middleware`] would echo).
pub fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}
