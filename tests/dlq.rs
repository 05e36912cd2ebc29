//! `retro-fleet dlq list | show | replay` against real dead letters made by
//! a real worker.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use common::*;
use retro_fleet_schemas::{headers, subjects, ErrorCode, Priority, Status};

fn dlq(config: &Path, args: &[&str]) -> String {
    let out = cli(config, &[&["dlq"], args].concat(), &[]);
    assert!(out.status.success(), "dlq {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

const FLAKY: &str = "[models.echo]\nbackend = \"echo\"\n[models.flaky]\nbackend = \"synthetic\"\nlatency_ms = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_replayed_with_a_fresh_delivery_history() {
    let s = setup(&format!("{FLAKY}fail_rate = 1.0\n"));
    let mut worker = start_worker(&s.config, &[]).await;
    let mut caller = Caller::connect(&s.nats.url()).await;
    caller.publish_many(Priority::High, "f", 5, "flaky").await;
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "bad-1");
    caller.publish_raw(&subjects::request(Priority::Normal, "echo"), "bad-1", h, Bytes::from_static(b"\xc1junk")).await;
    let (results, _) = caller.collect(6, Duration::from_secs(30)).await;
    assert_eq!(results.len(), 6);
    assert!(results.iter().all(|(_, r)| r.status == Status::Error));
    assert!(worker.terminate().success());

    let all = dlq(&s.config, &["list"]);
    assert!(all.contains("6 dead letter(s)"), "{all}");
    for needle in ["f0", "f4", "bad-1", "backend_error", "decode_error", "flaky"] {
        assert!(all.contains(needle), "{needle} in {all}");
    }
    let flaky = dlq(&s.config, &["list", "--filter", "model=flaky", "--filter", "code=backend_error"]);
    assert!(flaky.contains("5 dead letter(s)") && !flaky.contains("bad-1"), "{flaky}");
    let seq = all.lines().find(|l| l.contains("bad-1")).unwrap().split_whitespace().next().unwrap().to_string();
    let shown = dlq(&s.config, &["show", &seq]);
    assert!(shown.contains("Fleet-Error-Code: decode_error"), "{shown}");
    assert!(shown.contains("\\xc1junk"), "the original payload, escaped: {shown}");

    // the model is fixed; the letters go back to their streams. Each had used
    // up its max_deliver, so only a fresh delivery history lets it run again.
    write_config(s.dir.path(), &s.nats.url(), FLAKY);
    let worker = start_worker(&s.config, &[]).await;
    let dry = dlq(&s.config, &["replay", "--filter", "model=flaky", "--dry-run"]);
    assert!(dry.contains("5 replayed"), "{dry}");
    let replayed = dlq(&s.config, &["replay", "--filter", "model=flaky"]);
    assert!(replayed.contains("5 replayed, 0 skipped"), "{replayed}");
    let start = Instant::now();
    for i in 0..5 {
        let id = format!("f{i}");
        loop {
            // the error result is removed by the replay; the new one follows
            let r = stored_result(&caller.js, subjects::DEFAULT_TENANT, &id).await;
            if r.as_ref().is_some_and(|r| r.status == Status::Ok) {
                break;
            }
            if let Some(r) = r {
                assert_eq!(r.error.unwrap().code, ErrorCode::BackendError);
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{id} not answered after its replay:\n{}", worker.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // only the undecodable letter is left
    let left = dlq(&s.config, &["list"]);
    assert!(left.contains("1 dead letter(s)") && left.contains("bad-1"), "{left}");
}
