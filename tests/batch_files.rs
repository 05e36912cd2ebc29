//! OpenAI's Files and Batches APIs through real processes: the unmodified
//! `openai` Python SDK runs the whole flow; a cancel stops new computation
//! within seconds; a batch expires with the lines it finished; a runner
//! killed midway is taken over by another ingress and every line gets
//! exactly one result; uploads past the limit are 413; one tenant never
//! sees another's files or batches.

mod common;

use std::time::{Duration, Instant};

use common::*;
use retro_fleet_schemas::subjects;
use serde_json::{json, Value};

const SDK_HINT: &str = "the openai client script failed (`make test` installs openai)";

/// Two tenants; a slow synthetic model; small uploads; a short lease.
fn setup_batches() -> Setup {
    let s = setup(&format!(
        "[models.echo]\nbackend = \"echo\"\n[models.slow]\nbackend = \"synthetic\"\nlatency_ms = 200\n\
         [ingress]\nmax_file_bytes = 1048576\nbatch_max_in_flight = 16\n\
         [ingress.auth]\nenabled = true\n{}{}",
        api_keys(&[("producer", "acme-key", "acme", &["submit", "read"])]),
        api_keys(&[("other", "globex-key", "globex", &["submit", "read"])]),
    ));
    let text =
        std::fs::read_to_string(&s.config).unwrap().replace("[topology]\n", "[topology]\nbatch_lease_secs = 3\n");
    std::fs::write(&s.config, text).unwrap();
    topology_apply(&s.config);
    s
}

fn chat_lines(model: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": model, "messages": [{"role": "user", "content": format!("m{i}")}]}})
            .to_string()
                + "\n"
        })
        .collect()
}

/// Uploads `data` as a batch file; its id.
async fn upload(base: &str, key: &str, data: String) -> String {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part("file", reqwest::multipart::Part::bytes(data.into_bytes()).file_name("in.jsonl"));
    let r = reqwest::Client::new().post(format!("{base}/v1/files")).bearer_auth(key).multipart(form).send().await;
    let r = r.unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
}

/// Creates a batch of `file` for chat completions within `window`.
async fn create(http: &Http, key: &str, file: &str, window: &str) -> Value {
    let body = json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": window});
    let (status, batch) = http.json("POST", "/v1/batches", Some(key), Some(body)).await;
    assert_eq!(status, 200, "{batch}");
    batch
}

/// Polls batch `id` until it ends.
async fn ended(http: &Http, key: &str, id: &str, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        let (_, b) = http.json("GET", &format!("/v1/batches/{id}"), Some(key), None).await;
        if ["completed", "failed", "expired", "cancelled"].contains(&b["status"].as_str().unwrap_or("")) {
            return b;
        }
        assert!(start.elapsed() < within, "batch did not end: {b}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The lines of file `id`.
async fn file_lines(base: &str, key: &str, id: &str) -> Vec<Value> {
    let r = reqwest::Client::new().get(format!("{base}/v1/files/{id}/content")).bearer_auth(key).send().await;
    let text = r.unwrap().text().await.unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_uploads_creates_polls_lists_cancels_and_downloads() {
    let s = setup_batches();
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let script = r#"
import io, json, sys, time, openai
a = json.loads(sys.argv[1])
c = openai.OpenAI(base_url=a["base"] + "/v1", api_key="acme-key", max_retries=0)
other = openai.OpenAI(base_url=a["base"] + "/v1", api_key="globex-key", max_retries=0)

lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"model": "echo", "messages": [{"role": "user", "content": f"m{i}"}]}})
         for i in range(20)]
lines.insert(5, "this line is not JSON")
lines.append(json.dumps({"custom_id": "nope", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}}))
f = c.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
assert f.purpose == "batch" and f.bytes > 0, f

b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                     metadata={"run": "sdk"}, extra_headers={"Idempotency-Key": "sdk-run-1"})
again = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                         extra_headers={"Idempotency-Key": "sdk-run-1"})
assert again.id == b.id, (again.id, b.id)
for _ in range(300):
    b = c.batches.retrieve(b.id)
    if b.status in ("completed", "failed", "expired", "cancelled"):
        break
    time.sleep(0.2)
assert b.status == "completed", b
assert b.metadata == {"run": "sdk"}, b.metadata
counts = (b.request_counts.total, b.request_counts.completed, b.request_counts.failed)
assert counts == (22, 20, 2), (counts, b.error_file_id and c.files.content(b.error_file_id).text[:1500])
assert b.completed_at and b.finalizing_at and b.in_progress_at, b

out = [json.loads(l) for l in c.files.content(b.output_file_id).text.splitlines()]
assert [o["custom_id"] for o in out] == [f"c{i}" for i in range(20)], out
for o in out:
    assert o["response"]["status_code"] == 200
    assert o["response"]["body"]["choices"][0]["message"]["content"] == "m" + o["custom_id"][1:]
