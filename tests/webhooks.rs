//! Completion webhooks through real processes: a receiver written with the
//! Standard Webhooks reference library (`standardwebhooks` from PyPI)
//! fails twice, then verifies the signature; it gets the batch's event
//! exactly once, while another receiver that hangs delays nothing; a
//! `callback_url` outside the allowed hosts is refused at submission; the
//! delivery log shows every attempt. An async request with a
//! `callback_url` gets its result the same way, and a NATS publisher's
//! callback to a host the ingress does not allow is never called.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A receiver: `/flaky` answers 500 to the first two attempts of each
/// event, then verifies it and answers 200; `/hang` never answers in time.
/// Every attempt is a line in `out`.
const RECEIVER: &str = r#"
import sys, json, time, threading
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from standardwebhooks import Webhook
port, out, secret = int(sys.argv[1]), sys.argv[2], sys.argv[3]
wh, seen, lock = Webhook(secret), {}, threading.Lock()
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"])).decode()
        hid = self.headers.get("webhook-id")
        with lock:
            n = seen[hid] = seen.get(hid, 0) + 1
        if self.path == "/hang":
            time.sleep(20)
        verified = False
        if self.path == "/flaky" and n > 2:
            try:
                wh.verify(body, {k.lower(): v for k, v in self.headers.items()})
                verified = True
            except Exception:
                pass
        with lock, open(out, "a") as f:
            f.write(json.dumps({"id": hid, "n": n, "path": self.path, "verified": verified,
                                "event": json.loads(body)}) + "\n")
        self.send_response(200 if verified else 500)
        self.end_headers()
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

struct Receiver {
    child: Child,
    out: std::path::PathBuf,
    base: String,
}

impl Receiver {
    fn start(dir: &std::path::Path) -> Receiver {
        let port = free_port();
        let out = dir.join("received.jsonl");
        let child = Command::new("python3")
            .args(["-c", RECEIVER, &port.to_string(), out.to_str().unwrap(), SECRET])
            .stdout(Stdio::null())
            .spawn()
            .expect("python3");
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the receiver did not start (`make test` installs standardwebhooks)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Receiver { child, out, base }
    }

