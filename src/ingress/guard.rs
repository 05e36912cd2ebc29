//! Middleware: request ids on every route, and on API routes the guard:
//! credential (401), role of the route class (403), request rate limit
//! (429), in that order, before the body is read. Handlers set the id they
//! used with [`with_request_id`].

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use retro_fleet_schemas::request::MAX_ID_LEN;
use retro_fleet_schemas::{subjects, ErrorCode};

use super::auth::Role;
use super::error::{ApiError, IngressCode, REQUEST_ID};
use super::ratelimit::{self, RouteClass, Unit};
use super::AppState;

impl RouteClass {
    /// The role a route of this class needs.
    pub fn role(self) -> Role {
        match self {
            RouteClass::Submit => Role::Submit,
            RouteClass::Read => Role::Read,
            RouteClass::Admin => Role::Admin,
        }
    }
}

/// Marks (inside the ingress only; a caller's copy is removed) a request
/// whose `X-Request-Id` the ingress made, as opposed to one the caller chose.
pub const ID_MADE_HERE: &str = "x-retro-fleet-id-made-here";

/// Gives every request an id: the caller's `X-Request-Id` (1-128 of
/// `[A-Za-z0-9_-]`; it also becomes the id of a published request that
/// names none in its body) or a new ULID. It is echoed on the response.
pub async fn request_id(mut req: Request, next: Next) -> Response {
    // only this middleware says an id was made here (see [`ID_MADE_HERE`])
    req.headers_mut().remove(ID_MADE_HERE);
    let id = match req.headers().get(REQUEST_ID) {
        Some(v) => match v.to_str().ok().filter(|s| s.len() <= MAX_ID_LEN && subjects::is_token(s)) {
            Some(s) => s.to_string(),
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
            let id = ulid::Ulid::new().to_string();
            req.headers_mut().insert(REQUEST_ID, HeaderValue::from_str(&id).expect("a ULID is a header value"));
            req.headers_mut().insert(ID_MADE_HERE, HeaderValue::from_static("1"));
            id
        }
    };
    let mut resp = next.run(req).await;
    if !resp.headers().contains_key(REQUEST_ID) {
        resp.headers_mut().insert(REQUEST_ID, HeaderValue::from_str(&id).expect("checked above"));
    }
    resp
}

/// Sets `X-Request-Id` to the id the fleet used for this request (a
/// handler's answer wins over the one [`request_id`] would echo).
pub fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    resp
}

/// Authenticates, authorises for the route's class, and applies its
/// request limit; the [`Principal`](super::auth::Principal) goes to the
/// handler as a request extension.
pub async fn guard(State((state, class)): State<(AppState, RouteClass)>, mut req: Request, next: Next) -> Response {
    let who = match state.auth.authenticate(req.headers()) {
        Ok(p) => p,
        Err(e) => {
            state.metrics.denied.with_label_values(&[class.as_str(), "unauthenticated"]).inc();
            return e.into_response();
        }
    };
    let role = class.role();
    if !who.roles.allows(role) {
        state.metrics.denied.with_label_values(&[class.as_str(), "forbidden"]).inc();
        return ApiError::new(IngressCode::Forbidden, format!("this route needs the `{}` role", role.as_str()))
            .into_response();
    }
    let decision = state.limits.check(&who, class, Unit::Requests, 1).await;
    if let Some(d) = decision.filter(|d| !d.allowed) {
        state.metrics.denied.with_label_values(&[class.as_str(), "rate_limited"]).inc();
        return ratelimit::refusal(&d, Unit::Requests).into_response();
    }
    req.extensions_mut().insert(who);
    let mut resp = next.run(req).await;
    if let Some(d) = decision {
        ratelimit::add_headers(resp.headers_mut(), &d, Unit::Requests);
    }
    resp
}
