//! Shared helpers of the integration tests: real nats-server, real
//! retro-fleet processes, real HTTP.

#![allow(dead_code)]

pub mod chaos;
pub mod usage;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use retro_fleet_schemas::{codec, headers, subjects, InferRequest, InferResult, Input, Priority};
pub use retro_fleet_testkit::{free_port, NatsServer};

/// A config file for test processes: fast redelivery, short sweeps.
pub fn write_config(dir: &Path, nats_url: &str, extra: &str) -> PathBuf {
    let path = dir.join("retro-fleet.toml");
    let text = format!(
        r#"data_dir = "{data}"
[nats]
url = "{nats_url}"
[log]
format = "json"
level = "info"
[topology]
ack_wait_secs = 2
max_deliver = 3
[worker]
unrouted_sweep_ms = 300
lane_scan_ms = 100
idle_wait_ms = 200
drain_timeout_ms = 5000
{extra}
"#,
        data = dir.join("data").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `[[ingress.auth.api_keys]]` entries, one per `(id, key, tenant, roles)`,
/// each key stored as its SHA-256 as operators configure it.
pub fn api_keys(keys: &[(&str, &str, &str, &[&str])]) -> String {
    keys.iter()
        .map(|(id, key, tenant, roles)| {
            let roles: Vec<String> = roles.iter().map(|r| format!("{r:?}")).collect();
            format!(
                "[[ingress.auth.api_keys]]\nid = {id:?}\nsha256 = {:?}\ntenant = {tenant:?}\nroles = [{}]\n",
                retro_fleet::ingress::auth::hash_key(key),
                roles.join(", ")
            )
        })
        .collect()
}

/// Authentication on with exactly these API keys (see [`api_keys`]).
pub fn auth_with_keys(keys: &[(&str, &str, &str, &[&str])]) -> String {
    format!("[ingress.auth]\nenabled = true\n{}", api_keys(keys))
}

/// A nats-server, a temp dir and a config in it (with `extra` appended),
/// with the topology applied.
pub struct Setup {
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

/// Starts a [`Setup`].
pub fn setup(extra: &str) -> Setup {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &nats.url(), extra);
    topology_apply(&config);
    Setup { nats, dir, config }
}

/// POSTs `body` as JSON and returns the status and JSON answer.
pub async fn post_json(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new().post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// POSTs `body` as JSON to `url` and returns the answer's text (an SSE stream read whole).
pub async fn post_text(url: &str, body: &serde_json::Value) -> String {
    reqwest::Client::new().post(url).json(body).send().await.unwrap().text().await.unwrap()
}

/// A retro-fleet child process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `retro-fleet --config CONFIG ARGS...`, logging to a file beside the config.
    pub fn start(config: &Path, args: &[&str], env: &[(&str, String)]) -> Proc {
        let name = args.join("-").replace(['/', ' ', '='], "_");
        let log = config.with_file_name(format!("{name}-{}.log", free_port()));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_retro-fleet"));
        cmd.arg("--config").arg(config).args(args).stdout(out.try_clone().unwrap()).stderr(out).stdin(Stdio::null());
        cmd.env_remove("NATS_URL");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn retro-fleet");
        Proc { child, name, log }
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), 15);
        wait_exit(&mut self.child, Duration::from_secs(20))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().unwrap();
    assert!(status.success());
}

/// Sends a signal by number.
pub fn signal(p: &Proc, sig: i32) {
    unsafe_kill(p.child.id(), sig);
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < timeout, "process did not exit within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `GET url` answers 200.
pub async fn wait_ready(url: &str, proc: &mut Proc) {
    let client = reqwest::Client::new();
    let start = Instant::now();
    loop {
        if let Ok(r) = client.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(proc.alive(), "{} exited early:\n{}", proc.name, proc.log());
        assert!(start.elapsed() < Duration::from_secs(60), "{url} not ready:\n{}", proc.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts a worker and waits until it serves its health endpoint.
pub async fn start_worker(config: &Path, extra_args: &[&str]) -> Proc {
    let port = free_port();
    let mut args = vec!["worker"];
    args.extend_from_slice(extra_args);
    let mut p = Proc::start(config, &args, &[("FLEET_METRICS_LISTEN", format!("127.0.0.1:{port}"))]);
    wait_ready(&format!("http://127.0.0.1:{port}/health/ready"), &mut p).await;
    // the worker binds its consumers right after the metrics server starts
    wait_log(&mut p, "worker pulling").await;
    p
}

/// A worker and its metrics/health port.
pub async fn worker(config: &Path) -> (Proc, u16) {
    let port = free_port();
    let mut p = Proc::start(config, &["worker"], &[("FLEET_METRICS_LISTEN", format!("127.0.0.1:{port}"))]);
    wait_ready(&format!("http://127.0.0.1:{port}/health/ready"), &mut p).await;
    wait_log(&mut p, "worker pulling").await;
    (p, port)
}

/// `GET url`: its status and body (0 when unreachable).
pub async fn get_text(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// The sum of the metric lines starting with `prefix` (0 when absent).
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Starts an ingress; returns it and its base URL.
pub async fn start_ingress(config: &Path) -> (Proc, String) {
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut p = Proc::start(config, &["ingress", "--listen", &format!("127.0.0.1:{port}")], &[]);
    wait_ready(&format!("{base}/health/ready"), &mut p).await;
    (p, base)
}

/// Waits until the process log contains `needle`.
pub async fn wait_log(p: &mut Proc, needle: &str) {
    let start = Instant::now();
    while !p.log().contains(needle) {
        assert!(p.alive(), "{} exited:\n{}", p.name, p.log());
        assert!(start.elapsed() < Duration::from_secs(60), "no `{needle}` in log:\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Runs `retro-fleet --config CONFIG ARGS...` with `env` to completion.
pub fn cli(config: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_retro-fleet"));
    cmd.arg("--config").arg(config).args(args).env_remove("NATS_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Runs `retro-fleet topology apply` and returns its output.
pub fn topology_apply(config: &Path) -> String {
    let out = cli(config, &["topology", "apply"], &[]);
    assert!(out.status.success(), "topology apply failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A completion request.
pub fn request(id: &str, model: &str, prompt: &str) -> InferRequest {
    InferRequest {
        v: 1,
        id: id.into(),
        model: model.into(),
        adapter: None,
        input: Input::Completion { prompt: prompt.into() },
        params: Default::default(),
        stream: false,
        cache: Default::default(),
        tenant: None,
        metadata: Default::default(),
    }
}

/// A client that publishes requests and collects replies on one inbox.
pub struct Caller {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub inbox: String,
    sub: async_nats::Subscriber,
    seen: HashMap<String, usize>,
    backlog: std::collections::VecDeque<(String, InferResult)>,
    dups: usize,
}

impl Caller {
    /// Connects to `url`, or to any of several comma-separated URLs.
    pub async fn connect(url: &str) -> Caller {
        let servers: Vec<async_nats::ServerAddr> = url.split(',').map(|u| u.parse().unwrap()).collect();
        let client = async_nats::connect(servers).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let inbox = client.new_inbox();
        let sub = client.subscribe(format!("{inbox}.*")).await.unwrap();
        Caller { client, js, inbox, sub, seen: HashMap::new(), backlog: Default::default(), dups: 0 }
    }

    /// Publishes raw bytes with the given headers (plus a reply subject for `id`).
    pub async fn publish_raw(&self, subject: &str, id: &str, mut h: HeaderMap, payload: Bytes) {
        h.insert(headers::REPLY, format!("{}.{id}", self.inbox).as_str());
        self.js.publish_with_headers(subject.to_string(), h, payload).await.unwrap().await.unwrap();
    }

    /// Queues `n` requests for `model` at `p`, with ids `{prefix}{i}`.
    pub async fn publish_many(&self, p: Priority, prefix: &str, n: usize, model: &str) {
        for i in 0..n {
            self.publish(p, &request(&format!("{prefix}{i}"), model, "x")).await;
        }
    }

    /// Publishes a request at `p` with reply and msg id.
    pub async fn publish(&self, p: Priority, req: &InferRequest) {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, req.id.as_str());
        self.publish_raw(&subjects::request(p, &req.model), &req.id, h, Bytes::from(codec::encode(req))).await;
    }

    /// Collects `n` new final results (by reply-subject id), failing after
    /// `timeout`. Returns them in arrival order, and how many duplicate
    /// replies arrived since the last call (for any id).
    pub async fn collect(&mut self, n: usize, timeout: Duration) -> (Vec<(String, InferResult)>, usize) {
        let mut order = Vec::new();
        while order.len() < n {
            match self.backlog.pop_front() {
                Some(r) => order.push(r),
                None => break,
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while order.len() < n {
            match tokio::time::timeout_at(deadline, self.sub.next()).await {
                Ok(Some(msg)) => {
                    if let Some(r) = self.note(msg) {
                        order.push(r);
                    }
                }
                _ => break,
            }
        }
        // linger briefly to catch duplicates; new results wait for the next call
        let linger = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some(msg)) = tokio::time::timeout_at(linger, self.sub.next()).await {
            if let Some(r) = self.note(msg) {
                self.backlog.push_back(r);
            }
        }
        (order, std::mem::take(&mut self.dups))
    }

    /// Records a reply; returns it if it is the first result for its id.
    fn note(&mut self, msg: async_nats::Message) -> Option<(String, InferResult)> {
        let kind = msg.headers.as_ref().and_then(|h| h.get(headers::KIND)).map(|v| v.as_str().to_string());
        if kind.as_deref() != Some(headers::KIND_RESULT) {
            return None;
        }
        let key = msg.subject.rsplit('.').next().unwrap().to_string();
        let result: InferResult = codec::decode(None, &msg.payload).unwrap();
        let count = self.seen.entry(key.clone()).or_default();
        *count += 1;
        if *count == 1 {
            Some((key, result))
        } else {
            self.dups += 1;
            None
        }
    }
}

/// Reads the stored result of `id` from `FLEET_RESULTS`.
pub async fn stored_result(js: &async_nats::jetstream::Context, tenant: &str, id: &str) -> Option<InferResult> {
    retro_fleet_schemas::stored::stored_result(js, tenant, id).await.unwrap()
}

/// Messages in a stream.
pub async fn stream_len(js: &async_nats::jetstream::Context, name: &str) -> u64 {
    js.get_stream(name).await.unwrap().info().await.unwrap().state.messages
}

/// An HTTP client of one ingress.
pub struct Http {
    pub client: reqwest::Client,
    pub base: String,
}

impl Http {
    /// A client of the ingress at `base`.
    pub fn new(base: &str) -> Http {
        Http { client: reqwest::Client::new(), base: base.to_string() }
    }

    /// Sends `method path` with an optional bearer credential and JSON body.
    pub async fn send(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> reqwest::Response {
        let url = format!("{}{path}", self.base);
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        let mut r = self.client.request(method, url);
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send().await.unwrap()
    }

    /// [`Http::send`], then the status and the JSON answer.
    pub async fn json(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let r = self.send(method, path, bearer, body).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or_default())
    }
}

/// Runs the Python `script` with `arg` as its `sys.argv[1]`; the test fails,
/// showing its stderr and `hint`, unless it exits 0 and prints `done`.
pub fn python(script: &str, arg: &str, done: &str, hint: &str) {
    let out = Command::new("python3").arg("-c").arg(script).arg(arg).output().expect("python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{hint}:\n{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(done));
}
