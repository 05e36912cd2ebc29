//! Recording and replaying traffic through real processes: a worker with
//! the archive on records every settled request with its result;
//! `retro-fleet replay` saves them to JSONL, sends them again at a scaled
//! pacing in the time that pacing gives, and its `--compare` report finds
//! the answers of a deterministic model the same, and those of another
//! model different.

mod common;

use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::{subjects, Priority};
use serde_json::Value;

const ARCHIVE_ON: (&str, &str) = ("FLEET_TOPOLOGY__ARCHIVE_MAX_AGE_SECS", "3600");

/// Runs `retro-fleet replay ARGS` and returns its stderr, failing on a non-zero exit.
fn replay(config: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["replay"];
    all.extend_from_slice(args);
    let out = cli(config, &all, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "replay {args:?} failed:\n{stderr}");
    stderr
}

fn report(path: &std::path::Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_traffic_replays_at_scaled_pacing_with_the_same_answers() {
    let extra = "[models.fixed]\nbackend = \"synthetic\"\nlatency_ms = 1\n[models.echo]\nbackend = \"echo\"\n";
    let s = setup(extra);
    let out = cli(&s.config, &["topology", "apply"], &[ARCHIVE_ON]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let _worker = {
        let port = free_port();
        let env = [("FLEET_METRICS_LISTEN", format!("127.0.0.1:{port}")), (ARCHIVE_ON.0, ARCHIVE_ON.1.to_string())];
        let mut w = Proc::start(&s.config, &["worker"], &env);
        wait_ready(&format!("http://127.0.0.1:{port}/health/ready"), &mut w).await;
        wait_log(&mut w, "worker pulling").await;
        w
    };

    // 2,000 requests, each prompt its own, answered and recorded
    let n = 2000;
    let mut caller = Caller::connect(&s.nats.url()).await;
    for i in 0..n {
        caller.publish(Priority::Normal, &request(&format!("rec{i}"), "echo", &format!("prompt number {i}"))).await;
    }
    let (answered, _) = caller.collect(n, Duration::from_secs(60)).await;
    assert_eq!(answered.len(), n);
    let until = Instant::now() + Duration::from_secs(20);
    while stream_len(&caller.js, subjects::ARCHIVE_STREAM).await < n as u64 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stream_len(&caller.js, subjects::ARCHIVE_STREAM).await, n as u64, "one record per request");

    // saved as JSONL, then spread over ten minutes: a request every 300 ms
    let saved = s.dir.path().join("traffic.jsonl");
    replay(&s.config, &["--since", "1h", "--save", saved.to_str().unwrap()]);
    let mut records: Vec<Value> =
        std::fs::read_to_string(&saved).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), n);
    let first = records[0]["at_ms"].as_u64().unwrap();
    for (i, r) in records.iter_mut().enumerate() {
        assert_eq!(r["result"]["output"]["text"], r["request"]["input"]["prompt"], "the result recorded with it");
        r["at_ms"] = (first + 300 * i as u64).into();
    }
    let spread = s.dir.path().join("hour.jsonl");
    let lines: Vec<String> = records.iter().map(Value::to_string).collect();
    std::fs::write(&spread, lines.join("\n") + "\n").unwrap();

    // ×20: 599.7 s of traffic in 30 s
    let compared = s.dir.path().join("compare.json");
    let started = Instant::now();
    replay(&s.config, &["--file", spread.to_str().unwrap(), "--speed", "20", "--compare", compared.to_str().unwrap()]);
    let wall = started.elapsed().as_secs_f64();
    let r = report(&compared);
    let expected = 599.7 / 20.0;
    assert!((r["expected_secs"].as_f64().unwrap() - expected).abs() < 0.01, "{r}");
    let took = r["elapsed_secs"].as_f64().unwrap();
    assert!((took - expected).abs() <= expected * 0.1, "took {took:.2} s, expected {expected:.2} s ± 10 %: {r}");
    assert!(wall < expected * 1.1 + 5.0, "the whole command took {wall:.1} s");
    assert_eq!((r["same"].as_u64(), r["different"].as_u64(), r["failed"].as_u64()), (Some(n as u64), Some(0), Some(0)));
    assert_eq!(r["ok"], n);

    // from the archive, as fast as the fleet takes them, to another model:
    // every answer differs, and the report shows what changed
    let shadow = s.dir.path().join("shadow.json");
    let out = replay(
        &s.config,
        &[
            "--since",
            "1h",
            "--model",
            "echo",
            "--limit",
            "50",
            "--speed",
            "max",
            "--to-model",
            "fixed",
            "--compare",
            shadow.to_str().unwrap(),
        ],
    );
    let r = report(&shadow);
    assert_eq!((r["same"].as_u64(), r["different"].as_u64()), (Some(0), Some(50)), "{out}");
    let differences = r["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 50);
    for d in differences {
        assert_eq!(d["verdict"], "different");
        let i: usize = d["recorded_id"].as_str().unwrap().strip_prefix("rec").unwrap().parse().unwrap();
        assert_eq!(d["recorded"]["output"]["text"], format!("prompt number {i}"), "{d}");
        assert_ne!(d["replayed"]["output"]["text"], d["recorded"]["output"]["text"]);
    }

    // the replays were recorded too, and are not replayed again
    let again = s.dir.path().join("again.jsonl");
    replay(&s.config, &["--since", "1h", "--save", again.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&again).unwrap().lines().count(), n);
    assert!(stream_len(&caller.js, subjects::ARCHIVE_STREAM).await > n as u64);

    // nothing matches: a clear error, not an empty run
    let out = cli(&s.config, &["replay", "--tenant", "nobody"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no recorded request matches"));
}
