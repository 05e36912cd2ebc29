//! Authentication and roles.
//!
//! Two kinds of credential, both sent as `Authorization: Bearer <credential>`
//! (an API key may also come as `X-API-Key`):
//! - **API keys**, configured by the SHA-256 of the key (the key itself is
//!   never stored), each with a tenant and roles;
//! - **JWTs** signed with HS256, RS256 or ES256 by a configured key. `exp`,
//!   `iss` and `aud` are required and checked, `nbf` when present. The
//!   header's `alg` must be the algorithm configured for the key, so
//!   `alg: none` and HS256 tokens made with an RSA public key as the secret
//!   (algorithm confusion) are refused.
//!
//! The tenant always comes from the credential (a key's `tenant`, a token's
//! tenant claim); a `Fleet-Tenant` header or body field from the caller is
//! not trusted when authentication is on. With authentication off (the
//! default for a local `up`) every caller has every role and the tenant is
//! taken from `Fleet-Tenant` (default `default`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use axum::http::HeaderMap;
use retro_fleet_schemas::{headers, subjects, ErrorCode, Priority};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::{ApiError, IngressCode};
pub use super::jwt::JwtAlgorithm;
use super::jwt::{Rules, VerifyingKey};
pub use super::principal::{Asked, Ceilings, Principal, Role, Roles, Use};

/// An API key from the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Name of the key (in logs and rate-limit keys; never secret).
    pub id: String,
    /// Hex SHA-256 of the key: `printf %s "$KEY" | sha256sum`.
    pub sha256: String,
    /// Tenant of every request made with this key.
    pub tenant: String,
    /// Roles granted.
    pub roles: Vec<Role>,
    /// The highest class its requests may use (default `high`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_priority: Option<Priority>,
    /// The highest class its batches may use (default `normal`, and never
    /// above `max_priority`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_priority: Option<Priority>,
    /// What requests made with this key may use per day or month (besides
    /// its tenant's budget); none: no limit of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<retro_fleet_schemas::Budget>,
}

/// A key that verifies JWTs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    /// Key id: a token with a `kid` header is checked only against the key of that id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The one algorithm this key verifies.
    pub algorithm: JwtAlgorithm,
    /// HS256: the shared secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// RS256/ES256: the public key, PEM (`-----BEGIN PUBLIC KEY-----`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// RS256/ES256: a file holding the public key PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_file: Option<PathBuf>,
}

/// `[ingress.auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require a credential on every API route (health and metrics stay open).
    pub enabled: bool,
    /// API keys.
    pub api_keys: Vec<ApiKeyConfig>,
    /// Also accept the API keys in the KV bucket `fleet_api_keys`
    /// (`retro-fleet keys add|list|revoke`), followed live: an added key
    /// works and a revoked one stops within moments, without a restart.
    /// Off by default: whoever may write that bucket may then mint keys.
    pub kv_keys: bool,
    /// Keys that verify JWTs.
    pub jwt_keys: Vec<JwtKeyConfig>,
    /// Accepted `iss` values (required when JWT keys are configured).
    pub jwt_issuers: Vec<String>,
    /// Accepted `aud` values (required when JWT keys are configured).
    pub jwt_audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub jwt_leeway_secs: u64,
    /// Claim that holds the tenant.
    pub tenant_claim: String,
    /// Claim that holds the roles: a list, or a space-separated string.
    pub roles_claim: String,
    /// Failed credentials one IP address may send per minute; beyond, its
    /// calls are answered 429 until the minute is over, before any
    /// credential is checked (0: no limit).
    pub failed_logins_per_minute: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            enabled: false,
            api_keys: Vec::new(),
            kv_keys: false,
            jwt_keys: Vec::new(),
            jwt_issuers: Vec::new(),
            jwt_audiences: Vec::new(),
            jwt_leeway_secs: 30,
            tenant_claim: "tenant".into(),
            roles_claim: "roles".into(),
            failed_logins_per_minute: 30,
        }
    }
}

