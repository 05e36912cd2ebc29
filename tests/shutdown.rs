//! Shutdown is bounded even when NATS is gone: real nats-server, real
//! retro-fleet processes; the server is stopped before the signal. Each
//! role exits within its configured drain bound plus one second, says what
//! it abandoned in its exit code and log, and a second signal exits at once.
//! Small bounds keep these fast.

mod common;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::Priority;

/// The worker's drain bound in these tests.
const WORKER_DRAIN_MS: u64 = 1_500;
/// The ingress's drain bound in these tests.
const INGRESS_DRAIN_MS: u64 = 1_000;
/// A model whose requests outlast every bound here.
const SLOW_MODEL: &str = "max_inflight = 2\n[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 20000\n";

fn bounds() -> Vec<(&'static str, String)> {
    vec![
        ("FLEET_WORKER__DRAIN_TIMEOUT_MS", WORKER_DRAIN_MS.to_string()),
        ("FLEET_INGRESS__DRAIN_TIMEOUT_MS", INGRESS_DRAIN_MS.to_string()),
        ("FLEET_METRICS_LISTEN", format!("127.0.0.1:{}", free_port())),
    ]
}

/// Sends `sig` and waits for the exit; fails past `limit`. Returns the
/// status and how long the exit took.
fn signal_and_time(p: &mut Proc, sig: i32, limit: Duration) -> (ExitStatus, Duration) {
    let start = Instant::now();
    signal(p, sig);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return (status, start.elapsed());
        }
        let waited = start.elapsed();
        assert!(waited < limit, "{} still running {waited:?} after signal {sig}:\n{}", p.name, p.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn worker_with_bounds(config: &std::path::Path) -> Proc {
    let env = bounds();
    let port = env[2].1.clone();
    let mut p = Proc::start(config, &["worker"], &env);
    wait_ready(&format!("http://{port}/health/ready"), &mut p).await;
    wait_log(&mut p, "worker pulling").await;
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_with_work_in_flight_exits_within_its_drain_bound_when_nats_is_gone() {
    let mut s = setup(SLOW_MODEL);
    let caller = Caller::connect(&s.nats.url()).await;
    let mut worker = worker_with_bounds(&s.config).await;
    caller.publish_many(Priority::Normal, "stuck", 2, "slow").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.nats.stop();
    wait_log(&mut worker, "disconnected from NATS").await;
    let bound = Duration::from_millis(WORKER_DRAIN_MS) + Duration::from_secs(1);
    let (status, took) = signal_and_time(&mut worker, 15, bound);
    println!(
        "worker, 2 requests in flight, NATS stopped: exited {status} in {took:?} (drain bound {WORKER_DRAIN_MS} ms)"
    );
    assert!(took >= Duration::from_millis(WORKER_DRAIN_MS), "it gave in-flight work its drain time");
    assert_eq!(status.code(), Some(75), "abandoned work is a non-zero exit:\n{}", worker.log());
    assert!(worker.log().contains("JetStream will redeliver 2 message(s)"), "{}", worker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_exits_zero_at_once_when_nats_is_gone() {
    let mut s = setup("");
    let mut worker = worker_with_bounds(&s.config).await;
    s.nats.stop();
    wait_log(&mut worker, "disconnected from NATS").await;
    let (status, took) = signal_and_time(&mut worker, 15, Duration::from_secs(1));
    println!("idle worker, NATS stopped: exited {status} in {took:?}");
    assert!(status.success(), "nothing abandoned, exit 0:\n{}", worker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let s = setup(SLOW_MODEL);
    let caller = Caller::connect(&s.nats.url()).await;
    // a long drain that the second signal cuts short (NATS still up)
    let mut env = bounds();
    env[0].1 = "60000".into();
    let port = env[2].1.clone();
    let mut worker = Proc::start(&s.config, &["worker"], &env);
    wait_ready(&format!("http://{port}/health/ready"), &mut worker).await;
    wait_log(&mut worker, "worker pulling").await;
    caller.publish_many(Priority::Normal, "long", 2, "slow").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&worker, 15);
    wait_log(&mut worker, "draining in-flight work").await;
    let (status, took) = signal_and_time(&mut worker, 15, Duration::from_secs(1));
    println!("second SIGTERM during a 60 s drain: exited {status} in {took:?}");
    assert_eq!(status.code(), Some(143));

    // the ingress, with a call waiting through a long drain: a second Ctrl-C
    let mut env = bounds();
    env[1].1 = "60000".into();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut ingress = Proc::start(&s.config, &["ingress", "--listen", &format!("127.0.0.1:{port}")], &env);
    wait_ready(&format!("{base}/health/ready"), &mut ingress).await;
    let _call = tokio::spawn(
        reqwest::Client::new()
            .post(format!("{base}/v1/infer"))
            .json(&serde_json::json!({"model": "slow", "prompt": "x"}))
            .send(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&ingress, 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(ingress.alive(), "the first Ctrl-C drains: the call may still finish");
    let (status, took) = signal_and_time(&mut ingress, 2, Duration::from_secs(1));
    println!("second Ctrl-C (SIGINT) during the ingress's 60 s drain: exited {status} in {took:?}");
    assert_eq!(status.code(), Some(130), "{}", ingress.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_answers_waiting_calls_503_and_exits_within_its_bound_when_nats_is_gone() {
    let mut s = setup(SLOW_MODEL);
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut ingress = Proc::start(&s.config, &["ingress", "--listen", &format!("127.0.0.1:{port}")], &bounds());
    wait_ready(&format!("{base}/health/ready"), &mut ingress).await;
    // no worker serves `slow`: the call waits for its reply
    let call = tokio::spawn({
        let url = format!("{base}/v1/infer");
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .header("X-Request-Id", "waiting-call")
                .json(&serde_json::json!({"model": "slow", "prompt": "x"}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").is_some();
            (status, retry_after, r.json::<serde_json::Value>().await.unwrap_or_default(), Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.nats.stop();
    wait_log(&mut ingress, "disconnected from NATS").await;
    let signalled = Instant::now();
    let bound = Duration::from_millis(INGRESS_DRAIN_MS) + Duration::from_secs(1);
    let (status, took) = signal_and_time(&mut ingress, 15, bound);
    let (code, retry_after, body, answered) = call.await.unwrap();
    let answered_in = answered - signalled;
    println!(
        "ingress, 1 call waiting, NATS stopped: call answered {code} in {answered_in:?}, exited {status} in {took:?}"
    );
    assert_eq!(code, 503, "{body}");
    assert!(retry_after, "a 503 says when to retry");
    assert_eq!(body["request_id"], "waiting-call", "the caller can retry with its id: {body}");
    assert!(answered_in < bound);
    assert_eq!(status.code(), Some(75), "a call was cut short:\n{}", ingress.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaler_exits_at_once_when_nats_is_gone() {
    let mut s = setup("");
    let env = bounds();
    let port = env[2].1.clone();
    let mut scaler = Proc::start(&s.config, &["scaler"], &env);
    wait_ready(&format!("http://{port}/health/live"), &mut scaler).await;
    wait_log(&mut scaler, "scaler sampling").await;
    s.nats.stop();
    wait_log(&mut scaler, "disconnected from NATS").await;
    let (status, took) = signal_and_time(&mut scaler, 15, Duration::from_secs(1));
    println!("scaler, NATS stopped: exited {status} in {took:?}");
    assert!(status.success(), "{status}:\n{}", scaler.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_exits_within_its_bound_when_nats_is_gone() {
    let mut s = setup("");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut up = Proc::start(&s.config, &["up", "--listen", &format!("127.0.0.1:{port}")], &bounds());
    wait_ready(&format!("{base}/health/ready"), &mut up).await;
    wait_log(&mut up, "worker pulling").await;
    s.nats.stop();
    wait_log(&mut up, "disconnected from NATS").await;
    let bound = Duration::from_millis(WORKER_DRAIN_MS.max(INGRESS_DRAIN_MS)) + Duration::from_secs(1);
    let (status, took) = signal_and_time(&mut up, 15, bound);
    println!("up, idle, NATS stopped: exited {status} in {took:?}");
    assert!(status.success(), "nothing in flight, exit 0:\n{}", up.log());
}
