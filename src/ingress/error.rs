//! API errors, mapped to HTTP status in exactly one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use retro_fleet_schemas::{ErrorBody, ErrorCode};
use serde::Serialize;

/// An error answered to an HTTP caller.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Stable code.
    pub code: ErrorCode,
    /// For people: what went wrong and what to do.
    pub message: String,
    /// Request id when one was assigned, so the result can be fetched later.
    pub request_id: Option<String>,
    /// Seconds to wait before retrying (`Retry-After`).
    pub retry_after: Option<u64>,
    /// Overrides the status derived from the code (413 body limit, 400 syntax).
    pub status: Option<StatusCode>,
}

impl ApiError {
    /// An error with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), request_id: None, retry_after: None, status: None }
    }

    /// Attaches the request id.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = Some(id.into());
        self
    }

    /// Sets `Retry-After`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// Overrides the HTTP status.
    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = Some(status);
        self
    }

    /// The HTTP status of this error.
    pub fn http_status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| status_of(self.code))
    }
}

/// The one mapping from error code to HTTP status.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::DecodeError => StatusCode::BAD_REQUEST,
        ErrorCode::InvalidRequest => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::PromptTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::UnknownModel | ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::DeadlineExceeded | ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Cancelled => StatusCode::from_u16(499).expect("valid status"),
        ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::BackendError => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The error object: our stable `code`, `message` and `retryable`, plus
/// OpenAI's `type` and `param`, so OpenAI clients read it as their own.
#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Inner<'a> {
    #[serde(flatten)]
    body: ErrorBody,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
}

impl ApiError {
    /// The JSON error body.
    pub fn body(&self) -> serde_json::Value {
        let status = self.http_status();
        let kind = match status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 | 503 => "rate_limit_error",
            s if s < 500 => "invalid_request_error",
            _ => "server_error",
        };
        let body = Body {
            error: Inner {
                body: ErrorBody { code: self.code, message: self.message.clone(), retryable: self.code.retryable() },
                kind,
                param: None,
            },
            request_id: self.request_id.as_deref(),
        };
        serde_json::to_value(body).expect("error body is JSON")
    }

    /// A request body that could not be read (too large: 413).
    pub fn from_body_rejection(r: axum::extract::rejection::BytesRejection) -> ApiError {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ErrorCode::PromptTooLarge
        } else {
            ErrorCode::InvalidRequest
        };
        ApiError::new(code, r.body_text()).status(r.status())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let mut resp = (status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<ErrorBody> for ApiError {
    fn from(e: ErrorBody) -> Self {
        ApiError::new(e.code, e.message)
    }
}

/// Reads a JSON body: syntax errors are 400, wrong shapes 422, both with
/// serde's message (it names the field and position).
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => ApiError::new(ErrorCode::InvalidRequest, format!("invalid request body: {e}")),
            _ => ApiError::new(ErrorCode::DecodeError, format!("request body is not valid JSON: {e}")),
        }
    })
}
