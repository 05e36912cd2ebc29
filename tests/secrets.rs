//! No secret in any output: real nats-servers that require a user and
//! password or a token; every role and a CLI tool run with wrong
//! credentials (in the URL given by the config file, `NATS_URL` and
//! `--nats-url`) fail with an authorization refusal that names no secret,
//! and with right ones they work while their logs, `/metrics`, HTTP replies
//! and `config` output show none of the NATS password, the API keys, the
//! JWT or its HS256 secret, nor the API key sent to the trace collector.

mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use common::*;

const USER: &str = "fleet-user";
const PASS: &str = "Right-NATS-pass-9";
const WRONG_PASS: &str = "Wrong-NATS-pass-7";
const TOKEN: &str = "Right-NATS-token-5";
const WRONG_TOKEN: &str = "Wrong-NATS-token-3";
const API_KEY: &str = "api-key-right-4c1d";
const WRONG_API_KEY: &str = "api-key-wrong-77aa";
const HS_SECRET: &str = "an HS256 secret of at least thirty-two bytes";
const OTLP_KEY: &str = "otlp-collector-key-5e2b";

/// Every secret of these tests: none may appear in any output.
const SECRETS: &[&str] = &[PASS, WRONG_PASS, TOKEN, WRONG_TOKEN, API_KEY, WRONG_API_KEY, HS_SECRET, OTLP_KEY];

fn assert_no_secret(what: &str, text: &str, extra: &[&str]) {
    for s in SECRETS.iter().chain(extra) {
        assert!(!text.contains(s), "{what} shows the secret `{s}`:\n{text}");
    }
}

