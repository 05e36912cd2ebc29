//! `GET /v1/usage`: metered usage, added up (see [`crate::usage`]). An
//! admin reads any tenant's; any other caller its own tenant's only.

use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use retro_fleet_schemas::ErrorCode;
use serde::Deserialize;

use super::auth::{Principal, Role};
use super::error::{ApiError, ApiQuery, IngressCode};
use super::state::AppState;
use crate::usage::{self, Dim, Query};

/// The query of `GET /v1/usage`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UsageParams {
    /// Only this tenant (a caller that is not an admin: its own only).
    pub tenant: Option<String>,
    /// Only this credential (`key:<id>`, `jwt:<iss>/<tenant>/<sub>`).
    pub key: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// First UTC day, `YYYY-MM-DD`, inclusive.
    pub from: Option<String>,
    /// Last UTC day, `YYYY-MM-DD`, inclusive.
    pub to: Option<String>,
    /// Comma-separated dimensions: `tenant`, `key`, `model`, `day`
    /// (default `tenant,model,day`).
    pub group_by: Option<String>,
}

/// The caller's query as [`usage::read`] takes it, or a 422 / 403 naming
/// what is wrong.
fn query(who: &Principal, p: UsageParams) -> Result<Query, ApiError> {
    let invalid = |field: &str, message: String| ApiError::new(ErrorCode::InvalidRequest, message).param(field);
    let day = |field: &str, v: &Option<String>| match v {
        Some(s) => usage::parse_day(s)
            .map(Some)
            .ok_or_else(|| invalid(field, format!("`{field}` is a day, YYYY-MM-DD; not `{s}`"))),
        None => Ok(None),
    };
    let (from, to) = (day("from", &p.from)?, day("to", &p.to)?);
    let group_by =
        Dim::parse_list(p.group_by.as_deref().unwrap_or("tenant,model,day")).map_err(|e| invalid("group_by", e))?;
    for (field, v) in [("tenant", &p.tenant), ("model", &p.model)] {
        if v.as_deref().is_some_and(|v| !retro_fleet_schemas::subjects::is_token(v)) {
            return Err(invalid(field, format!("`{field}` is a name of letters, digits, `_` and `-`")));
        }
    }
    let tenant = match p.tenant {
        _ if who.roles.allows(Role::Admin) => p.tenant,
        Some(t) if t != who.tenant => {
            return Err(ApiError::new(IngressCode::Forbidden, "a tenant reads its own usage only (an admin reads any)")
                .param("tenant"))
        }
        _ => Some(who.tenant.clone()),
    };
    Ok(Query { tenant, key: p.key, model: p.model, from, to, group_by })
}

/// `GET /v1/usage?tenant=&key=&model=&from=&to=&group_by=`.
pub async fn get(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(p): ApiQuery<UsageParams>,
) -> Response {
    let q = match query(&who, p) {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    match usage::read(&state.js, &q).await {
        Ok(rows) => Json(serde_json::json!({ "object": "list", "data": rows })).into_response(),
        Err(e) => ApiError::new(ErrorCode::Internal, e.to_string()).into_response(),
    }
}