impl AuthConfig {
    /// A copy with secrets replaced by `"<redacted>"`, for display.
    pub fn redacted(&self) -> AuthConfig {
        let mut c = self.clone();
        for k in &mut c.api_keys {
            k.sha256 = "<redacted>".into();
        }
        for k in &mut c.jwt_keys {
            if k.secret.is_some() {
                k.secret = Some("<redacted>".into());
            }
        }
        c
    }
}

/// One accepted API key (its digest is the map key).
pub struct KeyEntry {
    id: String,
    tenant: String,
    roles: Roles,
    ceilings: Ceilings,
    budget: Option<retro_fleet_schemas::Budget>,
}

impl KeyEntry {
    /// Checks one key's settings; its digest and entry.
    fn of(k: &ApiKeyConfig, origin: &str) -> anyhow::Result<([u8; 32], KeyEntry)> {
        let digest: [u8; 32] = from_hex(k.sha256.trim())
            .and_then(|d| d.try_into().ok())
            .ok_or_else(|| anyhow::anyhow!("{origin} `{}`: sha256 must be 64 hex digits", k.id))?;
        if !subjects::is_token(&k.tenant) || !subjects::is_token(&k.id) {
            anyhow::bail!("{origin} `{}`: id and tenant must be characters from [A-Za-z0-9_-]", k.id);
        }
        let entry = KeyEntry {
            id: k.id.clone(),
            tenant: k.tenant.clone(),
            roles: Roles::of(k.roles.iter().copied()),
            ceilings: Ceilings::of(k.max_priority, k.max_batch_priority),
            budget: k.budget,
        };
        Ok((digest, entry))
    }
}

/// API keys from the KV bucket `fleet_api_keys`, by digest, kept current
/// by [`follow_kv_keys`].
pub type KvKeys = Arc<RwLock<HashMap<[u8; 32], KeyEntry>>>;

/// Follows the KV bucket of API keys (one JSON [`ApiKeyConfig`] per key id)
/// into `keys`: current keys first, then every put and delete as it
/// happens. A malformed entry is skipped with a warning. If the watch ends
/// (NATS trouble), the KV keys are dropped until it is re-established, so
/// a revocation missed meanwhile cannot keep a key alive.
pub async fn follow_kv_keys(kv: async_nats::jetstream::kv::Store, keys: KvKeys) {
    use async_nats::jetstream::kv::Operation;
    use futures::StreamExt;
    loop {
        let mut watch = match kv.watch_with_history(">").await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the API keys in KV; retrying (only configured keys work)");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(entry) = watch.next().await {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "API key watch");
                    continue;
                }
            };
            let mut keys = keys.write().expect("kv keys lock");
            // a key id maps to one digest: drop the id's previous key first
            keys.retain(|_, e| e.id != entry.key);
            if entry.operation != Operation::Put {
                tracing::info!(key = %entry.key, "API key revoked");
                continue;
            }
            let parsed = serde_json::from_slice::<ApiKeyConfig>(&entry.value)
                .map_err(anyhow::Error::from)
                .and_then(|k| KeyEntry::of(&k, "fleet_api_keys"));
            match parsed {
                Ok((digest, e)) if e.id == entry.key => {
                    tracing::info!(key = %entry.key, tenant = %e.tenant, "API key active");
                    keys.insert(digest, e);
                }
                Ok(_) => tracing::warn!(key = %entry.key, "API key entry names another id; skipped"),
                Err(e) => tracing::warn!(key = %entry.key, error = %e, "unreadable API key entry; skipped"),
            }
        }
        keys.write().expect("kv keys lock").clear();
        tracing::warn!("the API key watch ended; KV keys are refused until it is back");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Checks credentials against the configured keys.
pub struct Authenticator {
    enabled: bool,
    api_keys: HashMap<[u8; 32], KeyEntry>,
    kv_keys: Option<KvKeys>,
    jwt_keys: Vec<VerifyingKey>,
    jwt_rules: Rules,
    tenant_claim: String,
    roles_claim: String,
}

fn unauthenticated(message: impl Into<String>) -> ApiError {
    ApiError::new(IngressCode::Unauthenticated, message)
}

