//! Chaos on a real 3-node NATS cluster with every stream and bucket at 3
//! replicas: steady traffic through HTTP and NATS at once (3,000 requests,
//! two workers), while a node dies or the cluster restarts node by node.
//! Each test prints what callers saw (sent, answered, lost, duplicated,
//! errors, the longest stall) and requires nothing lost, nothing answered
//! twice differently, and no error to a caller within its deadline.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use common::*;
use futures::StreamExt;
use retro_fleet_schemas::{codec, headers, subjects, InferResult, Priority};
use retro_fleet_testkit::NatsCluster;

/// Requests per test, half over HTTP and half over NATS.
const REQUESTS: usize = 3_000;
/// Requests per second, both ways together.
const RATE: u64 = 100;

/// What the callers saw during one run.
#[derive(Debug, Default)]
struct Tally {
    sent: usize,
    answered: usize,
    /// Sent and never answered: no reply, no HTTP answer, nothing stored.
    lost: usize,
    /// Answered twice with different results.
    duplicated: usize,
    /// Error answers (HTTP status other than 200, or an error result).
    errors: Vec<String>,
    /// NATS replies repeated with the same stored result (a redelivered
    /// request's worker sends the stored answer again; callers keep the first).
    repeated: usize,
    /// NATS replies lost in transit whose result was stored (core NATS
    /// replies are at most once; the stored result is the durable answer).
    from_store: usize,
    /// Longest time without any answer while requests were being sent.
    stall: Duration,
    /// Slowest answer.
    slowest: Duration,
    /// 99th percentile of the time to an answer.
    p99: Duration,
}

/// A fleet on a 3-node cluster: two workers and an ingress given every URL.
struct Fleet {
    cluster: NatsCluster,
    _dir: tempfile::TempDir,
    _workers: Vec<Proc>,
    _ingress: Proc,
    base: String,
}

async fn fleet() -> Fleet {
    let cluster = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    // every HTTP caller here shares one address: during a stall of several
    // seconds at 50 calls a second, more than the default 512 connections
    // per peer (a guard against one hostile address) are open at once
    let config = write_config(dir.path(), &cluster.urls(), "[ingress.connections]\nmax_per_peer = 4096\n");
    let text = std::fs::read_to_string(&config).unwrap().replace("[topology]\n", "[topology]\nreplicas = 3\n");
    std::fs::write(&config, text).unwrap();
    topology_apply(&config);
    let workers = vec![start_worker(&config, &[]).await, start_worker(&config, &[]).await];
    let (ingress, base) = start_ingress(&config).await;
    Fleet { cluster, _dir: dir, _workers: workers, _ingress: ingress, base }
}

/// When each answer arrived, by id.
type Answers = Arc<Mutex<HashMap<String, (Instant, InferResult)>>>;

