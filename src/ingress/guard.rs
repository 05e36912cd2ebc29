//! Middleware on API routes: failed-login throttle per peer address (429),
//! credential (401), role of the route class (403), request rate limit
//! (429), in that order, before the body is read.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::Role;
use super::error::{ApiCode, ApiError, IngressCode};
use super::ratelimit::{self, RouteClass, Unit};
use super::state::AppState;

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

/// Authenticates, authorises for the route's class, and applies its
/// request limit; the [`Principal`](super::auth::Principal) goes to the
/// handler as a request extension.
pub async fn guard(State((state, class)): State<(AppState, RouteClass)>, mut req: Request, next: Next) -> Response {
    // with authentication off nobody can fail a login: no throttle to consult
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()).filter(|_| state.auth.enabled());
    let now = retro_fleet_worker::unix_ms();
    if let Some(secs) = peer.and_then(|p| state.logins.blocked(p, now)) {
        state.metrics.denied.with_label_values(&[class.as_str(), "login_throttled"]).inc();
        return ApiError::new(
            IngressCode::RateLimited,
            format!("too many failed credentials from this address; retry in {secs} s"),
        )
        .retry_after(secs)
        .into_response();
    }
    let who = match state.auth.authenticate(req.headers()) {
        Ok(p) => p,
        Err(e) => {
            if let (Some(p), ApiCode::Ingress(IngressCode::Unauthenticated)) = (peer, e.code) {
                state.logins.failed(p, now);
            }
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