impl Authenticator {
    /// Builds from config; refuses settings that would let nobody in or
    /// anybody in (a JWT key without issuer and audience, a malformed hash).
    pub fn new(cfg: &AuthConfig) -> anyhow::Result<Authenticator> {
        let mut api_keys = HashMap::new();
        for k in &cfg.api_keys {
            let (digest, entry) = KeyEntry::of(k, "ingress.auth.api_keys")?;
            if api_keys.insert(digest, entry).is_some() {
                anyhow::bail!("ingress.auth.api_keys `{}`: the same key is configured twice", k.id);
            }
        }
        if !cfg.jwt_keys.is_empty() && (cfg.jwt_issuers.is_empty() || cfg.jwt_audiences.is_empty()) {
            anyhow::bail!("ingress.auth: JWT keys need ingress.auth.jwt_issuers and ingress.auth.jwt_audiences");
        }
        let mut jwt_keys = Vec::new();
        for (i, k) in cfg.jwt_keys.iter().enumerate() {
            let name = k.kid.clone().unwrap_or_else(|| format!("#{i}"));
            let pem = || -> anyhow::Result<String> {
                match (&k.public_key_pem, &k.public_key_file) {
                    (Some(p), None) => Ok(p.clone()),
                    (None, Some(f)) => std::fs::read_to_string(f)
                        .map_err(|e| anyhow::anyhow!("ingress.auth.jwt_keys {name}: reading {}: {e}", f.display())),
                    _ => anyhow::bail!("ingress.auth.jwt_keys {name}: give one of public_key_pem or public_key_file"),
                }
            };
            let key = match k.algorithm {
                JwtAlgorithm::HS256 => {
                    let secret = k.secret.as_deref().filter(|s| s.len() >= 32).ok_or_else(|| {
                        anyhow::anyhow!("ingress.auth.jwt_keys {name}: HS256 needs a `secret` of at least 32 bytes")
                    })?;
                    if k.public_key_pem.is_some() || k.public_key_file.is_some() {
                        anyhow::bail!("ingress.auth.jwt_keys {name}: HS256 takes a secret, not a public key");
                    }
                    VerifyingKey::hs256(k.kid.clone(), secret.as_bytes())
                }
                alg => {
                    if k.secret.is_some() {
                        anyhow::bail!("ingress.auth.jwt_keys {name}: {alg:?} takes a public key, not a secret");
                    }
                    VerifyingKey::public(k.kid.clone(), alg, &pem()?)
                        .map_err(|e| anyhow::anyhow!("ingress.auth.jwt_keys {name}: {e}"))?
                }
            };
            jwt_keys.push(key);
        }
        if cfg.enabled && api_keys.is_empty() && jwt_keys.is_empty() && !cfg.kv_keys {
            anyhow::bail!(
                "ingress.auth.enabled is true but no api_keys or jwt_keys are configured and kv_keys is off: \
                 nobody could call"
            );
        }
        Ok(Authenticator {
            enabled: cfg.enabled,
            api_keys,
            kv_keys: (cfg.enabled && cfg.kv_keys).then(Default::default),
            jwt_keys,
            jwt_rules: Rules {
                issuers: cfg.jwt_issuers.clone(),
                audiences: cfg.jwt_audiences.clone(),
                leeway_secs: cfg.jwt_leeway_secs,
            },
            tenant_claim: cfg.tenant_claim.clone(),
            roles_claim: cfg.roles_claim.clone(),
        })
    }

    /// The live set of KV keys to follow, when they are accepted.
    pub fn kv_keys(&self) -> Option<KvKeys> {
        self.kv_keys.clone()
    }