fn output(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Runs each role and `topology apply` against `url` (wrong credentials):
/// each fails, saying `refusal`, and shows no secret.
fn every_command_is_refused(dir: &Path, url: &str, refusal: &str) {
    let config = write_config(dir, url, "");
    let port = free_port().to_string();
    let runs: [(&[&str], &[(&str, &str)]); 6] = [
        (&["topology", "apply"], &[]),
        (&["topology", "apply"], &[("NATS_URL", url)]),
        (&["--nats-url", url, "worker"], &[]),
        (&["ingress", "--listen"], &[]),
        (&["scaler"], &[("FLEET_METRICS_LISTEN", "127.0.0.1:0")]),
        (&["up", "--listen"], &[]),
    ];
    for (args, env) in runs {
        let listen = format!("127.0.0.1:{port}");
        let mut args: Vec<&str> = args.to_vec();
        if args.last() == Some(&"--listen") {
            args.push(&listen);
        }
        let out = cli(&config, &args, env);
        let text = output(&out);
        assert!(!out.status.success(), "{args:?} succeeded with wrong credentials:\n{text}");
        assert!(text.contains(refusal), "{args:?} does not say `{refusal}`:\n{text}");
        assert!(!text.contains("no NATS server answers"), "{args:?} blames a missing server:\n{text}");
        assert_no_secret(&format!("{args:?}"), &text, &[]);
    }
}

#[test]
fn wrong_user_credentials_are_named_as_a_refusal_without_the_password() {
    let nats = NatsServer::start_with(&["--user", USER, "--pass", PASS]);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://{USER}:{WRONG_PASS}@127.0.0.1:{}", nats.port());
    let refusal = format!("NATS refused the credentials for user {USER} at 127.0.0.1:{}", nats.port());
    every_command_is_refused(dir.path(), &url, &refusal);
    // no credentials at all: told what the server wants
    let config = write_config(dir.path(), &nats.url(), "");
    let text = output(&cli(&config, &["topology", "apply"], &[]));
    assert!(text.contains("requires credentials"), "{text}");
}

#[test]
fn wrong_token_is_named_as_a_refusal_without_the_token() {
    let nats = NatsServer::start_with(&["--auth", TOKEN]);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://{WRONG_TOKEN}@127.0.0.1:{}", nats.port());
    let refusal = format!("NATS refused the token at 127.0.0.1:{}", nats.port());
    every_command_is_refused(dir.path(), &url, &refusal);
    // the right token in the URL works, and in the config (or its environment)
    let config = write_config(dir.path(), &format!("nats://{TOKEN}@127.0.0.1:{}", nats.port()), "");
    let out = cli(&config, &["topology", "apply"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    assert_no_secret("topology apply", &output(&out), &[]);
    let config = write_config(dir.path(), &nats.url(), "");
    let out = cli(&config, &["topology", "apply"], &[("FLEET_NATS__TOKEN", TOKEN)]);
    assert!(out.status.success(), "{}", output(&out));
    let out = cli(&config, &["topology", "apply"], &[("FLEET_NATS__TOKEN", WRONG_TOKEN)]);
    assert!(output(&out).contains(&refusal), "{}", output(&out));
    assert_no_secret("topology apply", &output(&out), &[]);
}

#[test]
fn a_user_and_password_from_the_config_log_in_and_stay_hidden() {
    let nats = NatsServer::start_with(&["--user", USER, "--pass", PASS]);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &nats.url(), "");
    let text = std::fs::read_to_string(&config).unwrap();
    let with_user = text.replacen("[nats]\n", &format!("[nats]\nuser = {USER:?}\npassword = {PASS:?}\n"), 1);
    std::fs::write(&config, with_user).unwrap();
    let out = cli(&config, &["topology", "apply"], &[]);
    assert!(out.status.success(), "{}", output(&out));
    let shown = output(&cli(&config, &["config"], &[]));
    assert!(shown.contains(USER), "the user is not a secret: {shown}");
    assert_no_secret("config", &shown, &[]);
    // the password from the environment wins over the file's
    let out = cli(&config, &["topology", "apply"], &[("FLEET_NATS__PASSWORD", WRONG_PASS)]);
    let refusal = format!("NATS refused the credentials for user {USER} at 127.0.0.1:{}", nats.port());
    assert!(output(&out).contains(&refusal), "{}", output(&out));
    assert_no_secret("topology apply", &output(&out), &[]);
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// An HS256 JWT for tenant `acme` signed with [`HS_SECRET`].
fn jwt() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({"sub": "user-1", "tenant": "acme", "roles": ["submit", "read"],
        "iss": "https://issuer.test", "aud": "retro-fleet", "exp": now + 300});
    let input = format!("{}.{}", b64(br#"{"alg":"HS256","typ":"JWT"}"#), b64(claims.to_string().as_bytes()));
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, HS_SECRET.as_bytes());
    format!("{input}.{}", b64(ring::hmac::sign(&key, input.as_bytes()).as_ref()))
}

fn auth_config() -> String {
    format!(
        "[ingress.auth]\nenabled = true\njwt_issuers = [\"https://issuer.test\"]\njwt_audiences = [\"retro-fleet\"]\n\
         {}[[ingress.auth.jwt_keys]]\nalgorithm = \"HS256\"\nsecret = \"{HS_SECRET}\"\n\
         [telemetry.otlp]\nendpoint = \"http://127.0.0.1:9\"\nheaders = {{ \"x-api-key\" = \"{OTLP_KEY}\" }}\n",
        api_keys(&[("app", API_KEY, "acme", &["submit", "read", "admin"])])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn right_credentials_in_the_url_work_and_no_output_shows_a_secret() {
    let nats = NatsServer::start_with(&["--user", USER, "--pass", PASS]);
    let dir = tempfile::tempdir().unwrap();
    let url = format!("nats://{USER}:{PASS}@127.0.0.1:{}", nats.port());
    let config = write_config(dir.path(), &url, &auth_config());
    let applied = cli(&config, &["topology", "apply"], &[]);
    assert!(applied.status.success(), "credentials in the URL are used:\n{}", output(&applied));
    let shown = output(&cli(&config, &["config"], &[]));
    assert!(shown.contains("<redacted>@127.0.0.1"), "{shown}");
    assert!(shown.contains(r#"x-api-key = "<redacted>""#), "the collector's key is shown redacted: {shown}");

    let mut worker = start_worker(&config, &[]).await;
    let (mut ingress, base) = start_ingress(&config).await;
    let http = Http::new(&base);
    let token = jwt();
    let (ok, body) =
        http.json("POST", "/v1/infer", Some(API_KEY), Some(serde_json::json!({"model": "echo", "prompt": "hi"}))).await;
    assert_eq!(ok, 200, "{body}");
    let (ok, body) =
        http.json("POST", "/v1/infer", Some(&token), Some(serde_json::json!({"model": "echo", "prompt": "hi"}))).await;
    assert_eq!(ok, 200, "{body}");
    let mut replies = String::new();
    for (path, bearer) in [
        ("/v1/infer", Some(WRONG_API_KEY)),
        ("/v1/infer", Some("eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl")),
        ("/v1/admin/config", Some(API_KEY)),
        ("/v1/admin/workers", Some(API_KEY)),
        ("/metrics", None),
    ] {
        let r = http.send(if path == "/v1/infer" { "POST" } else { "GET" }, path, bearer, None).await;
        replies.push_str(&format!("{path}: {}\n{}\n", r.status(), r.text().await.unwrap()));
    }
    assert!(replies.contains("401"), "the wrong credentials were refused:\n{replies}");
    assert_no_secret("HTTP replies", &replies, &[&token]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    worker.terminate();
    ingress.terminate();
    assert_no_secret("the worker's log", &worker.log(), &[&token]);
    assert_no_secret("the ingress's log", &ingress.log(), &[&token]);
    assert_no_secret("config", &shown, &[]);
}