errors = [json.loads(l) for l in c.files.content(b.error_file_id).text.splitlines()]
assert len(errors) == 2, errors
assert errors[0]["custom_id"] is None and "line 6" in errors[0]["error"]["message"], errors[0]
assert errors[1]["custom_id"] == "nope", errors[1]
assert c.files.retrieve(b.output_file_id).purpose == "batch_output"

# a second batch on the slow model, cancelled while it runs
slow = "\n".join(json.dumps({"custom_id": f"s{i}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "slow", "messages": [{"role": "user", "content": "x"}]}})
                 for i in range(2000))
f2 = c.files.create(file=("slow.jsonl", io.BytesIO(slow.encode())), purpose="batch")
b2 = c.batches.create(input_file_id=f2.id, endpoint="/v1/chat/completions", completion_window="24h")
time.sleep(1.5)
assert c.batches.cancel(b2.id).status in ("cancelling", "cancelled")
for _ in range(100):
    b2 = c.batches.retrieve(b2.id)
    if b2.status == "cancelled":
        break
    time.sleep(0.2)
assert b2.status == "cancelled", b2
assert b2.cancelling_at and b2.cancelled_at, b2
assert b2.request_counts.completed < 2000, b2.request_counts

# a third, to page through: newest first, two at a time
b3 = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
ids = [x.id for x in c.batches.list(limit=2)]
assert ids[:3] == [b3.id, b2.id, b.id], ids
assert f.id in [x.id for x in c.files.list()]

# another tenant sees none of it
for call in (lambda: other.batches.retrieve(b.id), lambda: other.batches.cancel(b3.id),
             lambda: other.files.retrieve(f.id), lambda: other.files.content(f.id),
             lambda: other.files.delete(f.id)):
    try:
        call()
        raise SystemExit("another tenant reached acme's batch or file")
    except openai.NotFoundError:
        pass
assert all(x.id not in (b.id, b2.id, b3.id) for x in other.batches.list())
assert f.id not in [x.id for x in other.files.list()]

assert c.files.delete(f2.id).deleted
try:
    c.files.retrieve(f2.id)
    raise SystemExit("a deleted file is still there")
except openai.NotFoundError:
    pass
print("sdk batch ok")
"#;
    let arg = json!({"base": base}).to_string();
    tokio::task::spawn_blocking(move || python(script, &arg, "sdk batch ok", SDK_HINT)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_stops_new_computation_within_5_seconds() {
    let s = setup_batches();
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let file = upload(&base, "acme-key", chat_lines("slow", 5000)).await;
    let batch = create(&http, "acme-key", &file, "24h").await;
    let id = batch["id"].as_str().unwrap();
    let caller = Caller::connect(&s.nats.url()).await;
    // running: some lines answered
    let start = Instant::now();
    while stream_len(&caller.js, subjects::RESULTS_STREAM).await < 20 {
        assert!(start.elapsed() < Duration::from_secs(30), "the batch does not run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, v) = http.json("POST", &format!("/v1/batches/{id}/cancel"), Some("acme-key"), None).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("cancelling")), "{v}");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settled = stream_len(&caller.js, subjects::RESULTS_STREAM).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = stream_len(&caller.js, subjects::RESULTS_STREAM).await;
    assert_eq!(settled, later, "lines still computed more than 5 s after the cancel");
    assert!(later < 1000, "{later} of 5000 lines computed: the cancel came late");
    let b = ended(&http, "acme-key", id, Duration::from_secs(20)).await;
    assert_eq!(b["status"], "cancelled", "{b}");
    // the lines done are in the output file, the cancelled ones in the error file
    let counts = &b["request_counts"];
    let out = file_lines(&base, "acme-key", b["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len() as u64, counts["completed"].as_u64().unwrap());
    assert_eq!(counts["completed"].as_u64().unwrap() + counts["failed"].as_u64().unwrap(), later, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_expires_at_the_end_of_its_window_with_the_lines_it_finished() {
    let s = setup_batches();
    let _worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let file = upload(&base, "acme-key", chat_lines("slow", 1000)).await;
    let batch = create(&http, "acme-key", &file, "3s").await;
    let b = ended(&http, "acme-key", batch["id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(b["status"], "expired", "{b}");
    assert!(b["expired_at"].as_u64().unwrap() >= b["expires_at"].as_u64().unwrap(), "{b}");
    let done = b["request_counts"]["completed"].as_u64().unwrap();
    assert!(done > 0 && done < 1000, "{b}");
    let out = file_lines(&base, "acme-key", b["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len() as u64, done);
    let errors = file_lines(&base, "acme-key", b["error_file_id"].as_str().unwrap()).await;
    let expired = errors.iter().filter(|e| e["error"]["code"] == "batch_expired").count();
    assert!(expired > 0, "lines never sent are reported expired");
    // every line is in exactly one of the two files, or was cancelled running
    assert!(out.len() + errors.len() <= 1000);
    let mut ids: Vec<&str> = out.iter().chain(&errors).map(|l| l["custom_id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), out.len() + errors.len(), "a line in both files");
}

/// An ingress running a batch of `lines` lines of the slow model, once
/// `answers` of them are stored: the ingress, the input file's id, the
/// batch's id, and a NATS caller.
async fn under_way(s: &Setup, lines: usize, answers: u64) -> (Proc, String, String, Caller) {
    let (ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let file = upload(&base, "acme-key", chat_lines("slow", lines)).await;
    let batch = create(&http, "acme-key", &file, "24h").await;
    let id = batch["id"].as_str().unwrap().to_string();
    let caller = Caller::connect(&s.nats.url()).await;
    let start = Instant::now();
    while stream_len(&caller.js, subjects::RESULTS_STREAM).await < answers {
        assert!(start.elapsed() < Duration::from_secs(30), "the batch does not run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (ingress, file, id, caller)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_midway_is_taken_over_and_every_line_gets_one_result() {
    let s = setup_batches();
    let _worker = start_worker(&s.config, &[]).await;
    let (mut first, _, id, caller) = under_way(&s, 400, 50).await;
    first.kill9();
    let (_second, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let b = ended(&http, "acme-key", &id, Duration::from_secs(90)).await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(b["request_counts"], json!({"total": 400, "completed": 400, "failed": 0}));
    let out = file_lines(&base, "acme-key", b["output_file_id"].as_str().unwrap()).await;
    let ids: Vec<String> = out.iter().map(|l| l["custom_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, (0..400).map(|i| format!("c{i}")).collect::<Vec<_>>(), "each line once, in order");
    assert_eq!(stream_len(&caller.js, subjects::RESULTS_STREAM).await, 400, "no line computed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_input_file_is_deleted_ends_failed_saying_why() {
    let s = setup_batches();
    let _worker = start_worker(&s.config, &[]).await;
    let (mut first, file, id, caller) = under_way(&s, 400, 20).await;
    // its runner dies, and the input is deleted before another takes it over
    first.kill9();
    let files = caller.js.get_object_store(subjects::FILES_BUCKET).await.unwrap();
    files.delete(format!("acme/{file}")).await.unwrap();
    let (_second, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    let b = ended(&http, "acme-key", &id, Duration::from_secs(30)).await;
    assert_eq!(b["status"], "failed", "{b}");
    let error = &b["errors"]["data"][0];
    assert_eq!(error["param"], "input_file_id", "{b}");
    assert!(error["message"].as_str().unwrap().contains("deleted"), "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_past_the_limit_and_bad_creates_are_refused_clearly() {
    let s = setup_batches();
    let (_ingress, base) = start_ingress(&s.config).await;
    let http = Http::new(&base);
    // a declared upload over max_file_bytes: 413 before the body is read
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
        let head = "POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer acme-key\r\n\
                    Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1100000\r\n\r\n--b\r\n";
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut answer)).await.unwrap().unwrap();
        assert_eq!(&answer, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&answer));
    }
    // not multipart
    let (status, v) = http.json("POST", "/v1/files", Some("acme-key"), Some(json!({"purpose": "batch"}))).await;
    assert_eq!(status, 422, "{v}");
    let file = upload(&base, "acme-key", chat_lines("echo", 3)).await;
    let cases = [
        (json!({"input_file_id": file, "endpoint": "/v1/moderations", "completion_window": "24h"}), 422, "endpoint"),
        (
            json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "soon"}),
            422,
            "completion_window",
        ),
        (
            json!({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
            404,
            "input_file_id",
        ),
    ];
    for (body, want, param) in cases {
        let (status, v) = http.json("POST", "/v1/batches", Some("acme-key"), Some(body)).await;
        assert_eq!((status, v["error"]["param"].as_str()), (want, Some(param)), "{v}");
    }
    // another tenant's file cannot be batched
    let (status, _) = http
        .json(
            "POST",
            "/v1/batches",
            Some("globex-key"),
            Some(json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"})),
        )
        .await;
    assert_eq!(status, 404);
    // duplicate custom ids are refused before anything runs
    let twice = upload(&base, "acme-key", chat_lines("echo", 2) + &chat_lines("echo", 1)).await;
    let (status, v) = http
        .json(
            "POST",
            "/v1/batches",
            Some("acme-key"),
            Some(json!({"input_file_id": twice, "endpoint": "/v1/chat/completions", "completion_window": "24h"})),
        )
        .await;
    assert_eq!(status, 422, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("appears twice"), "{v}");
}
