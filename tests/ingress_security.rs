//! Ingress security through real processes: API keys and JWTs (401), roles
//! (403), tenants from the credential and isolated from each other (404),
//! rate limits (429) in one ingress and shared by two, and input limits
//! (413, 422 with a field path).

mod common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::*;
use futures::StreamExt;
use retro_fleet::ingress::auth::hash_key;
use retro_fleet::ingress::jwt::{pem_to_der, JwtAlgorithm as Algorithm};
use serde_json::{json, Value};

const HS_SECRET: &str = "a shared secret of at least thirty-two bytes";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "retro-fleet";

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/jwt/{name}", retro_fleet_testkit::package_dir().display())
}

fn auth_config() -> String {
    format!(
        r#"
[ingress]
max_body_bytes = 4096
max_prompt_bytes = 1000
[ingress.auth]
enabled = true
kv_keys = true
jwt_issuers = ["{ISSUER}"]
jwt_audiences = ["{AUDIENCE}"]
jwt_leeway_secs = 5
{keys}[[ingress.auth.jwt_keys]]
algorithm = "HS256"
secret = "{HS_SECRET}"
[[ingress.auth.jwt_keys]]
kid = "rsa"
algorithm = "RS256"
public_key_file = "{rsa}"
[[ingress.auth.jwt_keys]]
kid = "ec"
algorithm = "ES256"
public_key_file = "{ec}"
"#,
        keys = api_keys(&[
            ("acme-app", "acme-key-1", "acme", &["submit", "read"]),
            ("acme-reader", "acme-reader-key", "acme", &["read"]),
            ("globex-app", "globex-key-1", "globex", &["submit", "read"]),
            ("ops", "ops-key-1", "ops", &["admin"]),
        ]),
        rsa = fixture("rsa-public.pem"),
        ec = fixture("ec-public.pem"),
    )
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Valid claims for tenant `t` with `roles`.
fn claims(t: &str, roles: &[&str]) -> Value {
    json!({"sub": "user-1", "tenant": t, "roles": roles, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 300, "nbf": now() - 10})
}

/// A compact JWS of `claims` with `header`, signed by `alg` with the test keys
/// (or, for HS256, with `secret`).
fn sign_with(header: &Value, claims: &Value, alg: Algorithm, secret: &[u8]) -> String {
    let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let rng = ring::rand::SystemRandom::new();
    let private = |name: &str| pem_to_der(&std::fs::read_to_string(fixture(name)).unwrap(), "PRIVATE KEY").unwrap();
    let sig: Vec<u8> = match alg {
        Algorithm::HS256 => {
            ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret), input.as_bytes()).as_ref().to_vec()
        }
        Algorithm::RS256 => {
            let key = ring::signature::RsaKeyPair::from_pkcs8(&private("rsa-private.pem")).unwrap();
            let mut sig = vec![0; key.public().modulus_len()];
            key.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, input.as_bytes(), &mut sig).unwrap();
            sig
        }
        Algorithm::ES256 => {
            let key = ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &private("ec-private.pem"),
                &rng,
            )
            .unwrap();
            key.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec()
        }
    };
    format!("{input}.{}", b64(&sig))
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value) -> String {
    let mut header = json!({"alg": format!("{alg:?}"), "typ": "JWT"});
    if let Some(k) = kid {
        header["kid"] = json!(k);
    }
    sign_with(&header, claims, alg, HS_SECRET.as_bytes())
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

trait Infer {
    async fn infer(&self, bearer: Option<&str>) -> (u16, Value);
}

impl Infer for Http {
    async fn infer(&self, bearer: Option<&str>) -> (u16, Value) {
        let r = self.send("POST", "/v1/infer", bearer, Some(json!({"model": "echo", "prompt": "hi"}))).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_roles_and_tenants() {
    let s = setup(&auth_config());
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http { client: reqwest::Client::new(), base };

    // no credential, unknown key: 401 with a stable code and WWW-Authenticate
    let r = http.send("POST", "/v1/infer", None, Some(json!({"model": "echo", "prompt": "hi"}))).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthenticated");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(http.infer(Some("acme-key-2")).await.0, 401);
    assert_eq!(http.send("GET", "/v1/models", None, None).await.status(), 401);
    // health and metrics stay open
    assert_eq!(http.send("GET", "/health/live", None, None).await.status(), 200);
    assert_eq!(http.send("GET", "/metrics", None, None).await.status(), 200);

    // wrong role: 403
    let (status, body) = http.infer(Some("acme-reader-key")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    assert_eq!(http.send("GET", "/v1/models", Some("acme-reader-key"), None).await.status(), 200);

    // a good key; the X-Request-Id becomes the request id and is echoed
    let r = http
        .client
        .post(format!("{}/v1/infer", http.base))
        .bearer_auth("acme-key-1")
        .header("X-Request-Id", "req-from-caller-1")
        .json(&json!({"model": "echo", "prompt": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "req-from-caller-1");
    let body: Value = r.json().await.unwrap();
    assert_eq!((body["id"].as_str(), body["output"]["text"].as_str()), (Some("req-from-caller-1"), Some("hello")));
    // X-API-Key works too; every response has an X-Request-Id
    let r = http.client.get(format!("{}/v1/models", http.base)).header("X-API-Key", "acme-key-1").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));

    // the tenant is the credential's: a Fleet-Tenant header is ignored, a body field refused
    let r = http
        .client
        .post(format!("{}/v1/infer/async", http.base))
        .bearer_auth("acme-key-1")
        .header("Fleet-Tenant", "globex")
        .json(&json!({"model": "echo", "prompt": "mine"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let (status, body) = {
        let r = http
            .send(
                "POST",
                "/v1/infer",
                Some("acme-key-1"),
                Some(json!({"model": "echo", "prompt": "x", "tenant": "globex"})),
            )
            .await;
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["param"], "tenant");

    // acme reads its result; globex gets 404 for the same id, like an unknown id
    let caller = Caller::connect(&s.nats.url()).await;
    let mut stored = None;
    for _ in 0..100 {
        stored = stored_result(&caller.js, "acme", &id).await;
        if stored.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(stored.expect("stored under the key's tenant").output.unwrap().text, "mine");
    assert!(stored_result(&caller.js, "globex", &id).await.is_none(), "not under the header's tenant");
    let r = http.send("GET", &format!("/v1/results/{id}"), Some("acme-key-1"), None).await;
    assert_eq!(r.status(), 200);
    let other = http.send("GET", &format!("/v1/results/{id}"), Some("globex-app-key"), None).await;
    assert_eq!(other.status(), 401, "an unknown key");
    let other = http.send("GET", &format!("/v1/results/{id}"), Some("globex-key-1"), None).await;
    assert_eq!(other.status(), 404);
    let other: Value = other.json().await.unwrap();
    let unknown: Value =
        http.send("GET", "/v1/results/no-such-id", Some("globex-key-1"), None).await.json().await.unwrap();
    assert_eq!(other["error"]["code"], unknown["error"]["code"]);

    // JWTs: each algorithm with its key; the tenant and roles come from the claims
    for (alg, kid) in [(Algorithm::HS256, None), (Algorithm::RS256, Some("rsa")), (Algorithm::ES256, Some("ec"))] {
        let token = sign(alg, kid, &claims("globex", &["submit", "read"]));
        let (status, body) = http.infer(Some(&token)).await;
        assert_eq!(status, 200, "{alg:?}: {body}");
        let r = http.send("GET", &format!("/v1/results/{}", body["id"].as_str().unwrap()), Some(&token), None).await;
        assert_eq!(r.status(), 200, "{alg:?} reads its own result");
        assert_eq!(http.send("GET", &format!("/v1/results/{id}"), Some(&token), None).await.status(), 404);
    }
    let mut spaced = claims("globex", &[]);
    spaced["roles"] = json!("read submit");
    assert_eq!(http.infer(Some(&sign(Algorithm::HS256, None, &spaced))).await.0, 200, "roles as a string");
    let read_only = sign(Algorithm::RS256, Some("rsa"), &claims("globex", &["read"]));
    assert_eq!(http.infer(Some(&read_only)).await.0, 403);

    // every way a token can be wrong is 401
    let mut bad: Vec<(&str, String)> = Vec::new();
    let with = |patch: Value| {
        let mut c = claims("acme", &["submit"]);
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    bad.push(("expired", sign(Algorithm::HS256, None, &with(json!({"exp": now() - 120})))));
    bad.push(("not yet valid", sign(Algorithm::HS256, None, &with(json!({"nbf": now() + 120})))));
    bad.push(("wrong audience", sign(Algorithm::HS256, None, &with(json!({"aud": "someone-else"})))));
    bad.push(("wrong issuer", sign(Algorithm::HS256, None, &with(json!({"iss": "https://evil.test"})))));
    bad.push(("no exp", sign(Algorithm::HS256, None, &with(json!({"exp": null})))));
    bad.push(("no tenant", sign(Algorithm::HS256, None, &with(json!({"tenant": null})))));
    let payload = b64(with(json!({})).to_string().as_bytes());
    bad.push(("alg none", format!("{}.{payload}.", b64(br#"{"alg":"none","typ":"JWT"}"#))));
    bad.push(("alg none, signature kept", {
        let good = sign(Algorithm::HS256, None, &with(json!({})));
        let sig = good.rsplit('.').next().unwrap().to_string();
        format!("{}.{payload}.{sig}", b64(br#"{"alg":"none","typ":"JWT"}"#))
    }));
    // HS256 made with the RSA public key as the secret (algorithm confusion)
    let rsa_public = std::fs::read(fixture("rsa-public.pem")).unwrap();
    for header in [json!({"alg": "HS256"}), json!({"alg": "HS256", "kid": "rsa"})] {
        bad.push((
            "HS256 signed with the RSA public key",
            sign_with(&header, &with(json!({})), Algorithm::HS256, &rsa_public),
        ));
    }
    // a valid RS256 token with its tenant changed after signing
    let good = sign(Algorithm::RS256, Some("rsa"), &with(json!({})));
    let parts: Vec<&str> = good.split('.').collect();
    let tampered = b64(with(json!({"tenant": "globex"})).to_string().as_bytes());
    bad.push(("tampered payload", format!("{}.{tampered}.{}", parts[0], parts[2])));
    let mut sig = parts[2].to_string();
    let last = if sig.ends_with('A') { "B" } else { "A" };
    sig.replace_range(sig.len() - 1.., last);
    bad.push(("tampered signature", format!("{}.{}.{sig}", parts[0], parts[1])));
    // an ES256 token whose kid names the RSA key
    bad.push(("wrong kid for the algorithm", sign(Algorithm::ES256, Some("rsa"), &with(json!({})))));
    // an RS256 signature presented as ES256
    let rs = sign(Algorithm::RS256, Some("rsa"), &with(json!({})));
    let rs_sig = rs.rsplit('.').next().unwrap();
    let es_header = b64(br#"{"alg":"ES256","kid":"ec"}"#);
    bad.push((
        "RS256 signature under an ES256 header",
        format!("{es_header}.{}.{rs_sig}", b64(with(json!({})).to_string().as_bytes())),
    ));
    for (why, token) in &bad {
        let (status, body) = http.infer(Some(token)).await;
        assert_eq!(status, 401, "{why}: {body}");
        assert_eq!(body["error"]["code"], "unauthenticated", "{why}");
    }
}

fn write_variant(dir: &Path, base: &Path, name: &str, extra: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, std::fs::read_to_string(base).unwrap() + extra).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_token_limits_answer_429_with_headers() {
    let s = setup(
        r#"
[ingress.rate_limit]
enabled = true
algorithm = "fixed_window"
window_secs = 3600
default_max_tokens = 10
[ingress.rate_limit.submit]
requests = 0
tokens = 100
[ingress.rate_limit.read]
requests = 3
"#,
    );
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http { client: reqwest::Client::new(), base };
    for left in [2, 1, 0] {
        let r = http.send("GET", "/v1/models", None, None).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-ratelimit-limit"], "3");
        assert_eq!(r.headers()["x-ratelimit-remaining"], left.to_string().as_str());
    }
    let r = http.send("GET", "/v1/models", None, None).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(body["error"]["retryable"], true);

    // 40 prompt bytes = 10 tokens, + 50 max_tokens: 60 of 100, charged up front
    let req = json!({"model": "echo", "prompt": "x".repeat(40), "params": {"max_tokens": 50}});
    let r = http.send("POST", "/v1/infer", None, Some(req.clone())).await;
    assert_eq!(r.status(), 200);
    let used = r.json::<Value>().await.unwrap()["usage"]["total_tokens"].as_u64().unwrap();
    assert!(used < 60, "echo used {used}");
    // its usage record settles the charge to what it used: 100 - used left,
    // so a request estimated at one more is refused, and one at exactly that passes
    let asking = |tokens: u64| json!({"model": "echo", "prompt": "xxxx", "params": {"max_tokens": tokens - 1}});
    let mut settled = false;
    for _ in 0..50 {
        let r = http.send("POST", "/v1/infer", None, Some(asking(100 - used + 1))).await;
        assert_eq!(r.status(), 429);
        assert!(r.headers().contains_key("retry-after"));
        if r.headers()["x-ratelimit-remaining-tokens"] == (100 - used).to_string().as_str() {
            settled = true;
            break;
        }
        assert_eq!(r.headers()["x-ratelimit-remaining-tokens"], "40", "before it settles");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "the charge of 60 was settled to the {used} tokens used");
    assert_eq!(http.send("POST", "/v1/infer", None, Some(asking(100 - used))).await.status(), 200);
}

/// Fires `n` GETs of `/v1/models`, alternating between `bases`, all at
/// once; returns how many each base accepted.
async fn fire(bases: &[String], n: usize) -> Vec<usize> {
    let client = reqwest::Client::new();
    let statuses: Vec<(usize, u16)> = futures::stream::iter(0..n)
        .map(|i| {
            let (client, which) = (client.clone(), i % bases.len());
            let url = format!("{}/v1/models", bases[which]);
            async move { (which, client.get(url).send().await.unwrap().status().as_u16()) }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let mut accepted = vec![0; bases.len()];
    for (which, status) in statuses {
        assert!(status == 200 || status == 429, "{status}");
        accepted[which] += (status == 200) as usize;
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distributed_limit_holds_across_two_ingresses() {
    // 10 per hour with a burst of 20: over a few seconds, exactly the burst passes
    let limits = |backend: &str| {
        format!(
            "\n[ingress.rate_limit]\nenabled = true\nbackend = \"{backend}\"\nkey_by = \"tenant\"\nwindow_secs = 3600\n\
             [ingress.rate_limit.read]\nrequests = 10\nburst = 20\n"
        )
    };
    let s = setup("");
    let shared = write_variant(s.dir.path(), &s.config, "shared.toml", &limits("nats"));
    let local = write_variant(s.dir.path(), &s.config, "local.toml", &limits("local"));
    let (_a, a) = start_ingress(&shared).await;
    let (_b, b) = start_ingress(&shared).await;
    let accepted = fire(&[a.clone(), b.clone()], 200).await;
    let total: usize = accepted.iter().sum();
    assert!(total <= 10 + 20, "limit + burst");
    assert_eq!(total, 20, "exactly the burst (the refill over seconds is a fraction of a request): {accepted:?}");
    // which replica won the race varies; that they share one counter does not
    let by_credential = |backend| limits(backend).replace("key_by = \"tenant\"", "key_by = \"credential\"");
    let shared2 = write_variant(s.dir.path(), &s.config, "shared2.toml", &by_credential("nats"));
    let (_e, e) = start_ingress(&shared2).await;
    let (_f, f) = start_ingress(&shared2).await;
    assert_eq!(fire(&[e], 12).await, [12]);
    assert_eq!(fire(&[f], 20).await, [8], "the other replica grants what is left of the burst");

    // a busy caller is served from leases (several units per write); every
    // unit still comes from the shared counter, and little lapses unspent
    let big = |backend: &str| limits(backend).replace("burst = 20", "burst = 1600");
    let fresh = setup(""); // counters of its own
    let leased = write_variant(fresh.dir.path(), &fresh.config, "leased.toml", &big("nats"));
    let (_g, g) = start_ingress(&leased).await;
    let (_h, h) = start_ingress(&leased).await;
    let accepted = fire(&[g, h], 4000).await;
    let total: usize = accepted.iter().sum();
    println!("accepted with leases: {accepted:?}");
    assert!((1400..=1610).contains(&total), "limit + burst, less at most 1/16 of it per replica: {accepted:?}");

    // the same with counters in each process: each replica grants its own burst
    let (_c, c) = start_ingress(&local).await;
    let (_d, d) = start_ingress(&local).await;
    assert_eq!(fire(&[c, d], 200).await, [20, 20]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_invalid_requests_name_the_problem() {
    let s = setup("\n[ingress]\nmax_body_bytes = 4096\nmax_prompt_bytes = 1000\n");
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http { client: reqwest::Client::new(), base };
    let post = |body: Value| http.send("POST", "/v1/infer", None, Some(body));

    let r = post(json!({"model": "echo", "prompt": "x".repeat(5000)})).await;
    assert_eq!(r.status(), 413);
    assert!(r.headers().contains_key("x-request-id"));
    let r = post(json!({"model": "echo", "prompt": "x".repeat(2000)})).await;
    assert_eq!(r.status(), 413);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["param"].as_str()),
        (Some("prompt_too_large"), Some("input"))
    );

    let cases = [
        (json!({"model": "echo", "prompt": "x", "params": {"temperature": "hot"}}), "params.temperature"),
        (json!({"model": "echo", "prompt": "x", "params": {"temperature": 7.0}}), "params.temperature"),
        (json!({"model": "echo", "prompt": "x", "params": {"top_p": 0.0}}), "params.top_p"),
        (json!({"model": "echo", "messages": [{"role": "user"}]}), "messages[0].content"),
        (json!({"prompt": "x"}), "model"),
        (json!({"model": "echo", "prompt": "x", "colour": 1}), "colour"),
        (json!({"model": "no-such-model", "prompt": "x"}), "model"),
        (json!({"model": "echo", "prompt": "x", "id": "a b"}), "id"),
    ];
    for (body, param) in cases {
        let r = post(body.clone()).await;
        let status = r.status().as_u16();
        let answer: Value = r.json().await.unwrap();
        assert!(status == 422 || status == 404, "{body}: {status} {answer}");
        assert_eq!(answer["error"]["param"], param, "{body}: {answer}");
        assert!(answer["error"]["code"].is_string());
    }
    // not JSON at all: 400
    let r = http.client.post(format!("{}/v1/infer", http.base)).body("{nope").send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "decode_error");
    // a bad X-Request-Id is named, not replaced
    let r = http.client.get(format!("{}/v1/models", http.base)).header("X-Request-Id", "a.b").send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "headers.x-request-id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_admin_role_and_redact_secrets() {
    let s = setup(&auth_config());
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http { client: reqwest::Client::new(), base };
    for path in ["/v1/admin/config", "/v1/admin/queues"] {
        assert_eq!(http.send("GET", path, None, None).await.status(), 401, "{path}");
        let r = http.send("GET", path, Some("acme-key-1"), None).await;
        assert_eq!(r.status(), 403, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "forbidden");
    }
    let r = http.send("GET", "/v1/admin/config", Some("ops-key-1"), None).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(!text.contains(HS_SECRET), "the HS256 secret is not shown");
    let config: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(config["ingress"]["auth"]["jwt_keys"][0]["secret"], "<redacted>");
    assert_eq!(config["ingress"]["max_prompt_bytes"], 1000);
    let queues: Value = http.send("GET", "/v1/admin/queues", Some("ops-key-1"), None).await.json().await.unwrap();
    let streams: Vec<&str> =
        queues["queues"].as_array().unwrap().iter().map(|q| q["stream"].as_str().unwrap()).collect();
    assert_eq!(streams, ["FLEET_REQ_HIGH", "FLEET_REQ_NORMAL", "FLEET_REQ_LOW"]);
    assert!(queues["queues"][0]["consumers"].as_array().unwrap().iter().any(|c| c["name"] == "worker_echo"));
    // admin includes the other roles
    assert_eq!(http.send("GET", "/v1/models", Some("ops-key-1"), None).await.status(), 200);
}

fn keys_cmd(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = cli(config, &[&["keys"], args].concat(), &[]);
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

/// Polls `infer` with `key` until it answers `want`.
async fn until_status(http: &Http, key: &str, want: u16) -> Value {
    let start = std::time::Instant::now();
    loop {
        let (status, body) = http.infer(Some(key)).await;
        if status == want {
            return body;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "still {status}, not {want}: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_added_in_kv_work_without_a_restart_and_revoked_ones_stop() {
    let s = setup(&auth_config());
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);

    let (ok, key, err) = keys_cmd(&s.config, &["add", "late-app", "--tenant", "initech", "--roles", "submit,read"]);
    assert!(ok, "{err}");
    let key = key.trim().to_string();
    assert!(key.starts_with("rf_") && key.len() > 40, "{key}");
    let answer = until_status(&http, &key, 200).await;
    // the tenant is the key's: its result is readable with it, not by another tenant
    let id = answer["id"].as_str().unwrap();
    let path = format!("/v1/results/{id}");
    assert_eq!(http.send("GET", &path, Some(&key), None).await.status(), 200);
    assert_eq!(http.send("GET", &path, Some("acme-key-1"), None).await.status(), 404);

    let (ok, listed, _) = keys_cmd(&s.config, &["list"]);
    assert!(ok && listed.contains("late-app") && listed.contains("initech") && listed.contains("submit,read"));
    assert!(!listed.contains(&hash_key(&key)), "hashes are not listed: {listed}");
    let (ok, _, err) = keys_cmd(&s.config, &["add", "late-app", "--tenant", "initech", "--roles", "read"]);
    assert!(!ok && err.contains("taken"), "{err}");
    // a key's own budget, set and removed from the command line: one
    // request a day, already used by the answer above
    let (ok, out, err) = keys_cmd(&s.config, &["budget", "late-app", "--budget-requests", "1", "--budget-per", "day"]);
    assert!(ok && out.contains("1 request per day"), "{out} {err}");
    let refused = until_status(&http, &key, 429).await;
    assert_eq!(refused["error"]["code"], "budget_exceeded", "{refused}");
    let (_, listed, _) = keys_cmd(&s.config, &["list"]);
    assert!(listed.contains("1 request per day"), "{listed}");
    let (ok, out, err) = keys_cmd(&s.config, &["budget", "late-app"]);
    assert!(ok && out.contains("no budget"), "{out} {err}");
    until_status(&http, &key, 200).await;
    let (ok, _, err) = keys_cmd(&s.config, &["budget", "nobody", "--budget-tokens", "5"]);
    assert!(!ok && err.contains("no key `nobody`"), "{err}");
    let (ok, _, err) = keys_cmd(&s.config, &["add", "x", "--tenant", "initech", "--roles", "root"]);
    assert!(!ok && err.contains("unknown role `root`"), "{err}");

    let (ok, _, err) = keys_cmd(&s.config, &["revoke", "late-app"]);
    assert!(ok, "{err}");
    let refused = until_status(&http, &key, 401).await;
    assert_eq!(refused["error"]["code"], "unauthenticated");
    let (ok, _, err) = keys_cmd(&s.config, &["revoke", "late-app"]);
    assert!(!ok && err.contains("no key `late-app`"), "{err}");
    // configured keys are untouched
    assert_eq!(http.infer(Some("acme-key-1")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_request_id_gets_the_first_result_and_ids_are_per_tenant() {
    let s = setup(&auth_config());
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let call = |key: &'static str, prompt: &'static str, stream: bool| {
        let http = &http;
        async move {
            let r = http
                .client
                .post(format!("{}/v1/infer", http.base))
                .bearer_auth(key)
                .header("X-Request-Id", "order-42")
                .json(&json!({"model": "echo", "prompt": prompt, "stream": stream}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, first) = call("acme-key-1", "first", false).await;
    assert_eq!(status, 200, "{first}");
    assert!(first.contains("\"text\":\"first\""), "{first}");
    // the same id again, other text: JetStream keeps the first request, and
    // this caller gets its result (not a hang until the timeout)
    let (status, again) = call("acme-key-1", "second", false).await;
    assert_eq!((status, again.contains("\"text\":\"first\"")), (200, true), "{again}");
    let (status, streamed) = call("acme-key-1", "third", true).await;
    assert_eq!(status, 200);
    assert!(streamed.contains("event: result") && streamed.contains("\"text\":\"first\""), "{streamed}");
    // an OpenAI streaming retry gets the text too, as one delta
    let r = http
        .client
        .post(format!("{}/v1/completions", http.base))
        .bearer_auth("acme-key-1")
        .header("X-Request-Id", "order-42")
        .json(&json!({"model": "echo", "prompt": "fourth", "stream": true}))
        .send()
        .await
        .unwrap();
    let sse = r.text().await.unwrap();
    assert!(sse.contains("\"text\":\"first\"") && sse.contains("[DONE]"), "{sse}");
    // another tenant's "order-42" is its own request
    let (status, other) = call("globex-key-1", "globex text", false).await;
    assert_eq!(status, 200, "{other}");
    assert!(other.contains("\"text\":\"globex text\""), "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_limits_are_per_tenant_roles_split_on_ascii_spaces_and_every_prompt_byte_counts() {
    let limits = "[ingress.rate_limit]\nenabled = true\nalgorithm = \"fixed_window\"\nwindow_secs = 3600\n[ingress.rate_limit.read]\nrequests = 2\n";
    let s = setup(&(auth_config() + limits));
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http { client: reqwest::Client::new(), base };
    let models = |token: String| {
        let http = &http;
        async move { http.send("GET", "/v1/models", Some(&token), None).await.status().as_u16() }
    };
    // the same `sub` in two tenants: two counters
    let acme = sign(Algorithm::HS256, None, &claims("acme", &["read"]));
    let globex = sign(Algorithm::HS256, None, &claims("globex", &["read"]));
    assert_eq!((models(acme.clone()).await, models(acme.clone()).await, models(acme).await), (200, 200, 429));
    assert_eq!(models(globex).await, 200, "another tenant's token is not throttled by acme's use");

    // roles: ASCII spaces only; a name that is not a role is refused
    for roles in ["read\u{3000}admin", "read\u{2028}admin", "read superuser"] {
        let mut c = claims("initech", &[]);
        c["roles"] = json!(roles);
        let token = sign(Algorithm::HS256, None, &c);
        let r = http.send("GET", "/v1/admin/workers", Some(&token), None).await;
        assert_eq!(r.status(), 401, "{roles:?}");
    }
    let mut c = claims("initech", &[]);
    c["roles"] = json!(["read", "admin\u{3000}"]);
    assert_eq!(models(sign(Algorithm::HS256, None, &c)).await, 401, "unknown names in an array too");

    // a chat message's role counts against the prompt limit like its content
    let submit = sign(Algorithm::HS256, None, &claims("umbrella", &["submit"]));
    let body = json!({"model": "echo", "messages": [{"role": "assistant", "content": "x".repeat(992)}]});
    let r = http.send("POST", "/v1/chat/completions", Some(&submit), Some(body)).await;
    assert_eq!(r.status(), 413, "9 bytes of role + 992 of content is over max_prompt_bytes = 1000");

    // a cache lifetime past any clock is cut, not overflowed
    let r = http
        .client
        .post(format!("{}/v1/infer", http.base))
        .bearer_auth(&submit)
        .header("x-cache-ttl", u64::MAX.to_string())
        .json(&json!({"model": "echo", "prompt": "forever"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
}
