//! An edge site: an ingress connected to a local leaf nats-server (with a
//! JetStream of its own, domain `edge`), which is a leaf node of the hub
//! (JetStream domain `hub`). The fleet's streams and workers stay at the
//! hub; the edge ingress publishes into the hub's request streams and
//! receives its replies through the leaf connection. NATS callers at the
//! edge publish to the same subjects.

mod common;

use std::time::Duration;

use common::*;
use retro_fleet_schemas::Priority;
use retro_fleet_testkit::{free_port, NatsServer};

/// A nats-server with `conf` (JetStream is on, with this server's store).
fn server(dir: &std::path::Path, name: &str, conf: &str) -> NatsServer {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf).unwrap();
    NatsServer::start_with(&["-n", name, "-c", path.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_ingress_on_a_leaf_node_is_answered_by_the_hubs_workers() {
    let dir = tempfile::tempdir().unwrap();
    let leaf_port = free_port();
    let hub = server(
        dir.path(),
        "hub",
        &format!("jetstream {{ domain: hub }}\nleafnodes {{ listen: \"127.0.0.1:{leaf_port}\" }}\n"),
    );
    let edge = server(
        dir.path(),
        "edge",
        &format!(
            "jetstream {{ domain: edge }}\nleafnodes {{ remotes: [ {{ url: \"nats-leaf://127.0.0.1:{leaf_port}\" }} ] \
             }}\n"
        ),
    );
    // the hub: topology and workers
    let hub_dir = dir.path().join("hub");
    std::fs::create_dir_all(&hub_dir).unwrap();
    let hub_config = write_config(&hub_dir, &hub.url(), "");
    topology_apply(&hub_config);
    let _worker = start_worker(&hub_config, &[]).await;

    // the edge: an ingress on the leaf, using the hub's JetStream domain
    let edge_dir = dir.path().join("edge");
    std::fs::create_dir_all(&edge_dir).unwrap();
    let edge_config = write_config(&edge_dir, &edge.url(), "");
    let text = std::fs::read_to_string(&edge_config).unwrap();
    std::fs::write(&edge_config, text.replace("[nats]\n", "[nats]\njetstream_domain = \"hub\"\n")).unwrap();
    // the leaf connection comes up within a second or two of the servers
    let client = async_nats::connect(edge.url()).await.unwrap();
    let hub_js = async_nats::jetstream::with_domain(client, "hub");
    let mut seen = false;
    for _ in 0..100 {
        if hub_js.get_stream("FLEET_RESULTS").await.is_ok() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(seen, "the hub's streams are not visible from the edge");
    let (_ingress, base) = start_ingress(&edge_config).await;

    // HTTP callers at the edge, answered by the hub's workers
    for k in 0..20 {
        let (status, v) = post_json(
            &format!("{base}/v1/infer"),
            &serde_json::json!({"model": "echo", "prompt": format!("edge {k}")}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["output"]["text"], format!("edge {k}"), "{v}");
    }
    // a stored result is read back through the leaf (GET /v1/results)
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/infer/async"))
        .header("x-request-id", "edge-async")
        .json(&serde_json::json!({"model": "echo", "prompt": "later"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let mut got = None;
    for _ in 0..100 {
        let (status, v) = get_text(&format!("{base}/v1/results/edge-async")).await;
        if status == 200 {
            got = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(got.expect("the async result, read from the hub").contains("later"));
    // the edge ingress is ready: it sees the hub's streams and their leaders
    let (status, body) = get_text(&format!("{base}/health/ready")).await;
    assert_eq!(status, 200, "{body}");

    // a NATS service at the edge publishes to the same subjects
    let mut caller = Caller::connect(&edge.url()).await;
    caller.js = async_nats::jetstream::with_domain(caller.client.clone(), "hub");
    caller.publish_many(Priority::Normal, "edge-nats", 20, "echo").await;
    let (results, _) = caller.collect(20, Duration::from_secs(30)).await;
    assert_eq!(results.len(), 20);
    assert!(results.iter().all(|(_, r)| r.error.is_none()), "{results:?}");
}
