//! JSON Web Tokens (RFC 7519, compact JWS) signed with HS256, RS256 or
//! ES256, verified with `ring`.
//!
//! Only what the ingress needs, with no option to weaken it: the header's
//! `alg` must be one of the three and must equal the algorithm of the key
//! that verifies it (so `none`, and HS256 made with an RSA public key as the
//! HMAC secret, never verify); `crit` extensions are refused; `exp`, `iss`
//! and `aud` are required, `nbf` checked when present.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{self, UnparsedPublicKey};
use serde_json::{Map, Value};

/// Signature algorithms accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum JwtAlgorithm {
    /// HMAC with SHA-256 and a shared secret.
    HS256,
    /// RSA PKCS#1 v1.5 with SHA-256 (2048-8192-bit keys).
    RS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
}

impl JwtAlgorithm {
    fn parse(s: &str) -> Option<JwtAlgorithm> {
        match s {
            "HS256" => Some(JwtAlgorithm::HS256),
            "RS256" => Some(JwtAlgorithm::RS256),
            "ES256" => Some(JwtAlgorithm::ES256),
            _ => None,
        }
    }
}

enum Material {
    Hmac(ring::hmac::Key),
    /// PKCS#1 `RSAPublicKey` DER.
    Rsa(Vec<u8>),
    /// Uncompressed P-256 point.
    Ec(Vec<u8>),
}

/// A key that verifies one algorithm.
pub struct VerifyingKey {
    /// Key id; a token naming a `kid` is checked only against keys with that id (or none).
    pub kid: Option<String>,
    alg: JwtAlgorithm,
    material: Material,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url parts of JSON objects.
    #[error("the token is malformed: {0}")]
    Malformed(String),
    /// `alg` other than HS256, RS256, ES256 (including `none`).
    #[error("the token's algorithm `{0}` is not accepted")]
    Algorithm(String),
    /// No configured key for the token's algorithm (and kid).
    #[error("no key is configured for {0:?} tokens with this kid")]
    NoKey(JwtAlgorithm),
    /// No candidate key verifies the signature.
    #[error("the token's signature does not verify")]
    Signature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    /// `iss` is not accepted.
    #[error("the token's issuer is not accepted")]
    Issuer,
    /// `aud` is not accepted.
    #[error("the token's audience is not accepted")]
    Audience,
    /// A required claim is missing or of the wrong type.
    #[error("the token has no valid `{0}` claim")]
    Claim(&'static str),
}

/// Claim checks.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Accepted `iss` values.
    pub issuers: Vec<String>,
    /// Accepted `aud` values (a token's `aud` may be a string or a list).
    pub audiences: Vec<String>,
    /// Allowed clock skew in seconds.
    pub leeway_secs: u64,
}

/// The DER inside a PEM block labelled `label`.
pub fn pem_to_der(pem: &str, label: &str) -> Result<Vec<u8>, String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem.find(&begin).ok_or_else(|| format!("no `{begin}` block"))? + begin.len();
    let stop = pem[start..].find(&end).ok_or_else(|| format!("no `{end}`"))? + start;
    let b64: String = pem[start..stop].chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD.decode(b64).map_err(|e| format!("PEM body is not base64: {e}"))
}

