//! API errors, mapped to HTTP status in exactly one place.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use retro_fleet_schemas::{ErrorBody, ErrorCode};
use serde::Serialize;

/// An error answered to an HTTP caller.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Stable code: the one source of the body's `code`, the HTTP status
    /// and `retryable`.
    pub code: ApiCode,
    /// For people: what went wrong and what to do.
    pub message: String,
    /// Request id when one was assigned, so the result can be fetched later.
    pub request_id: Option<String>,
    /// Seconds to wait before retrying (`Retry-After`).
    pub retry_after: Option<u64>,
    /// Where in the request the problem is (`params.temperature`, `headers.x-request-id`).
    pub param: Option<String>,
    /// Extra response headers (`X-RateLimit-*`, `WWW-Authenticate`).
    pub headers: Vec<(&'static str, String)>,
}

/// The code of an API error. Results on the wire carry the codes of
/// [`ErrorCode`]; the ingress adds its own ([`IngressCode`]). Either way the
/// code alone decides what the caller sees: the body's `code`, the HTTP
/// status ([`ApiCode::status`]) and `retryable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApiCode {
    /// A code of the wire, as results carry it.
    Wire(ErrorCode),
    /// A code only the ingress answers with.
    Ingress(IngressCode),
}

impl ApiCode {
    /// The code as written in error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiCode::Wire(c) => c.as_str(),
            ApiCode::Ingress(c) => c.as_str(),
        }
    }

    /// The HTTP status of an error with this code.
    pub fn status(self) -> StatusCode {
        match self {
            ApiCode::Wire(c) => status_of(c),
            ApiCode::Ingress(c) => c.status(),
        }
    }

    /// Whether the same request may succeed later.
    pub fn retryable(self) -> bool {
        match self {
            ApiCode::Wire(c) => c.retryable(),
            ApiCode::Ingress(c) => matches!(c, IngressCode::RateLimited | IngressCode::BodyTimeout),
        }
    }
}

impl From<ErrorCode> for ApiCode {
    fn from(c: ErrorCode) -> Self {
        ApiCode::Wire(c)
    }
}

impl From<IngressCode> for ApiCode {
    fn from(c: IngressCode) -> Self {
        ApiCode::Ingress(c)
    }
}

/// Codes only the HTTP ingress answers with: they never appear in results
/// on the wire, so they live here rather than in the wire's `ErrorCode`.
/// Stable like it: never renamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IngressCode {
    /// No credential, or one that does not verify (401).
    Unauthenticated,
    /// The credential lacks the role the route needs (403).
    Forbidden,
    /// Over a rate limit (429, with `Retry-After`).
    RateLimited,
    /// The request would pass its tenant's or credential's budget for the
    /// day or month (429, with `Retry-After` at the reset).
    BudgetExceeded,
    /// The request body broke off before it was read whole (400). Written
    /// as the wire's `invalid_request`, as it always was; only its status
    /// differs (nothing in the body was judged: it never arrived).
    UnreadableBody,
    /// The request body did not arrive within `ingress.connections.body_timeout_ms` (408).
    BodyTimeout,
    /// The request id ran within the duplicate window and its result is no
    /// longer kept, so it can neither run again nor be answered (409).
    IdSpent,
}

impl IngressCode {
    /// The code as written in error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            IngressCode::Unauthenticated => "unauthenticated",
            IngressCode::Forbidden => "forbidden",
            IngressCode::RateLimited => "rate_limited",
            IngressCode::BudgetExceeded => "budget_exceeded",
            IngressCode::UnreadableBody => ErrorCode::InvalidRequest.as_str(),
            IngressCode::BodyTimeout => "body_timeout",
            IngressCode::IdSpent => "request_id_spent",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            IngressCode::Unauthenticated => StatusCode::UNAUTHORIZED,
            IngressCode::Forbidden => StatusCode::FORBIDDEN,
            IngressCode::RateLimited | IngressCode::BudgetExceeded => StatusCode::TOO_MANY_REQUESTS,
            IngressCode::UnreadableBody => StatusCode::BAD_REQUEST,
            IngressCode::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            IngressCode::IdSpent => StatusCode::CONFLICT,
        }
    }
}

impl ApiError {
    /// An error with `code` (an [`ErrorCode`] or an [`IngressCode`]).
    pub fn new(code: impl Into<ApiCode>, message: impl Into<String>) -> Self {
        ApiError {
            code: code.into(),
            message: message.into(),
            request_id: None,
            retry_after: None,
            param: None,
            headers: Vec::new(),
        }
    }

    /// Names the part of the request at fault.
    pub fn param(mut self, path: impl Into<String>) -> Self {
        self.param = Some(path.into());
        self
    }

    /// Adds a response header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The stable code as written in the body.
    pub fn code_str(&self) -> &'static str {
        self.code.as_str()
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