    /// Whether credentials are required.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Establishes the caller from the request headers: 401 without a valid credential.
    pub fn authenticate(&self, h: &HeaderMap) -> Result<Principal, ApiError> {
        if !self.enabled {
            let tenant = h.get(headers::TENANT).and_then(|v| v.to_str().ok()).unwrap_or(subjects::DEFAULT_TENANT);
            if !subjects::is_token(tenant) {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    "Fleet-Tenant must be characters from [A-Za-z0-9_-]",
                )
                .param("headers.fleet-tenant"));
            }
            let roles = Roles::ALL;
            return Ok(Principal {
                id: "anonymous".into(),
                tenant: tenant.into(),
                roles,
                ceilings: Ceilings::NONE,
                budget: None,
            });
        }
        if let Some(key) = h.get("x-api-key") {
            let key = key.to_str().map_err(|_| unauthenticated("X-API-Key is not a valid key"))?;
            return self.api_key(key.trim());
        }
        let Some(auth) = h.get(axum::http::header::AUTHORIZATION) else {
            return Err(unauthenticated("a credential is required: send `Authorization: Bearer <API key or JWT>`"));
        };
        let auth = auth.to_str().map_err(|_| unauthenticated("the Authorization header is not valid text"))?;
        let Some(credential) = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("bearer ")) else {
            return Err(unauthenticated("the Authorization header must be `Bearer <API key or JWT>`"));
        };
        let credential = credential.trim();
        if credential.bytes().filter(|b| *b == b'.').count() == 2 {
            self.jwt(credential)
        } else {
            self.api_key(credential)
        }
    }

    fn api_key(&self, key: &str) -> Result<Principal, ApiError> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let principal = |e: &KeyEntry| Principal {
            id: format!("key:{}", e.id),
            tenant: e.tenant.clone(),
            roles: e.roles,
            ceilings: e.ceilings,
            budget: e.budget,
        };
        if let Some(e) = self.api_keys.get(&digest) {
            return Ok(principal(e));
        }
        match self.kv_keys.as_ref().and_then(|kv| kv.read().expect("kv keys lock").get(&digest).map(principal)) {
            Some(p) => Ok(p),
            None => Err(unauthenticated("unknown API key")),
        }
    }

    fn jwt(&self, token: &str) -> Result<Principal, ApiError> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        match super::jwt::verify(token, &self.jwt_keys, &self.jwt_rules, now) {
            Ok(claims) => self.principal_of(claims),
            Err(e) => Err(unauthenticated(e.to_string())),
        }
    }

    fn principal_of(&self, claims: serde_json::Map<String, Value>) -> Result<Principal, ApiError> {
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
        let tenant = claims
            .get(&self.tenant_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| unauthenticated(format!("the token has no `{}` claim", self.tenant_claim)))?;
        if !subjects::is_token(tenant) {
            return Err(unauthenticated(format!(
                "the token's `{}` is not characters from [A-Za-z0-9_-]",
                self.tenant_claim
            )));
        }
        // a string of roles is split on ASCII spaces only, as documented:
        // any other separator (U+3000, U+2028, ...) makes one unknown name
        let names: Vec<&str> = match claims.get(&self.roles_claim) {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            Some(Value::String(s)) => s.split(' ').filter(|n| !n.is_empty()).collect(),
            _ => Vec::new(),
        };
        let mut roles = Vec::new();
        for name in names {
            let role = Role::parse(name).ok_or_else(|| {
                unauthenticated(format!(
                    "the token's `{}` names {:?}, which is not a role (submit, read, admin)",
                    self.roles_claim, name
                ))
            })?;
            roles.push(role);
        }
        // rate limits count per issuer, tenant and subject: two tenants'
        // tokens never share a counter; tokens without `sub` share their
        // tenant's (and issuer's) one
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let id = format!("jwt:{iss}/{tenant}/{sub}");
        let ceiling =
            |claim: &str| match claims.get(claim) {
                None => Ok(None),
                Some(v) => v.as_str().and_then(|s| s.parse().ok()).map(Some).ok_or_else(|| {
                    unauthenticated(format!("the token's `{claim}` is not a priority (high, normal, low)"))
                }),
            };
        let ceilings = Ceilings::of(ceiling("max_priority")?, ceiling("max_batch_priority")?);
        Ok(Principal { id, tenant: tenant.to_string(), roles: Roles::of(roles), ceilings, budget: None })
    }
}