/// One DER element: (tag, contents, rest).
fn der(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let bad = || "malformed DER".to_string();
    let (&tag, rest) = input.split_first().ok_or_else(bad)?;
    let (&first, rest) = rest.split_first().ok_or_else(bad)?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err(bad());
        }
        (rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize), &rest[n..])
    };
    if rest.len() < len {
        return Err(bad());
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Splits a SubjectPublicKeyInfo into (algorithm OID, parameters, key bits).
fn spki(der_bytes: &[u8]) -> Result<(&[u8], &[u8], &[u8]), String> {
    let (tag, body, _) = der(der_bytes)?;
    let (alg_tag, alg, rest) = der(body)?;
    let (bits_tag, bits, _) = der(rest)?;
    if tag != 0x30 || alg_tag != 0x30 || bits_tag != 0x03 || bits.first() != Some(&0) {
        return Err("not a SubjectPublicKeyInfo (`BEGIN PUBLIC KEY`)".into());
    }
    let (oid_tag, oid, params) = der(alg)?;
    if oid_tag != 0x06 {
        return Err("not a SubjectPublicKeyInfo".into());
    }
    Ok((oid, params, &bits[1..]))
}

impl VerifyingKey {
    /// An HS256 key.
    pub fn hs256(kid: Option<String>, secret: &[u8]) -> VerifyingKey {
        VerifyingKey {
            kid,
            alg: JwtAlgorithm::HS256,
            material: Material::Hmac(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)),
        }
    }

    /// An RS256 or ES256 key from a `BEGIN PUBLIC KEY` PEM of the right kind.
    pub fn public(kid: Option<String>, alg: JwtAlgorithm, pem: &str) -> Result<VerifyingKey, String> {
        let der_bytes = pem_to_der(pem, "PUBLIC KEY")?;
        let (oid, params, key) = spki(&der_bytes)?;
        let material = match alg {
            JwtAlgorithm::RS256 if oid == OID_RSA => Material::Rsa(key.to_vec()),
            JwtAlgorithm::ES256 if oid == OID_EC => {
                let (tag, curve, _) = der(params)?;
                if tag != 0x06 || curve != OID_P256 || key.len() != 65 || key[0] != 4 {
                    return Err("ES256 needs an uncompressed P-256 public key".into());
                }
                Material::Ec(key.to_vec())
            }
            JwtAlgorithm::HS256 => return Err("HS256 takes a secret, not a public key".into()),
            _ => return Err(format!("the public key is not of the kind {alg:?} needs")),
        };
        Ok(VerifyingKey { kid, alg, material })
    }

    fn verifies(&self, input: &[u8], sig: &[u8]) -> bool {
        match &self.material {
            Material::Hmac(k) => ring::hmac::verify(k, input, sig).is_ok(),
            Material::Rsa(k) => {
                UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, k).verify(input, sig).is_ok()
            }
            Material::Ec(k) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, k).verify(input, sig).is_ok()
            }
        }
    }
}

fn part(p: &str, what: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD.decode(p).map_err(|_| JwtError::Malformed(format!("the {what} is not base64url")))
}

fn object(bytes: &[u8], what: &str) -> Result<Map<String, Value>, JwtError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Malformed(format!("the {what} is not a JSON object"))),
    }
}