/// Sends [`REQUESTS`] at [`RATE`] (alternating HTTP and NATS) while `fault`
/// runs on the cluster (from a thread of its own), then waits for every
/// answer and counts.
async fn run(mut f: Fleet, fault: impl FnOnce(&mut NatsCluster) + Send + 'static) -> Tally {
    let urls = f.cluster.urls();
    let servers: Vec<async_nats::ServerAddr> = urls.split(',').map(|u| u.parse().unwrap()).collect();
    let client = async_nats::connect(servers).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(format!("{inbox}.*")).await.unwrap();

    let answers: Answers = Default::default();
    let mut tally = Tally::default();
    let repeated = Arc::new(Mutex::new((0usize, 0usize))); // (same result, different result)
    let replies = {
        let (answers, repeated) = (answers.clone(), repeated.clone());
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let kind = m.headers.as_ref().and_then(|h| h.get(headers::KIND)).map(|v| v.as_str().to_string());
                if kind.as_deref() != Some(headers::KIND_RESULT) {
                    continue;
                }
                let id = m.subject.rsplit('.').next().unwrap().to_string();
                let r: InferResult = codec::decode(None, &m.payload).unwrap();
                let mut a = answers.lock().unwrap();
                match a.get(&id) {
                    Some((_, first)) => {
                        let mut rep = repeated.lock().unwrap();
                        let same = |r: &InferResult| (serde_json::to_string(&r.output).unwrap(), r.error.is_none());
                        if same(first) == same(&r) {
                            rep.0 += 1;
                        } else {
                            rep.1 += 1;
                        }
                    }
                    None => {
                        a.insert(id, (Instant::now(), r));
                    }
                }
            }
        })
    };

    let cluster = f.cluster;
    let fault = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        std::thread::sleep(Duration::from_secs(5));
        fault(&mut cluster);
        cluster
    });

    let started = Instant::now();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let mut calls = Vec::new();
    let mut sent_at = HashMap::new();
    let mut ticker = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    for k in 0..REQUESTS {
        ticker.tick().await;
        let id = format!("c{k}");
        sent_at.insert(id.clone(), Instant::now());
        if k % 2 == 0 {
            let (http, url) = (http.clone(), format!("{}/v1/infer", f.base));
            calls.push(tokio::spawn(async move {
                let r = http
                    .post(url)
                    .header("x-request-id", &id)
                    .json(&serde_json::json!({"model": "echo", "prompt": id}))
                    .send()
                    .await;
                let at = Instant::now();
                match r {
                    Ok(r) if r.status() == 200 => {
                        // the echo model answers with the prompt: the id
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        let outcome = if v["output"]["text"] == id.as_str() {
                            Ok(())
                        } else {
                            Err(format!("answered with another request's output: {v}"))
                        };
                        (id, at, outcome)
                    }
                    Ok(r) => {
                        let s = r.status();
                        (id, at, Err(format!("HTTP {s}: {}", r.text().await.unwrap_or_default())))
                    }
                    Err(e) => (id, at, Err(format!("HTTP: {e}"))),
                }
            }));
        } else {
            // a NATS caller sends an unconfirmed publish again, with the
            // same Nats-Msg-Id, as docs/WIRE.md says to
            let req = request(&id, "echo", &id);
            let mut h = HeaderMap::new();
            h.insert(headers::MSG_ID, id.as_str());
            h.insert(headers::REPLY, format!("{inbox}.{id}").as_str());
            let (js, payload) = (js.clone(), Bytes::from(codec::encode(&req)));
            let subject = subjects::request(Priority::Normal, "echo");
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(30);
                loop {
                    let ack = match js.publish_with_headers(subject.clone(), h.clone(), payload.clone()).await {
                        Ok(f) => f.await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    };
                    match ack {
                        Ok(()) => return,
                        Err(e) if Instant::now() > until => panic!("{id}: publish never confirmed: {e}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                    }
                }
            });
        }
    }
    tally.sent = REQUESTS;
    let sending = started.elapsed();
    let cluster = fault.await.unwrap();

    let mut arrivals: Vec<Instant> = Vec::new();
    let mut latencies: Vec<Duration> = Vec::new();
    for c in calls {
        let (id, at, outcome) = c.await.unwrap();
        latencies.push(at - sent_at[&id]);
        arrivals.push(at);
        match outcome {
            Ok(()) => tally.answered += 1,
            Err(e) => tally.errors.push(format!("{id}: {e}")),
        }
    }
    // NATS callers: the reply, or else the stored result
    let deadline = Instant::now() + Duration::from_secs(60);
    let nats_ids: Vec<String> = (0..REQUESTS).filter(|k| k % 2 == 1).map(|k| format!("c{k}")).collect();
    while answers.lock().unwrap().len() < nats_ids.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // late repeats
    replies.abort();
    let answers = std::mem::take(&mut *answers.lock().unwrap());
    for id in &nats_ids {
        let result = match answers.get(id) {
            Some((at, r)) => {
                latencies.push(*at - sent_at[id]);
                arrivals.push(*at);
                Some(r.clone())
            }
            None => {
                let stored = retro_fleet_schemas::stored::stored_result(&js, "default", id).await.ok().flatten();
                tally.from_store += stored.is_some() as usize;
                stored
            }
        };
        match result {
            None => tally.lost += 1,
            Some(r) => match (r.error, r.output) {
                (None, Some(o)) if o.text == *id => tally.answered += 1,
                (Some(e), _) => tally.errors.push(format!("{id}: {} {}", e.code, e.message)),
                (None, o) => tally.errors.push(format!("{id}: answered with {o:?}")),
            },
        }
    }
    (tally.repeated, tally.duplicated) = *repeated.lock().unwrap();
    latencies.sort();
    tally.slowest = latencies.last().copied().unwrap_or_default();
    tally.p99 = latencies.get(latencies.len() * 99 / 100).copied().unwrap_or_default();
    arrivals.sort();
    let window_end = started + sending;
    tally.stall = arrivals
        .windows(2)
        .filter(|w| w[0] < window_end)
        .map(|w| w[1] - w[0])
        .chain(arrivals.first().map(|a| *a - started))
        .max()
        .unwrap_or_default();
    cluster.wait_meta_leader(Duration::from_secs(30));
    f.cluster = cluster;
    tally
}

