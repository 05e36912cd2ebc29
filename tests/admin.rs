//! The admin API through real processes: draining a worker, pausing a
//! priority (and keeping the pause across `topology apply`), dead letters
//! and cache purge, all behind the `admin` role.

mod common;

use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::{subjects, Priority, Status};
use serde_json::{json, Value};

const ADMIN: &str = "ops-key-1";
const APP: &str = "app-key-1";

fn auth(extra: &str) -> String {
    let keys = auth_with_keys(&[("ops", ADMIN, "ops", &["admin"]), ("app", APP, "default", &["submit", "read"])]);
    format!("{keys}{extra}")
}

/// Polls `GET path` until `ok` holds for its JSON, for up to 15 s.
async fn wait_json(http: &Http, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (status, v) = http.json("GET", path, Some(ADMIN), None).await;
        if status == 200 && ok(&v) {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "{path}: {status} {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ids(results: &[(String, retro_fleet_schemas::InferResult)]) -> Vec<String> {
    let mut v: Vec<String> = results.iter().map(|(id, _)| id.clone()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_worker_takes_nothing_until_resumed_and_a_paused_priority_waits() {
    let s = setup(&auth(""));
    let _worker = start_worker(&s.config, &["--id", "w-1"]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let mut caller = Caller::connect(&s.nats.url()).await;

    // only admins steer
    assert_eq!(http.send("POST", "/v1/admin/workers/w-1/drain", Some(APP), None).await.status(), 403);
    assert_eq!(http.send("POST", "/v1/admin/queues/low/pause", None, None).await.status(), 401);

    wait_json(&http, "/v1/admin/workers", |v| v["workers"][0]["id"] == "w-1").await;
    // each model's measured load time is in the registry (the scaler's cold-start input)
    let (_, workers) = http.json("GET", "/v1/admin/workers", Some(ADMIN), None).await;
    assert!(workers["workers"][0]["per_model"]["echo"]["load_ms"].is_u64(), "{workers}");
    let (status, state) = http.json("POST", "/v1/admin/workers/w-1/drain", Some(ADMIN), None).await;
    assert_eq!((status, &state["draining"]), (200, &json!(true)), "{state}");
    wait_json(&http, "/v1/admin/workers", |v| v["workers"][0]["draining"] == true).await;
    caller.publish_many(Priority::Normal, "d", 5, "echo").await;
    let (early, _) = caller.collect(5, Duration::from_millis(1500)).await;
    assert!(early.is_empty(), "a drained worker answered {:?}", ids(&early));
    let (status, state) = http.json("POST", "/v1/admin/workers/w-1/resume", Some(ADMIN), None).await;
    assert_eq!((status, &state["draining"]), (200, &json!(false)), "{state}");
    let (results, dups) = caller.collect(5, Duration::from_secs(15)).await;
    assert_eq!((results.len(), dups), (5, 0));
    let (status, err) = http.json("POST", "/v1/admin/workers/nobody/drain", Some(ADMIN), None).await;
    assert_eq!((status, &err["error"]["code"]), (404, &json!("not_found")), "{err}");

    // pause low: high still flows, low waits, also across a topology update
    let (status, paused) = http.json("POST", "/v1/admin/queues/low/pause", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{paused}");
    assert!(paused["consumers"].as_array().unwrap().iter().all(|c| c["paused"] == true), "{paused}");
    let out = cli(&s.config, &["topology", "apply"], &[("FLEET_TOPOLOGY__ACK_WAIT_SECS", "3")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let applied = String::from_utf8(out.stdout).unwrap();
    assert!(applied.contains("FLEET_REQ_LOW/worker_echo") && applied.contains("updated"), "{applied}");
    let queues = wait_json(&http, "/v1/admin/queues", |_| true).await;
    let low = &queues["queues"][2];
    assert_eq!(low["stream"], "FLEET_REQ_LOW");
    assert_eq!(low["consumers"][0]["paused"], true, "the pause outlives the update: {queues}");
    caller.publish_many(Priority::Low, "low-", 3, "echo").await;
    caller.publish_many(Priority::High, "high-", 3, "echo").await;
    let (first, _) = caller.collect(3, Duration::from_secs(15)).await;
    assert_eq!(ids(&first), ["high-0", "high-1", "high-2"]);
    let (none, _) = caller.collect(1, Duration::from_millis(1500)).await;
    assert!(none.is_empty(), "a paused class was delivered: {:?}", ids(&none));
    let (status, resumed) = http.json("POST", "/v1/admin/queues/low/resume", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{resumed}");
    let (rest, _) = caller.collect(3, Duration::from_secs(15)).await;
    assert_eq!(ids(&rest), ["low-0", "low-1", "low-2"]);

    let (status, err) = http.json("POST", "/v1/admin/queues/urgent/pause", Some(ADMIN), None).await;
    assert_eq!((status, &err["error"]["param"]), (422, &json!("priority")), "{err}");
    let (status, err) = http.json("POST", "/v1/admin/queues/low/pause?for_secs=soon", Some(ADMIN), None).await;
    assert_eq!((status, &err["error"]["param"]), (422, &json!("query")), "{err}");
}

const FLAKY: &str = "[models.echo]\nbackend = \"echo\"\n[models.flaky]\nbackend = \"synthetic\"\nlatency_ms = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_and_caches_purged_through_the_admin_api() {
    let s = setup(&auth(&format!("{FLAKY}fail_rate = 1.0\n")));
    let mut worker = start_worker(&s.config, &[]).await;
    let (mut ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let mut caller = Caller::connect(&s.nats.url()).await;
    caller.publish_many(Priority::Normal, "f", 3, "flaky").await;
    let (results, _) = caller.collect(3, Duration::from_secs(30)).await;
    assert!(results.len() == 3 && results.iter().all(|(_, r)| r.status == Status::Error));
    assert!(worker.terminate().success());

    let (status, list) = http.json("GET", "/v1/admin/dlq?model=flaky&priority=normal", Some(ADMIN), None).await;
    assert_eq!(status, 200, "{list}");
    let letters = list["letters"].as_array().unwrap();
    assert_eq!(letters.len(), 3, "{list}");
    assert!(letters.iter().all(|l| l["code"] == "backend_error" && l["model"] == "flaky"), "{list}");
    let (_, none) = http.json("GET", "/v1/admin/dlq?model=echo", Some(ADMIN), None).await;
    assert_eq!(none["letters"], json!([]));
    let (status, err) = http.json("GET", "/v1/admin/dlq?priority=urgent", Some(ADMIN), None).await;
    assert_eq!(status, 422, "{err}");

    // the model is fixed; replay through the API
    write_config(s.dir.path(), &s.nats.url(), &auth(FLAKY));
    let _worker = start_worker(&s.config, &[]).await;
    let body = json!({"filter": {"model": "flaky"}, "dry_run": true});
    let (status, dry) = http.json("POST", "/v1/admin/dlq/replay", Some(ADMIN), Some(body)).await;
    assert_eq!((status, &dry["replayed"]), (200, &json!(3)), "{dry}");
    assert!(dry["letters"].as_array().unwrap().iter().all(|l| l["action"] == "would_replay"), "{dry}");
    let body = json!({"filter": {"model": "flaky"}});
    let (status, done) = http.json("POST", "/v1/admin/dlq/replay", Some(ADMIN), Some(body)).await;
    assert_eq!((status, &done["replayed"], &done["skipped"]), (200, &json!(3), &json!(0)), "{done}");
    let start = Instant::now();
    for id in ["f0", "f1", "f2"] {
        // the error result was removed by the replay; the new one follows
        while !stored_result(&caller.js, subjects::DEFAULT_TENANT, id).await.is_some_and(|r| r.status == Status::Ok) {
            assert!(start.elapsed() < Duration::from_secs(30), "{id} not answered after its replay");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (_, after) = http.json("GET", "/v1/admin/dlq", Some(ADMIN), None).await;
    assert_eq!(after["letters"], json!([]), "replayed letters leave the DLQ");
    let (status, err) = http.json("POST", "/v1/admin/dlq/replay", Some(ADMIN), Some(json!({"colour": 1}))).await;
    assert_eq!((status, &err["error"]["code"]), (422, &json!("invalid_request")), "{err}");

    // cache purge: a new generation per model, in the KV the workers watch
    let body = json!({"models": ["nope"]});
    let (status, err) = http.json("POST", "/v1/admin/cache/purge", Some(ADMIN), Some(body)).await;
    assert_eq!((status, &err["error"]["code"]), (404, &json!("unknown_model")), "{err}");
    let body = json!({"models": ["echo"]});
    let (status, purged) = http.json("POST", "/v1/admin/cache/purge", Some(ADMIN), Some(body)).await;
    assert_eq!(status, 200, "{purged}");
    let generation = purged["generations"]["echo"].as_str().unwrap().to_string();
    let kv = caller.js.get_key_value(subjects::MODELS_BUCKET).await.unwrap();
    let stored = kv.get("echo").await.unwrap().unwrap();
    assert_eq!(std::str::from_utf8(&stored).unwrap(), generation);
    assert_eq!(http.send("POST", "/v1/admin/cache/purge", Some(APP), Some(json!({}))).await.status(), 403);
    assert!(ingress.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_weights_are_set_by_admins_and_a_paused_class_holds_a_new_tenants_lane() {
    let s = setup(&auth(""));
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let weight = |w: f64| Some(json!({ "weight": w }));

    assert_eq!(http.send("PUT", "/v1/admin/tenants/acme", Some(APP), weight(2.0)).await.status(), 403);
    let (status, v) = http.json("PUT", "/v1/admin/tenants/acme", Some(ADMIN), weight(2.5)).await;
    assert_eq!((status, &v["weight"]), (200, &json!(2.5)), "{v}");
    let (status, v) = http.json("PUT", "/v1/admin/tenants/acme", Some(ADMIN), weight(-1.0)).await;
    assert_eq!(status, 422, "{v}");
    let (status, v) = http.json("PUT", "/v1/admin/tenants/acme", Some(ADMIN), Some(json!({"wieght": 2}))).await;
    assert_eq!(status, 422, "a misspelt setting is named, not ignored: {v}");
    let (_, list) = http.json("GET", "/v1/admin/tenants", Some(ADMIN), None).await;
    assert_eq!(list["data"], json!([{"tenant": "acme", "weight": 2.5}]));
    let out = cli(&s.config, &["tenants", "list"], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("acme"), "{out:?}");

    // a lane made while its class is paused is paused too
    let (status, _) = http.json("POST", "/v1/admin/queues/normal/pause", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    let mut caller = Caller::connect(&s.nats.url()).await;
    for i in 0..3 {
        let id = format!("z{i}");
        let h = retro_fleet_schemas::Envelope::new(id.as_str()).tenant("zeta").headers();
        let body = bytes::Bytes::from(retro_fleet_schemas::codec::encode(&request(&id, "echo", "x")));
        caller.publish_raw(&subjects::tenant_request(Priority::Normal, "echo", "zeta"), &id, h, body).await;
    }
    let (early, _) = caller.collect(3, Duration::from_millis(1500)).await;
    assert!(early.is_empty(), "a paused class delivered from a new lane: {early:?}");
    let (status, _) = http.json("POST", "/v1/admin/queues/normal/resume", Some(ADMIN), None).await;
    assert_eq!(status, 200);
    let (late, dups) = caller.collect(3, Duration::from_secs(10)).await;
    assert_eq!((late.len(), dups), (3, 0));
}
