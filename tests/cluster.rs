//! The fleet on a real 3-node NATS cluster (loopback, routes, JetStream on
//! each node) with every stream and bucket at 3 replicas: the topology is
//! placed, reported, and refused where it cannot be placed; traffic flows
//! over NATS and HTTP; and a node's death loses nothing.

mod common;

use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::Priority;
use retro_fleet_testkit::NatsCluster;

/// A config for `urls` with `topology.replicas = 3`, applied.
fn r3_config(dir: &std::path::Path, urls: &str) -> std::path::PathBuf {
    let config = write_config(dir, urls, "");
    let text = std::fs::read_to_string(&config).unwrap().replace("[topology]\n", "[topology]\nreplicas = 3\n");
    std::fs::write(&config, text).unwrap();
    config
}

#[test]
fn replicas_beyond_the_deployment_are_refused_with_what_to_do() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = r3_config(dir.path(), &nats.url());
    let out = cli(&config, &["topology", "apply"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("topology.replicas = 3 needs a NATS cluster of at least 3"), "{err}");
    assert!(err.contains("topology.replicas = 1"), "says what to do instead: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_runs_on_three_nodes_with_r3_streams_and_survives_a_node_kill() {
    let mut cluster = NatsCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let config = r3_config(dir.path(), &cluster.urls());
    topology_apply(&config);
    // every stream, bucket and consumer is placed on 3 nodes, with a leader
    let out = cli(&config, &["topology", "status"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = String::from_utf8(out.stdout).unwrap();
    for line in status.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "3", "{line}\n{status}");
        assert!(cols[2].starts_with('n'), "a leader: {line}");
        assert_eq!(line.matches(" current").count(), 2, "two followers, both current: {line}");
    }
    assert!(
        status.contains("FLEET_RESULTS") && status.contains("KV_fleet_checkpoints") && status.contains("worker_echo")
    );

    let _w1 = start_worker(&config, &[]).await;
    let _w2 = start_worker(&config, &[]).await;
    let (_ingress, base) = start_ingress(&config).await;
    let mut caller = Caller::connect(&cluster.urls()).await;
    caller.publish_many(Priority::Normal, "before", 200, "echo").await;
    let (results, _) = caller.collect(200, Duration::from_secs(60)).await;
    assert_eq!(results.len(), 200);
    for k in 0..50 {
        let (status, v) =
            post_json(&format!("{base}/v1/infer"), &serde_json::json!({"model": "echo", "prompt": format!("h{k}")}))
                .await;
        assert_eq!(status, 200, "{v}");
    }

    // kill -9 of the node leading the results stream; the others elect a
    // new leader and the queued requests are all answered
    let leader = cluster.stream_leader("FLEET_RESULTS").expect("FLEET_RESULTS has a leader");
    caller.publish_many(Priority::Normal, "during", 300, "echo").await;
    cluster.node(leader).kill();
    let start = Instant::now();
    let (mut results, dups) = caller.collect(300, Duration::from_secs(60)).await;
    let took = start.elapsed();
    // a reply is core NATS: one published while the caller's connection
    // moves off the dead node is lost; the stored result is the durable one
    let replied: std::collections::HashSet<String> = results.iter().map(|(id, _)| id.clone()).collect();
    let mut missed = 0;
    for k in 0..300 {
        let id = format!("during{k}");
        if !replied.contains(&id) {
            let stored = stored_result(&caller.js, "default", &id).await;
            results.push((id.clone(), stored.unwrap_or_else(|| panic!("{id}: neither replied nor stored"))));
            missed += 1;
        }
    }
    assert_eq!(results.len(), 300, "every request queued before the kill has a result");
    let errors: Vec<_> = results.iter().filter(|(_, r)| r.error.is_some()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    println!(
        "300 answered {took:?} after the kill of the results leader (n{leader}); {dups} repeated replies, \
         {missed} replies lost in transit (their results stored)"
    );
    // the survivors elect another leader (their monitoring pages may name
    // the dead one for a moment after the kill)
    let start = Instant::now();
    while cluster.stream_leader("FLEET_RESULTS").is_none_or(|new| new == leader) {
        assert!(start.elapsed() < Duration::from_secs(30), "no new FLEET_RESULTS leader after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster.node(leader).restart();
    cluster.wait_meta_leader(Duration::from_secs(30));

    // kill -9 of the leader of the normal request stream while HTTP callers
    // wait on it: every call within its deadline is answered 200
    let leader = cluster.stream_leader("FLEET_REQ_NORMAL").expect("FLEET_REQ_NORMAL has a leader");
    let calls: Vec<_> = (0..120)
        .map(|k| {
            let url = format!("{base}/v1/infer");
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(25 * k)).await;
                let started = Instant::now();
                let (status, v) =
                    post_json(&url, &serde_json::json!({"model": "echo", "prompt": format!("k{k}")})).await;
                (status, v, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    cluster.node(leader).kill();
    let mut slowest = Duration::ZERO;
    for c in calls {
        let (status, v, took) = c.await.unwrap();
        assert_eq!(status, 200, "{v}");
        slowest = slowest.max(took);
    }
    println!("120 HTTP calls around the kill of the request stream's leader (n{leader}): all 200, slowest {slowest:?}");
    cluster.node(leader).restart();
}