/// Prints the tally and requires nothing lost, nothing duplicated and no
/// error returned.
fn check(what: &str, t: &Tally) {
    println!(
        "{what}: sent {} / answered {} / lost {} / duplicated {} / errors {} / longest stall {:.2?} / p99 {:.2?} / slowest {:.2?} \
         ({} repeated NATS replies of the same result, {} NATS replies lost in transit and read from the store)",
        t.sent,
        t.answered,
        t.lost,
        t.duplicated,
        t.errors.len(),
        t.stall,
        t.p99,
        t.slowest,
        t.repeated,
        t.from_store
    );
    assert_eq!(t.lost, 0, "{what}: {t:?}");
    assert_eq!(t.duplicated, 0, "{what}: {t:?}");
    assert!(t.errors.is_empty(), "{what}: errors returned: {:?}", &t.errors[..t.errors.len().min(10)]);
    assert_eq!(t.answered, t.sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_of_the_request_streams_leader_loses_nothing() {
    let f = fleet().await;
    let t = run(f, |c| {
        kill_for_5s(c, c.stream_leader("FLEET_REQ_NORMAL").expect("a leader"));
    })
    .await;
    check("kill -9 of the FLEET_REQ_NORMAL leader, back after 5 s", &t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_of_the_results_streams_leader_loses_nothing() {
    let f = fleet().await;
    let t = run(f, |c| {
        kill_for_5s(c, c.stream_leader("FLEET_RESULTS").expect("a leader"));
    })
    .await;
    check("kill -9 of the FLEET_RESULTS leader, back after 5 s", &t);
}

/// kill -9 of node `i`, started again (same store) 5 s later.
fn kill_for_5s(c: &mut NatsCluster, i: usize) {
    c.node(i).kill();
    std::thread::sleep(Duration::from_secs(5));
    c.node(i).start_again();
}

/// Whether node `i` leads no replicated stream or consumer, nor the meta
/// group, as the monitoring endpoint reports them. An ephemeral consumer
/// (a KV watcher's) has no raft group and no leader to move: it lives on
/// the server that made it, and its client makes it again elsewhere when
/// that server dies, so it does not count.
fn leads_nothing(c: &NatsCluster, i: usize) -> bool {
    let Some(j) = c.jsz() else { return false };
    let me = serde_json::json!(format!("n{i}"));
    let leads =
        |asset: &serde_json::Value| asset["cluster"]["leader"] == me && asset["cluster"].get("raft_group").is_some();
    let streams =
        j["account_details"].as_array().into_iter().flatten().flat_map(|a| a["stream_detail"].as_array()).flatten();
    j["meta_cluster"]["leader"] != me
        && streams.clone().all(|s| !leads(s))
        && streams.flat_map(|s| s["consumer_detail"].as_array()).flatten().all(|c| !leads(c))
}

/// Moves the leadership of every stream and consumer off node `i` (not
/// the meta leader), so it leads nothing; waits until it does.
async fn empty_node(cluster: &NatsCluster, i: usize) {
    let client = async_nats::connect(cluster.urls().split(',').next().unwrap()).await.unwrap();
    let other = format!("{{\"placement\":{{\"preferred\":\"n{}\"}}}}", (i + 1) % 3);
    let start = Instant::now();
    while !leads_nothing(cluster, i) {
        assert!(start.elapsed() < Duration::from_secs(30), "n{i} still leads something: {:?}", cluster.jsz());
        let jsz = cluster.jsz().unwrap();
        let me = serde_json::json!(format!("n{i}"));
        for s in jsz["account_details"].as_array().into_iter().flatten().flat_map(|a| a["stream_detail"].as_array()) {
            for s in s {
                let name = s["name"].as_str().unwrap();
                if s["cluster"]["leader"] == me {
                    let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{name}");
                    let _ = client.request(subject, other.clone().into()).await;
                }
                for c in s["consumer_detail"].as_array().into_iter().flatten() {
                    if c["cluster"]["leader"] == me {
                        let subject =
                            format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{name}.{}", c["name"].as_str().unwrap());
                        let _ = client.request(subject, other.clone().into()).await;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_of_a_node_that_leads_nothing_loses_nothing() {
    let f = fleet().await;
    let idle = (f.cluster.wait_meta_leader(Duration::from_secs(30)) + 1) % 3;
    empty_node(&f.cluster, idle).await;
    let t = run(f, move |c| {
        // a leadership may have moved back since: moved off again, just before
        tokio::runtime::Handle::current().block_on(empty_node(c, idle));
        kill_for_5s(c, idle);
    })
    .await;
    check("kill -9 of a node leading nothing, back after 5 s", &t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_loses_nothing() {
    let f = fleet().await;
    let t = run(f, |c| {
        for i in 0..c.len() {
            c.node(i).stop(); // SIGTERM, as a rolling update does
            std::thread::sleep(Duration::from_secs(1));
            c.node(i).start_again();
            c.wait_meta_leader(Duration::from_secs(30));
            std::thread::sleep(Duration::from_secs(6)); // catching up before the next
        }
    })
    .await;
    check("rolling restart of all three nodes (SIGTERM, one at a time)", &t);
}