/// Hex SHA-256 of an API key, as `ingress.auth.api_keys.sha256` wants it.
pub fn hash_key(key: &str) -> String {
    to_hex(&Sha256::digest(key.as_bytes()))
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_includes_everything_and_others_only_themselves() {
        let admin = Roles::of([Role::Admin]);
        assert!(admin.allows(Role::Submit) && admin.allows(Role::Read) && admin.allows(Role::Admin));
        let read = Roles::of([Role::Read]);
        assert!(read.allows(Role::Read));
        assert!(!read.allows(Role::Submit));
        assert!(!read.allows(Role::Admin));
        assert!(!Roles::default().allows(Role::Read));
    }

    #[test]
    fn api_keys_are_matched_by_hash() {
        let cfg = AuthConfig {
            enabled: true,
            api_keys: vec![ApiKeyConfig {
                id: "ci".into(),
                sha256: hash_key("s3cret"),
                tenant: "acme".into(),
                roles: vec![Role::Submit],
                max_priority: None,
                max_batch_priority: Some(Priority::Low),
                budget: None,
            }],
            ..Default::default()
        };
        let a = Authenticator::new(&cfg).unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer s3cret".parse().unwrap());
        let p = a.authenticate(&h).unwrap();
        assert_eq!((p.id.as_str(), p.tenant.as_str()), ("key:ci", "acme"));
        assert_eq!(p.ceilings, Ceilings { requests: Priority::High, batches: Priority::Low });
        assert_eq!(p.class(Some((Priority::High, "priority")), Use::Request).unwrap(), Priority::High);
        let e = p.class(Some((Priority::Normal, "priority")), Use::Batch).unwrap_err();
        assert!(e.message.contains("`low` at most"), "{}", e.message);
        assert_eq!(e.param.as_deref(), Some("priority"));
        // not asking is never refused: the default, capped at the ceiling
        assert_eq!(p.class(None, Use::Batch).unwrap(), Priority::Low);
        assert_eq!(p.class(None, Use::Request).unwrap(), Priority::Normal);
        h.insert("authorization", "Bearer s3creT".parse().unwrap());
        assert_eq!(a.authenticate(&h).unwrap_err().http_status(), 401);
        h.remove("authorization");
        assert_eq!(a.authenticate(&h).unwrap_err().http_status(), 401);
        h.insert("x-api-key", "s3cret".parse().unwrap());
        assert_eq!(a.authenticate(&h).unwrap().tenant, "acme");
    }

    #[test]
    fn settings_that_let_nobody_or_anybody_in_are_refused() {
        let on = AuthConfig { enabled: true, kv_keys: false, ..Default::default() };
        assert!(Authenticator::new(&on).is_err(), "no key anywhere");
        let kv_only = AuthConfig { enabled: true, kv_keys: true, ..Default::default() };
        assert!(Authenticator::new(&kv_only).is_ok(), "keys may be added to KV while it runs");
        let jwt_without_aud = AuthConfig {
            jwt_keys: vec![JwtKeyConfig {
                kid: None,
                algorithm: JwtAlgorithm::HS256,
                secret: Some("x".repeat(32)),
                public_key_pem: None,
                public_key_file: None,
            }],
            jwt_issuers: vec!["me".into()],
            ..Default::default()
        };
        assert!(Authenticator::new(&jwt_without_aud).is_err());
        let short_secret = AuthConfig {
            jwt_audiences: vec!["fleet".into()],
            jwt_keys: vec![JwtKeyConfig { secret: Some("short".into()), ..jwt_without_aud.jwt_keys[0].clone() }],
            ..jwt_without_aud.clone()
        };
        assert!(Authenticator::new(&short_secret).is_err());
        let bad_hash = AuthConfig {
            api_keys: vec![ApiKeyConfig {
                id: "x".into(),
                sha256: "abc".into(),
                tenant: "t".into(),
                roles: vec![],
                max_priority: None,
                max_batch_priority: None,
                budget: None,
            }],
            ..Default::default()
        };
        assert!(Authenticator::new(&bad_hash).is_err());
    }
}