    fn attempts(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fleet (worker and ingress, keys `acme-key` and `admin-key`) whose
/// webhooks may call `receiver`, retrying from 200 ms up to 5 attempts.
async fn fleet_calling(receiver: &Receiver) -> (Setup, Proc, Proc, String) {
    let port = receiver.base.rsplit(':').next().unwrap().to_string();
    let s = setup(&format!(
        "[ingress.webhooks]\nallowed_hosts = [\"127.0.0.1:{port}\"]\nsecret = \"{SECRET}\"\ntimeout_ms = 1000\n\
         first_retry_ms = 200\nmax_attempts = 5\n{}",
        auth_with_keys(&[
            ("producer", "acme-key", "acme", &["submit", "read"]),
            ("ops", "admin-key", "ops", &["admin"])
        ])
    ));
    let worker = start_worker(&s.config, &[]).await;
    let (ingress, base) = start_ingress(&s.config).await;
    (s, worker, ingress, base)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_end_reaches_its_receiver_once_signed_after_two_failures() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path());
    let (_s, _worker, _ingress, base) = fleet_calling(&receiver).await;
    let http = Http::new(&base);
    let lines: String = (0..5)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/completions",
                   "body": {"model": "echo", "prompt": format!("p{i}")}})
            .to_string()
                + "\n"
        })
        .collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part("file", reqwest::multipart::Part::bytes(lines.into_bytes()).file_name("in.jsonl"));
    let r =
        reqwest::Client::new().post(format!("{base}/v1/files")).bearer_auth("acme-key").multipart(form).send().await;
    let file = r.unwrap().json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
    let create = |url: String| {
        json!({"input_file_id": file, "endpoint": "/v1/completions",
                                      "completion_window": "1h", "callback_url": url})
    };

    // a callback outside the allowed hosts is refused before anything runs
    for url in ["http://169.254.169.254/latest/meta-data", "http://127.0.0.1:1/hook", "file:///etc/passwd"] {
        let (status, v) = http.json("POST", "/v1/batches", Some("acme-key"), Some(create(url.into()))).await;
        assert_eq!((status, v["error"]["param"].as_str()), (422, Some("callback_url")), "{url}: {v}");
    }

    // one batch's receiver hangs; the other's fails twice, then verifies
    let (status, hung) =
        http.json("POST", "/v1/batches", Some("acme-key"), Some(create(format!("{}/hang", receiver.base)))).await;
    assert_eq!(status, 200, "{hung}");
    let (status, batch) =
        http.json("POST", "/v1/batches", Some("acme-key"), Some(create(format!("{}/flaky", receiver.base)))).await;
    assert_eq!(status, 200, "{batch}");
    let id = batch["id"].as_str().unwrap();

    let start = Instant::now();
    let delivered = loop {
        let got: Vec<Value> = receiver.attempts().into_iter().filter(|a| a["path"] == "/flaky").collect();
        if got.iter().any(|a| a["verified"] == true) {
            break got;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no verified delivery: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // the hanging receiver (a timeout per attempt) held nothing up
    assert!(start.elapsed() < Duration::from_secs(10), "delivery took {:?}", start.elapsed());
    let event = &delivered.last().unwrap()["event"];
    assert_eq!(event["type"], "batch.completed");
    assert_eq!(event["data"]["id"], id);
    assert_eq!(event["data"]["request_counts"], json!({"total": 5, "completed": 5, "failed": 0}));
    assert_eq!(delivered.iter().map(|a| a["n"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);

    // exactly once: no attempt after the one that succeeded
    tokio::time::sleep(Duration::from_secs(2)).await;
    let flaky: Vec<Value> = receiver.attempts().into_iter().filter(|a| a["path"] == "/flaky").collect();
    assert_eq!(flaky.len(), 3, "{flaky:?}");
    assert_eq!(flaky.iter().filter(|a| a["verified"] == true).count(), 1);
    // the hanging receiver's event is being retried, on its own
    let hung_event = format!("evt_{}_completed", hung["id"].as_str().unwrap());
    let (status, log) = http.json("GET", "/v1/admin/webhooks?limit=50", Some("admin-key"), None).await;
    assert_eq!(status, 200, "{log}");
    let outcomes = |event: &str| -> Vec<String> {
        log["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["event"] == event)
            .map(|a| a["outcome"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(outcomes(&format!("evt_{id}_completed")), ["retrying", "retrying", "delivered"], "{log}");
    let hung_attempts = outcomes(&hung_event);
    assert!(!hung_attempts.is_empty() && hung_attempts.iter().all(|o| o == "retrying"), "{log}");
    let timed_out =
        log["data"].as_array().unwrap().iter().any(|a| a["event"] == hung_event.as_str() && a["error"] == "timed out");
    assert!(timed_out, "{log}");
    // the secret is in no answer
    let (_, config) = http.json("GET", "/v1/admin/config", Some("admin-key"), None).await;
    assert!(!config.to_string().contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_request_result_reaches_its_receiver_once_signed() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(dir.path());
    let (s, _worker, _ingress, base) = fleet_calling(&receiver).await;
    let http = Http::new(&base);
    let body = |url: &str| json!({"model": "echo", "prompt": "call me back", "callback_url": url});
    let flaky = format!("{}/flaky", receiver.base);

    // refused before anything runs: a host not allowed, or a synchronous call
    let (status, v) = http.json("POST", "/v1/infer/async", Some("acme-key"), Some(body("http://10.0.0.1/x"))).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("callback_url")), "{v}");
    let (status, v) = http.json("POST", "/v1/infer", Some("acme-key"), Some(body(&flaky))).await;
    assert_eq!((status, v["error"]["param"].as_str()), (422, Some("callback_url")), "{v}");

    let (status, accepted) = http.json("POST", "/v1/infer/async", Some("acme-key"), Some(body(&flaky))).await;
    assert_eq!(status, 202, "{accepted}");
    let id = accepted["id"].as_str().unwrap();
    let start = Instant::now();
    let delivered = loop {
        let got = receiver.attempts();
        if got.iter().any(|a| a["verified"] == true) {
            break got;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no verified delivery: {got:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let event = &delivered.last().unwrap()["event"];
    assert_eq!(event["type"], "request.completed");
    assert_eq!(event["data"]["id"], id);
    assert_eq!(event["data"]["output"]["text"], "call me back");
    assert_eq!(delivered.iter().map(|a| a["n"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(receiver.attempts().len(), 3, "exactly once after it succeeded");

    // a NATS publisher naming a host the ingress does not allow: never
    // called, each attempt logged with why
    let caller = Caller::connect(&s.nats.url()).await;
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", "nats-cb-1");
    h.insert("Fleet-Callback-Url", "http://169.254.169.254/latest/meta-data");
    let req = request("nats-cb-1", "echo", "from nats");
    let subject = retro_fleet_schemas::subjects::request(retro_fleet_schemas::Priority::Normal, "echo");
    caller.publish_raw(&subject, "nats-cb-1", h, retro_fleet_schemas::codec::encode(&req).into()).await;
    let start = Instant::now();
    loop {
        let (_, log) = http.json("GET", "/v1/admin/webhooks?limit=50", Some("admin-key"), None).await;
        let attempts: Vec<&Value> =
            log["data"].as_array().unwrap().iter().filter(|a| a["event"] == "evt_nats-cb-1").collect();
        if !attempts.is_empty() {
            for a in attempts {
                assert_eq!(a["status"], Value::Null, "never called: {a}");
                assert!(a["error"].as_str().unwrap().contains("allowed"), "{a}");
            }
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never logged: {log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