/// Verifies `token` with `keys` and `rules` at `now` (unix seconds); returns its claims.
pub fn verify(token: &str, keys: &[VerifyingKey], rules: &Rules, now: u64) -> Result<Map<String, Value>, JwtError> {
    let parts: Vec<&str> = token.split('.').collect();
    let [h, c, s] = parts[..] else {
        return Err(JwtError::Malformed("a token has three parts".into()));
    };
    let header = object(&part(h, "header")?, "header")?;
    let alg_name = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let alg = JwtAlgorithm::parse(alg_name).ok_or_else(|| JwtError::Algorithm(alg_name.to_string()))?;
    if header.contains_key("crit") {
        return Err(JwtError::Malformed("`crit` extensions are not supported".into()));
    }
    let kid = header.get("kid").and_then(Value::as_str);
    let candidates: Vec<&VerifyingKey> =
        keys.iter().filter(|k| k.alg == alg && (kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)).collect();
    if candidates.is_empty() {
        return Err(JwtError::NoKey(alg));
    }
    let sig = part(s, "signature")?;
    let input = &token.as_bytes()[..h.len() + 1 + c.len()];
    if sig.is_empty() || !candidates.iter().any(|k| k.verifies(input, &sig)) {
        return Err(JwtError::Signature);
    }
    let claims = object(&part(c, "payload")?, "payload")?;
    let time = |name: &'static str| -> Result<Option<u64>, JwtError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().filter(|t| *t >= 0.0).map(|t| Some(t as u64)).ok_or(JwtError::Claim(name)),
        }
    };
    let exp = time("exp")?.ok_or(JwtError::Claim("exp"))?;
    if now >= exp.saturating_add(rules.leeway_secs) {
        return Err(JwtError::Expired);
    }
    if let Some(nbf) = time("nbf")? {
        if now.saturating_add(rules.leeway_secs) < nbf {
            return Err(JwtError::NotYetValid);
        }
    }
    let iss = claims.get("iss").and_then(Value::as_str).ok_or(JwtError::Claim("iss"))?;
    if !rules.issuers.iter().any(|i| i == iss) {
        return Err(JwtError::Issuer);
    }
    let accepted = |a: &Value| a.as_str().is_some_and(|a| rules.audiences.iter().any(|x| x == a));
    match claims.get("aud") {
        Some(Value::String(_)) | Some(Value::Array(_)) => {}
        _ => return Err(JwtError::Claim("aud")),
    }
    let ok = match &claims["aud"] {
        Value::Array(list) => list.iter().any(accepted),
        one => accepted(one),
    };
    if !ok {
        return Err(JwtError::Audience);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(v: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    fn hs(claims: &Value, secret: &[u8], header: &Value) -> String {
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sig = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret), input.as_bytes());
        format!("{input}.{}", b64(sig.as_ref()))
    }

    fn rules() -> Rules {
        Rules { issuers: vec!["iss".into()], audiences: vec!["aud".into()], leeway_secs: 10 }
    }

    #[test]
    fn hs256_claims_at_their_boundaries() {
        let keys = [VerifyingKey::hs256(None, b"k".repeat(32).as_slice())];
        let header = json!({"alg": "HS256", "typ": "JWT"});
        let secret = b"k".repeat(32);
        let tok = |c: Value| hs(&c, &secret, &header);
        let base = json!({"iss": "iss", "aud": ["x", "aud"], "exp": 1000, "nbf": 500});
        assert!(verify(&tok(base.clone()), &keys, &rules(), 1009).is_ok());
        assert_eq!(verify(&tok(base.clone()), &keys, &rules(), 1010), Err(JwtError::Expired));
        assert!(verify(&tok(base.clone()), &keys, &rules(), 490).is_ok());
        assert_eq!(verify(&tok(base.clone()), &keys, &rules(), 489), Err(JwtError::NotYetValid));
        let mut c = base.clone();
        c["aud"] = json!("other");
        assert_eq!(verify(&tok(c), &keys, &rules(), 600), Err(JwtError::Audience));
        let mut c = base.clone();
        c["iss"] = json!("evil");
        assert_eq!(verify(&tok(c), &keys, &rules(), 600), Err(JwtError::Issuer));
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(verify(&tok(c), &keys, &rules(), 600), Err(JwtError::Claim("exp")));
        assert_eq!(
            verify(&hs(&base, b"wrong secret of thirty-two bytes!!", &header), &keys, &rules(), 600),
            Err(JwtError::Signature)
        );
        let none = format!("{}.{}.", b64(br#"{"alg":"none"}"#), b64(base.to_string().as_bytes()));
        assert_eq!(verify(&none, &keys, &rules(), 600), Err(JwtError::Algorithm("none".into())));
        assert!(matches!(verify("a.b", &keys, &rules(), 600), Err(JwtError::Malformed(_))));
        let crit = hs(&base, &secret, &json!({"alg": "HS256", "crit": ["b64"]}));
        assert!(matches!(verify(&crit, &keys, &rules(), 600), Err(JwtError::Malformed(_))));
    }

    #[test]
    fn public_keys_must_match_their_algorithm() {
        let rsa = include_str!("../../tests/fixtures/jwt/rsa-public.pem");
        let ec = include_str!("../../tests/fixtures/jwt/ec-public.pem");
        assert!(VerifyingKey::public(None, JwtAlgorithm::RS256, rsa).is_ok());
        assert!(VerifyingKey::public(None, JwtAlgorithm::ES256, ec).is_ok());
        assert!(VerifyingKey::public(None, JwtAlgorithm::ES256, rsa).is_err());
        assert!(VerifyingKey::public(None, JwtAlgorithm::RS256, ec).is_err());
        assert!(VerifyingKey::public(None, JwtAlgorithm::RS256, "not a pem").is_err());
        // HS256 made with the RSA public key as its secret finds no HS256 key
        let keys = [VerifyingKey::public(None, JwtAlgorithm::RS256, rsa).unwrap()];
        let claims = json!({"iss": "iss", "aud": "aud", "exp": 2000});
        let confused = hs(&claims, rsa.as_bytes(), &json!({"alg": "HS256"}));
        assert_eq!(verify(&confused, &keys, &rules(), 600), Err(JwtError::NoKey(JwtAlgorithm::HS256)));
    }
}
