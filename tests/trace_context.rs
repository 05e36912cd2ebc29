//! W3C trace context through NATS: the ingress forwards the caller's
//! `traceparent` (or starts a trace) in the request's NATS headers, and the
//! worker logs the trace id with everything it says about that request.
//! With `[telemetry.otlp]` set, both export their spans of the request to a
//! real OTLP/HTTP receiver (below, decoding the official protobuf), as one
//! trace; without it, nothing is exported even when the standard `OTEL_*`
//! environment names a collector.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use common::*;
use futures::StreamExt;
use retro_fleet_schemas::headers;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_travels_from_http_through_nats_to_the_worker_logs() {
    let s = setup("");
    let mut worker = start_worker(&s.config, &[]).await;
    let (_ingress, base) = start_ingress(&s.config).await;
    let client = async_nats::connect(s.nats.url()).await.unwrap();
    let mut seen = client.subscribe("fleet.req.>").await.unwrap();
    client.flush().await.unwrap();

    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/v1/infer/async"))
        .header("traceparent", given)
        .json(&serde_json::json!({"model": "echo", "prompt": "traced"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let msg = tokio::time::timeout(Duration::from_secs(10), seen.next()).await.unwrap().unwrap();
    assert_eq!(msg.headers.unwrap().get(headers::TRACEPARENT).unwrap().as_str(), given);

    // no trace context, or a malformed one: the ingress starts a trace
    for bad in [None, Some("00-xyz")] {
        let mut req = http.post(format!("{base}/v1/infer/async"));
        if let Some(b) = bad {
            req = req.header("traceparent", b);
        }
        let r = req.json(&serde_json::json!({"model": "echo", "prompt": "untraced"})).send().await.unwrap();
        assert_eq!(r.status(), 202);
        let msg = tokio::time::timeout(Duration::from_secs(10), seen.next()).await.unwrap().unwrap();
        let started = msg.headers.unwrap().get(headers::TRACEPARENT).unwrap().as_str().to_string();
        assert!(headers::is_traceparent(&started), "{started}");
        assert_ne!(started, given);
    }

    // a request the worker has to dead-letter: its warning carries the trace id
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "poison-traced");
    h.insert(headers::TRACEPARENT, format!("00-{trace}-b7ad6b7169203331-01").as_str());
    let js = async_nats::jetstream::new(client.clone());
    js.publish_with_headers("fleet.req.normal.echo", h, "not msgpack".into()).await.unwrap().await.unwrap();
    let start = Instant::now();
    loop {
        let log = worker.log();
        if let Some(line) = log.lines().find(|l| l.contains("dead-lettering")) {
            assert!(line.contains(trace), "the dead-letter warning names the trace: {line}");
            break;
        }
        assert!(worker.alive() && start.elapsed() < Duration::from_secs(20), "no dead-letter warning:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A span as the receiver got it, with the service that sent it.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    start_ns: u64,
    end_ns: u64,
    events: Vec<String>,
}

/// An OTLP/HTTP receiver on a free port: every span of every export it gets.
async fn receiver() -> (String, Arc<Mutex<Vec<Got>>>, Arc<Mutex<usize>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    use prost::Message;
    let spans = Arc::new(Mutex::new(Vec::new()));
    let exports = Arc::new(Mutex::new(0));
    let (into, count) = (spans.clone(), exports.clone());
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (into, count) = (into.clone(), count.clone());
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                *count.lock().unwrap() += 1;
                let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => Some(s.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        into.lock().unwrap().push(Got {
                            service: service.clone(),
                            name: span.name,
                            trace: hex(&span.trace_id),
                            id: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                            start_ns: span.start_time_unix_nano,
                            end_ns: span.end_time_unix_nano,
                            events: span.events.into_iter().map(|e| e.name).collect(),
                        });
                    }
                }
                ([("content-type", "application/x-protobuf")], ExportTraceServiceResponse::default().encode_to_vec())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans, exports)
}

/// Starts `args` with `env`, ready once `/health/ready` at `port` answers.
async fn serving(config: &std::path::Path, args: &[&str], port: u16, env: &[(&str, String)]) -> Proc {
    let mut p = Proc::start(config, args, env);
    wait_ready(&format!("http://127.0.0.1:{port}/health/ready"), &mut p).await;
    p
}

/// The export settings of a test: the SDK's batch sent every 100 ms.
fn quick_export(port: u16) -> Vec<(&'static str, String)> {
    vec![("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()), ("FLEET_METRICS_LISTEN", format!("127.0.0.1:{port}"))]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_the_ingress_and_the_worker() {
    let (collector, spans, _) = receiver().await;
    let s = setup(&format!("[telemetry.otlp]\nendpoint = \"{collector}\"\n"));
    let wport = free_port();
    let mut worker = serving(&s.config, &["worker"], wport, &quick_export(wport)).await;
    wait_log(&mut worker, "worker pulling").await;
    let iport = free_port();
    let listen = format!("127.0.0.1:{iport}");
    let _ingress = serving(&s.config, &["ingress", "--listen", &listen], iport, &quick_export(free_port())).await;

    let (trace, caller_span) = ("5bf92f3577b34da6a3ce929d0e0e4736", "10f067aa0ba902b7");
    let r = reqwest::Client::new()
        .post(format!("http://{listen}/v1/infer"))
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .json(&serde_json::json!({"model": "echo", "prompt": "one trace please", "params": {"temperature": 0.0}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let result: serde_json::Value = r.json().await.unwrap();
    let queued_ms = result["timings"]["queued_ms"].as_f64().unwrap();

    // the worker's spans end before the reply; the ingress's once it answered
    let want =
        ["POST /v1/infer", "publish", "queue wait", "handle", "cache lookup", "generate", "store result", "reply"];
    let start = Instant::now();
    let got = loop {
        let got: Vec<Got> = spans.lock().unwrap().iter().filter(|g| g.trace == trace).cloned().collect();
        if want.iter().all(|w| got.iter().any(|g| g.name == *w)) {
            break got;
        }
        let names: Vec<&str> = got.iter().map(|g| g.name.as_str()).collect();
        assert!(start.elapsed() < Duration::from_secs(20), "spans of the trace so far: {names:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let one = |name: &str| {
        let all: Vec<&Got> = got.iter().filter(|g| g.name == name).collect();
        assert_eq!(all.len(), 1, "one {name} span: {got:#?}");
        all[0].clone()
    };
    let (call, publish, wait, handle) = (one("POST /v1/infer"), one("publish"), one("queue wait"), one("handle"));
    assert_eq!((call.service.as_str(), call.parent.as_str()), ("retro-fleet-ingress", caller_span), "{call:?}");
    assert_eq!((publish.service.as_str(), publish.parent.as_str()), ("retro-fleet-ingress", call.id.as_str()));
    for worker_span in [&wait, &handle] {
        assert_eq!(worker_span.service, "retro-fleet-worker");
        assert_eq!(worker_span.parent, publish.id, "{worker_span:?} is a child of the publish");
    }
    for child in ["cache lookup", "generate", "store result", "reply"] {
        let c = one(child);
        assert_eq!((c.service.as_str(), c.parent.as_str()), ("retro-fleet-worker", handle.id.as_str()), "{c:?}");
    }
    assert!(one("generate").events.iter().any(|e| e == "first token"), "{:?}", one("generate"));
    let waited_ms = (wait.end_ns - wait.start_ns) as f64 / 1e6;
    assert!((waited_ms - queued_ms).abs() <= 5.0, "queue wait span {waited_ms} ms, result {queued_ms} ms");
    // in time: the call, its publish, the worker taking it, its reply
    // before the call's answer (the worker acks after replying)
    let reply = one("reply");
    let order = [call.start_ns, publish.start_ns, handle.start_ns, reply.start_ns, call.end_ns];
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "{order:?}");
    let services: std::collections::BTreeSet<&str> = got.iter().map(|g| g.service.as_str()).collect();
    assert_eq!(services.len(), 2, "{services:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_otlp_settings_nothing_is_exported_and_the_context_still_reaches_the_reply() {
    let (collector, spans, exports) = receiver().await;
    let s = setup("");
    // the standard variables name a collector: they alone turn nothing on
    let mut env = quick_export(free_port());
    env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", collector.clone()));
    env.push(("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", format!("{collector}/v1/traces")));
    let wport = free_port();
    let mut wenv = env.clone();
    wenv[1] = ("FLEET_METRICS_LISTEN", format!("127.0.0.1:{wport}"));
    let mut worker = serving(&s.config, &["worker"], wport, &wenv).await;
    wait_log(&mut worker, "worker pulling").await;
    let iport = free_port();
    let listen = format!("127.0.0.1:{iport}");
    let _ingress = serving(&s.config, &["ingress", "--listen", &listen], iport, &env).await;
    let r = reqwest::Client::new()
        .post(format!("http://{listen}/v1/infer"))
        .json(&serde_json::json!({"model": "echo", "prompt": "not exported"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // a NATS caller's trace context comes back on its reply and its result
    let client = async_nats::connect(s.nats.url()).await.unwrap();
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, "traced-over-nats");
    h.insert(headers::TRACEPARENT, given);
    h.insert(headers::REPLY, inbox.as_str());
    let req = request("traced-over-nats", "echo", "hello");
    let js = async_nats::jetstream::new(client.clone());
    let body = retro_fleet_schemas::codec::encode(&req);
    js.publish_with_headers("fleet.req.normal.echo", h, body.into()).await.unwrap().await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next()).await.unwrap().unwrap();
    assert_eq!(reply.headers.unwrap().get(headers::TRACEPARENT).map(|v| v.as_str()), Some(given));

    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(*exports.lock().unwrap(), 0, "exported without settings: {:?}", spans.lock().unwrap());
}
