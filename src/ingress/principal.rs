//! Who is calling: the roles a credential may hold, the priority classes
//! it may use, and the [`Principal`] the guard hands to every handler.
//! [`auth`](super::auth) establishes it from a credential.

use retro_fleet_schemas::Priority;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, IngressCode};

/// A role a credential may hold. `admin` includes the other two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Send requests (`/v1/infer`, `/v1/chat/completions`, ...).
    Submit,
    /// Read results and the model list.
    Read,
    /// Everything, including admin routes.
    Admin,
}

impl Role {
    /// The role as written in config and tokens.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Read => "read",
            Role::Admin => "admin",
        }
    }

    /// `submit`, `read` or `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "submit" => Some(Role::Submit),
            "read" => Some(Role::Read),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of roles.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    /// Every role.
    pub const ALL: Roles = Roles(0b111);

    /// The set of `roles`.
    pub fn of(roles: impl IntoIterator<Item = Role>) -> Roles {
        Roles(roles.into_iter().fold(0, |acc, r| acc | r.bit()))
    }

    /// Whether this set grants `role` (`admin` grants everything).
    pub fn allows(self, role: Role) -> bool {
        self.0 & (role.bit() | Role::Admin.bit()) != 0
    }
}

/// The highest priority classes a credential may use: a property of the
/// key or token, never the caller's choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ceilings {
    /// Single requests (`/v1/infer`, chat and completions).
    pub requests: Priority,
    /// Batch lines (`POST /v1/batches`).
    pub batches: Priority,
}

impl Default for Ceilings {
    /// Any class for requests; batches at most `normal`, so a batch never
    /// competes with interactive traffic unless its key says it may.
    fn default() -> Self {
        Ceilings { requests: Priority::High, batches: Priority::Normal }
    }
}

impl Ceilings {
    /// No ceiling (authentication off).
    pub const NONE: Ceilings = Ceilings { requests: Priority::High, batches: Priority::High };

    /// The ceilings of a key or token that names `requests` and `batches`
    /// (each optional); batches are never above requests.
    pub fn of(requests: Option<Priority>, batches: Option<Priority>) -> Ceilings {
        let d = Ceilings::default();
        let requests = requests.unwrap_or(d.requests);
        Ceilings { requests, batches: batches.unwrap_or(d.batches).max(requests) }
    }
}

/// A priority class a caller asked for, and the field that asked (which a
/// refusal names): `priority`, `headers.x-priority`, `service_tier`.
pub type Asked = (Priority, &'static str);

/// What a priority is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// One request.
    Request,
    /// The lines of a batch.
    Batch,
}

/// Who is calling, as established from the credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `key:<id>`, `jwt:<iss>/<tenant>/<sub>` or `anonymous` (authentication off).
    pub id: String,
    /// Tenant: results are stored and read under it.
    pub tenant: String,
    /// Granted roles.
    pub roles: Roles,
    /// The highest classes it may use.
    pub ceilings: Ceilings,
    /// The credential's own budget (an API key's; its tenant's is in KV
    /// `fleet_tenants`).
    pub budget: Option<retro_fleet_schemas::Budget>,
}

impl Principal {
    /// A caller with the default ceilings.
    pub fn new(id: impl Into<String>, tenant: impl Into<String>, roles: Roles) -> Principal {
        Principal { id: id.into(), tenant: tenant.into(), roles, ceilings: Ceilings::default(), budget: None }
    }

    /// The class a request (or a batch's lines) runs in: the class asked
    /// for, when this credential may use it (else 403 naming the field that
    /// asked); without one, the default (`normal` for a request, `low` for
    /// a batch's lines) capped at the credential's ceiling, so not asking
    /// is never refused.
    pub fn class(&self, asked: Option<Asked>, what: Use) -> Result<Priority, ApiError> {
        let (ceiling, ceiling_field, default) = match what {
            Use::Request => (self.ceilings.requests, "max_priority", Priority::Normal),
            Use::Batch => (self.ceilings.batches, "max_batch_priority", Priority::Low),
        };
        // classes order highest first: "at most the ceiling" is `>=`
        match asked {
            None => Ok(default.max(ceiling)),
            Some((class, _)) if class >= ceiling => Ok(class),
            Some((class, field)) => Err(ApiError::new(
                IngressCode::Forbidden,
                format!(
                    "`{field}` asks for priority `{class}`, but this credential may use `{ceiling}` at most here \
                     (its `{ceiling_field}`); ask for `{ceiling}` or lower"
                ),
            )
            .param(field)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_class_above_the_ceiling_is_refused_naming_the_field_and_none_asked_is_capped() {
        let mut low = Principal::new("key:k", "acme", Roles::ALL);
        low.ceilings = Ceilings::of(Some(Priority::Low), None);
        assert_eq!(low.class(None, Use::Request).unwrap(), Priority::Low);
        assert_eq!(low.class(Some((Priority::Low, "service_tier")), Use::Request).unwrap(), Priority::Low);
        let e = low.class(Some((Priority::High, "service_tier")), Use::Request).unwrap_err();
        assert_eq!((e.http_status().as_u16(), e.param.as_deref()), (403, Some("service_tier")));
        assert!(e.message.starts_with("`service_tier` asks for priority `high`"), "{}", e.message);
        let open = Principal::new("anonymous", "default", Roles::ALL);
        assert_eq!(open.class(None, Use::Request).unwrap(), Priority::Normal);
        assert_eq!(open.class(Some((Priority::High, "priority")), Use::Request).unwrap(), Priority::High);
    }
}