    /// The HTTP status of this error.
    pub fn http_status(&self) -> StatusCode {
        self.code.status()
    }
}

/// The one mapping from error code to HTTP status.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::DecodeError | ErrorCode::ContextLengthExceeded | ErrorCode::Unsupported => StatusCode::BAD_REQUEST,
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
#[derive(Serialize, schemars::JsonSchema)]
#[schemars(rename = "Error")]
pub(crate) struct Body<'a> {
    /// What went wrong.
    error: Inner<'a>,
    /// The request's id, when one was assigned (its result may still come).
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Serialize, schemars::JsonSchema)]
#[schemars(rename = "ErrorDetail")]
struct Inner<'a> {
    /// Stable code (`invalid_request`, `not_found`, `unauthenticated`, ...).
    code: &'a str,
    /// For people: what went wrong and what to do.
    message: &'a str,
    /// Whether the same request may succeed later.
    retryable: bool,
    /// OpenAI's error type.
    #[serde(rename = "type")]
    kind: &'a str,
    /// The part of the request at fault (`params.temperature`, `query`).
    param: Option<&'a str>,
}

impl ApiError {
    /// The JSON error body.
    pub fn body(&self) -> serde_json::Value {
        let status = self.http_status();
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 | 503 => "rate_limit_error",
            s if s < 500 => "invalid_request_error",
            _ => "server_error",
        };
        let body = Body {
            error: Inner {
                code: self.code_str(),
                message: &self.message,
                retryable: self.code.retryable(),
                kind,
                param: self.param.as_deref(),
            },
            request_id: self.request_id.as_deref(),
        };
        serde_json::to_value(body).expect("error body is JSON")
    }

    /// A request body that could not be read: too large (413) or broken
    /// off (400; axum's only other rejection of a body).
    pub fn from_body_rejection(r: axum::extract::rejection::BytesRejection) -> ApiError {
        let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiCode::Wire(ErrorCode::PromptTooLarge)
        } else {
            ApiCode::Ingress(IngressCode::UnreadableBody)
        };
        ApiError::new(code, r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.http_status();
        let mut resp = (status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.code == ApiCode::Ingress(IngressCode::Unauthenticated) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, v);
            }
        }
        if let Some(id) = self.request_id.as_deref().and_then(|id| HeaderValue::from_str(id).ok()) {
            resp.headers_mut().insert(REQUEST_ID, id);
        }
        resp
    }
}

impl From<ErrorBody> for ApiError {
    fn from(e: ErrorBody) -> Self {
        ApiError::new(e.code, e.message)
    }
}

/// Header carrying the request id, echoed on every response.
pub const REQUEST_ID: &str = "x-request-id";

/// Reads a JSON body: syntax errors are 400, wrong shapes 422 with the path
/// of the field at fault in `param`, both with serde's message.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    use serde_json::error::Category;
    // every body is an object; serde would also read a struct from an array
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::new(ErrorCode::InvalidRequest, "the request body must be a JSON object, not an array"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let (e, path) = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => match de.end() {
            Ok(()) => return Ok(v),
            Err(e) => (e, String::new()),
        },
        Err(e) => {
            let path = e.path().to_string();
            (e.into_inner(), path)
        }
    };
    Err(match e.classify() {
        Category::Data => {
            let message = e.to_string();
            // at the top (or under a flattened struct, which loses the
            // path) only these name a field; `unknown variant `x``
            // names a value
            let names_field =
                ["missing field", "unknown field", "duplicate field"].iter().any(|p| message.starts_with(p));
            let param = match (path.as_str(), field_of(&message)) {
                ("" | ".", field) => field.filter(|_| names_field).map(str::to_string),
                (_, Some(field)) if message.starts_with("missing field") => Some(format!("{path}.{field}")),
                _ => Some(path),
            };
            let err = ApiError::new(ErrorCode::InvalidRequest, format!("invalid request body: {message}"));
            match param {
                Some(p) => err.param(p),
                None => err,
            }
        }
        _ => ApiError::new(ErrorCode::DecodeError, format!("request body is not valid JSON: {e}")),
    })
}

/// The field a validation message names (`` `params.top_p` must be ...``).
pub fn field_of(message: &str) -> Option<&str> {
    let start = message.find('`')? + 1;
    let len = message[start..].find('`')?;
    Some(&message[start..start + len])
}

/// `Query<T>` whose rejection is an [`ApiError`] (422 naming the query),
/// not axum's plain-text answer.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(t)) => Ok(ApiQuery(t)),
            Err(r) => Err(ApiError::new(ErrorCode::InvalidRequest, r.body_text()).param("query")),
        }
    }
}

/// `Path<T>` whose rejection is an [`ApiError`] (a path that is not UTF-8).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(t)) => Ok(ApiPath(t)),
            Err(r) => Err(ApiError::new(ErrorCode::InvalidRequest, r.body_text()).param("path")),
        }
    }
}
