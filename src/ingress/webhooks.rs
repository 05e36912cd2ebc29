//! Completion webhooks: a batch created with a `callback_url` has its end
//! (`batch.completed`, `batch.failed`, `batch.expired`,
//! `batch.cancelled`) POSTed there, and a request sent with one its result
//! (`request.completed`, `request.failed`, queued by the worker that
//! settles it), signed as Standard Webhooks sign
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
//! HMAC-SHA256>` over `id.timestamp.body` with the configured secret).
//!
//! - A `callback_url` must name one of `ingress.webhooks.allowed_hosts`
//!   ([`check_url`], at submission and again at delivery), so a caller
//!   cannot make the ingress reach internal addresses; without allowed
//!   hosts webhooks are off and a `callback_url` is refused.
//! - Events wait in the work queue `FLEET_WEBHOOKS`
//!   ([`retro_fleet_schemas::webhook`]); every
//!   ingress delivers from it ([`start`]), each event on its own, so a
//!   receiver that hangs or answers 500 delays no other. A failed attempt
//!   is retried with doubling delays (from `first_retry_ms` to
//!   `max_retry_ms`) up to `max_attempts`, surviving the ingress's death.
//! - Every attempt is logged to `FLEET_WEBHOOK_LOG` (kept 7 days):
//!   `GET /v1/admin/webhooks`.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Context};
use base64::Engine as _;
use futures::StreamExt;
pub use retro_fleet_schemas::webhook::{enqueue, Event};
use retro_fleet_schemas::{subjects, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;

/// `[ingress.webhooks]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Hosts a `callback_url` may name: `host` (any port) or `host:port`.
    /// None: webhooks are off.
    pub allowed_hosts: Vec<String>,
    /// The signing secret, `whsec_` and base64 (Standard Webhooks);
    /// receivers verify with the same.
    pub secret: String,
    /// How long one attempt may take, in ms.
    pub timeout_ms: u64,
    /// Attempts before an event is given up.
    pub max_attempts: u32,
    /// Delay before the second attempt, in ms; it doubles each time.
    pub first_retry_ms: u64,
    /// Longest delay between attempts, in ms.
    pub max_retry_ms: u64,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            allowed_hosts: Vec::new(),
            secret: String::new(),
            timeout_ms: 5_000,
            max_attempts: 8,
            first_retry_ms: 1_000,
            max_retry_ms: 300_000,
        }
    }
}

impl WebhookConfig {
    /// Whether webhooks are on.
    pub fn enabled(&self) -> bool {
        !self.allowed_hosts.is_empty()
    }

    /// With the secret redacted.
    pub fn redacted(&self) -> WebhookConfig {
        let mut c = self.clone();
        if !c.secret.is_empty() {
            c.secret = "<redacted>".into();
        }
        c
    }

    /// The signing key of `secret` (an error says what is wrong).
    pub fn key(&self) -> anyhow::Result<ring::hmac::Key> {
        let b64 = self.secret.strip_prefix("whsec_").unwrap_or(&self.secret);
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| anyhow::anyhow!("ingress.webhooks.secret is `whsec_` and base64"))?;
        anyhow::ensure!(raw.len() >= 16, "ingress.webhooks.secret holds at least 16 bytes");
        Ok(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw))
    }

    /// The delay before attempt `next` (2 or later).
    fn backoff(&self, next: u32) -> Duration {
        let ms = self.first_retry_ms.saturating_mul(1u64 << (next.saturating_sub(2)).min(30));
        Duration::from_millis(ms.min(self.max_retry_ms).max(1))
    }
}

/// Whether `url` may be called back: `http` or `https`, no credentials,
/// and a host (with its port) among the allowed ones.
pub fn check_url(cfg: &WebhookConfig, url: &str) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::InvalidRequest, m).param("callback_url");
    if !cfg.enabled() {
        return Err(bad("webhooks are off here (no `ingress.webhooks.allowed_hosts`)".into()));
    }
    let u = reqwest::Url::parse(url).map_err(|e| bad(format!("`callback_url` is not a URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") || !u.username().is_empty() || u.password().is_some() {
        return Err(bad("`callback_url` is an http(s) URL without credentials".into()));
    }
    let host = u.host_str().unwrap_or("").to_ascii_lowercase();
    let port = u.port_or_known_default().unwrap_or(0);
    let allowed = cfg.allowed_hosts.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        match a.rsplit_once(':').filter(|(_, p)| p.parse::<u16>().is_ok()) {
            Some((h, p)) => h == host && p.parse() == Ok(port),
            None => a == host,
        }
    });
    if !allowed {
        return Err(bad(format!(
            "`{host}:{port}` is not among the hosts webhooks may call (ingress.webhooks.allowed_hosts)"
        )));
    }
    Ok(())
}

/// The Standard Webhooks headers of `body`, sent at `timestamp` (unix s).
pub fn signature(key: &ring::hmac::Key, id: &str, timestamp: u64, body: &str) -> String {
    let tag = ring::hmac::sign(key, format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag.as_ref()))
}

/// One line of the delivery log.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(rename = "WebhookAttempt")]
pub struct Attempt {
    /// The event's id.
    pub event: String,
    /// Its kind.
    pub kind: String,
    /// Where it went.
    pub url: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The receiver's status, when it answered.
    pub status: Option<u16>,
    /// What went wrong.
    pub error: Option<String>,
    /// `delivered`, `retrying` or `given_up`.
    pub outcome: String,
    /// Unix ms.
    pub at_ms: u64,
}

/// Delivers queued events until the process ends.
pub fn start(js: Context, cfg: WebhookConfig, events: PullConsumer) -> anyhow::Result<()> {
    let key = Arc::new(cfg.key()?);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(cfg.timeout_ms.max(1)))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let cfg = Arc::new(cfg);
    let slots = Arc::new(tokio::sync::Semaphore::new(64));
    tokio::spawn(async move {
        loop {
            let batch = events.batch().max_messages(32).expires(Duration::from_secs(5)).messages().await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "taking webhook events failed; trying again");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            while let Some(Ok(msg)) = batch.next().await {
                let Ok(slot) = slots.clone().acquire_owned().await else { return };
                let (js, cfg, key, http) = (js.clone(), cfg.clone(), key.clone(), http.clone());
                tokio::spawn(async move {
                    deliver(&js, &cfg, &key, &http, msg).await;
                    drop(slot);
                });
            }
        }
    });
    Ok(())
}

/// One attempt at one event, logged; then ack, retry later, or give up.
async fn deliver(
    js: &Context,
    cfg: &WebhookConfig,
    key: &ring::hmac::Key,
    http: &reqwest::Client,
    msg: async_nats::jetstream::Message,
) {
    let attempt = msg.info().map(|i| i.delivered as u32).unwrap_or(1);
    let Ok(event) = serde_json::from_slice::<Event>(&msg.payload) else {
        tracing::warn!(subject = %msg.subject, "not a webhook event; dropped");
        let _ = msg.ack_with(AckKind::Term).await;
        return;
    };
    // a URL this ingress does not allow (a NATS publisher's, or one allowed
    // when queued and no longer) is never called; another ingress may allow it
    let (status, error) = match check_url(cfg, &event.url) {
        Err(e) => (None, Some(e.message)),
        Ok(()) => {
            let now = retro_fleet_worker::unix_ms() / 1000;
            let sent = http
                .post(&event.url)
                .header("content-type", "application/json")
                .header("webhook-id", &event.id)
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", signature(key, &event.id, now, &event.body))
                .body(event.body.clone())
                .send()
                .await;
            match sent {
                Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
                Ok(r) => (Some(r.status().as_u16()), Some(format!("answered {}", r.status()))),
                Err(e) => (None, Some(if e.is_timeout() { "timed out".into() } else { e.to_string() })),
            }
        }
    };
    let outcome = match (&error, attempt >= cfg.max_attempts.max(1)) {
        (None, _) => "delivered",
        (Some(_), false) => "retrying",
        (Some(_), true) => "given_up",
    };
    let line = Attempt {
        event: event.id.clone(),
        kind: event.kind.clone(),
        url: event.url.clone(),
        attempt,
        status,
        error,
        outcome: outcome.into(),
        at_ms: retro_fleet_worker::unix_ms(),
    };
    let logged = serde_json::to_vec(&line).expect("serialises");
    if let Err(e) = js.publish(subjects::webhook_log(&event.tenant), logged.into()).await {
        tracing::warn!(error = %e, "logging a webhook attempt failed");
    }
    let settled = match outcome {
        "delivered" => msg.ack().await,
        "retrying" => msg.ack_with(AckKind::Nak(Some(cfg.backoff(attempt + 1)))).await,
        _ => {
            tracing::warn!(event = %event.id, url = %event.url, attempts = attempt, "webhook given up");
            msg.ack_with(AckKind::Term).await
        }
    };
    if let Err(e) = settled {
        tracing::warn!(event = %event.id, error = %e, "settling a webhook attempt failed");
    }
}

/// The last `limit` attempts of every tenant's webhooks, oldest first.
pub async fn log(js: &Context, limit: usize) -> anyhow::Result<Vec<Value>> {
    use async_nats::jetstream::consumer::{pull, DeliverPolicy};
    let mut stream = js.get_stream(subjects::WEBHOOK_LOG_STREAM).await?;
    let last = stream.info().await?.state.last_sequence;
    let first = last.saturating_sub(limit as u64).max(1);
    if last == 0 {
        return Ok(Vec::new());
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: first },
            ..Default::default()
        })
        .await?;
    let pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::new();
    for _ in 0..pending {
        let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await else { break };
        if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
            out.push(v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on(hosts: &[&str]) -> WebhookConfig {
        WebhookConfig { allowed_hosts: hosts.iter().map(|h| h.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn only_allowed_hosts_and_ports_may_be_called_back() {
        let c = on(&["hooks.example.com", "127.0.0.1:9000"]);
        assert!(check_url(&c, "https://hooks.example.com/batch").is_ok());
        assert!(check_url(&c, "http://HOOKS.example.com:8443/x").is_ok());
        assert!(check_url(&c, "http://127.0.0.1:9000/x").is_ok());
        for bad in [
            "http://127.0.0.1:9001/x",
            "http://127.0.0.1/x",
            "http://169.254.169.254/latest/meta-data",
            "https://hooks.example.com.evil.net/",
            "https://user:pw@hooks.example.com/",
            "file:///etc/passwd",
            "not a url",
        ] {
            let e = check_url(&c, bad).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("callback_url"), "{bad}");
        }
        assert!(check_url(&on(&[]), "https://hooks.example.com/").unwrap_err().message.contains("off"));
    }

    #[test]
    fn retries_back_off_by_doubling_up_to_the_cap() {
        let c = WebhookConfig { first_retry_ms: 100, max_retry_ms: 1_000, ..Default::default() };
        let ms: Vec<u128> = (2..8).map(|n| c.backoff(n).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn the_signature_is_standard_webhooks_v1() {
        // the Standard Webhooks specification's example
        let c = WebhookConfig { secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(), ..Default::default() };
        let body = r#"{"test": 2432232314}"#;
        let sig = signature(&c.key().unwrap(), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
