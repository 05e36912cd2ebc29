//! The chaos tests' caller: publishes through outages, collects every reply
//! in the background, and reports `sent / answered / lost / duplicated`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use retro_fleet_schemas::{codec, headers, subjects, InferRequest, InferResult, Priority, Status};

/// Every reply the caller saw, by request id (the reply subject's last token).
#[derive(Default)]
pub struct Seen {
    pub results: HashMap<String, Vec<InferResult>>,
}

/// A NATS caller that collects replies in the background, so the test can
/// break things meanwhile.
pub struct Chaos {
    pub js: async_nats::jetstream::Context,
    pub inbox: String,
    pub seen: Arc<Mutex<Seen>>,
}

impl Chaos {
    pub async fn connect(url: &str) -> Chaos {
        let client = async_nats::ConnectOptions::new().max_reconnects(None).connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(format!("{inbox}.*")).await.unwrap();
        let seen: Arc<Mutex<Seen>> = Default::default();
        let s = seen.clone();
        tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let kind = msg.headers.as_ref().and_then(|h| h.get(headers::KIND)).map(|v| v.as_str().to_string());
                if kind.as_deref() != Some(headers::KIND_RESULT) {
                    continue;
                }
                let id = msg.subject.rsplit('.').next().unwrap().to_string();
                let result: InferResult = codec::decode(None, &msg.payload).expect("results decode");
                s.lock().unwrap().results.entry(id).or_default().push(result);
            }
        });
        Chaos { js, inbox, seen }
    }

    pub fn reply_subject(&self, id: &str) -> String {
        format!("{}.{id}", self.inbox)
    }

    /// Publishes until JetStream acknowledges (retrying through outages with
    /// the same `Nats-Msg-Id`, so a retry is never a second request).
    pub async fn publish(&self, subject: &str, id: &str, mut h: HeaderMap, payload: Bytes) {
        h.insert(headers::REPLY, self.reply_subject(id).as_str());
        let start = Instant::now();
        loop {
            let attempt = async {
                self.js.publish_with_headers(subject.to_string(), h.clone(), payload.clone()).await?.await?;
                Ok::<_, async_nats::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(5), attempt).await {
                Ok(Ok(())) => return,
                _ => {
                    assert!(start.elapsed() < Duration::from_secs(60), "publish of {id} never accepted");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    pub async fn publish_request(&self, p: Priority, req: &InferRequest, extra: &[(&str, String)]) {
        let mut h = HeaderMap::new();
        h.insert(headers::MSG_ID, req.id.as_str());
        for (k, v) in extra {
            h.insert(*k, v.as_str());
        }
        self.publish(&subjects::request(p, &req.model), &req.id, h, Bytes::from(codec::encode(req))).await;
    }

    /// Publishes `req` at `p` to `tenant`'s lane.
    pub async fn publish_as(&self, p: Priority, tenant: &str, req: &InferRequest) {
        let h = retro_fleet_schemas::Envelope::new(req.id.as_str()).tenant(tenant).headers();
        let subject = subjects::tenant_request(p, &req.model, tenant);
        self.publish(&subject, &req.id, h, Bytes::from(codec::encode(req))).await;
    }

    /// A copy of every reply so far, by id (no lock held across awaits).
    pub fn snapshot(&self) -> HashMap<String, Vec<InferResult>> {
        self.seen.lock().unwrap().results.clone()
    }

    /// Ids with at least one reply.
    pub fn replied(&self) -> usize {
        self.seen.lock().unwrap().results.len()
    }

    /// Waits until `n` ids have a reply (failing after a minute).
    pub async fn wait_for_replies(&self, n: usize) {
        let start = Instant::now();
        while self.replied() < n {
            assert!(start.elapsed() < Duration::from_secs(60), "stalled at {} replies", self.replied());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `ids` all have a reply or `timeout` passes.
    pub async fn wait_replies(&self, ids: &[String], timeout: Duration) {
        let start = Instant::now();
        loop {
            let missing = {
                let seen = self.seen.lock().unwrap();
                ids.iter().filter(|id| !seen.results.contains_key(*id)).count()
            };
            if missing == 0 || start.elapsed() > timeout {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every id in `ids` has a stored result or `timeout` passes.
    pub async fn wait_stored(&self, tenant: &str, ids: &[String], timeout: Duration) {
        let start = Instant::now();
        let mut missing: Vec<String> = ids.to_vec();
        while !missing.is_empty() && start.elapsed() < timeout {
            let stored = self.stored(tenant, &missing).await;
            missing.retain(|id| !stored.contains_key(id));
            if !missing.is_empty() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Stored results of `ids`.
    pub async fn stored(&self, tenant: &str, ids: &[String]) -> HashMap<String, InferResult> {
        futures::stream::iter(ids.iter().cloned())
            .map(|id| async move {
                let stored = retro_fleet_schemas::stored::stored_result(&self.js, tenant, &id).await.unwrap();
                stored.map(|r| (id, r))
            })
            .buffer_unordered(64)
            .filter_map(|x| async move { x })
            .collect()
            .await
    }

    /// Counts and prints the outcome of `ids`; `need_reply` when the caller
    /// was connected throughout (else a stored result counts as answered).
    pub async fn report(&self, name: &str, tenant: &str, ids: &[String], need_reply: bool) -> Report {
        let stored = self.stored(tenant, ids).await;
        let seen = self.snapshot();
        let mut r = Report { sent: ids.len(), ..Default::default() };
        for id in ids {
            let replies = seen.get(id);
            let stored = stored.get(id);
            let answered = stored.is_some() && (!need_reply || replies.is_some());
            if answered {
                r.answered += 1;
                if stored.unwrap().status == Status::Error {
                    r.errors += 1;
                }
            }
            if let Some(replies) = replies {
                r.repeated += replies.len() - 1;
                let mut distinct: Vec<&InferResult> = Vec::new();
                for x in replies.iter().chain(stored) {
                    if !distinct.contains(&x) {
                        distinct.push(x);
                    }
                }
                if distinct.len() > 1 {
                    r.duplicated += 1;
                    if r.examples.len() < 3 {
                        r.examples.push(format!("{id}: {distinct:?}"));
                    }
                }
            }
        }
        r.lost = r.sent - r.answered;
        let info = self.js.get_stream(subjects::RESULTS_STREAM).await.unwrap().info().await.unwrap().state.clone();
        // a second write for an id replaces the first (one message per
        // subject), which leaves a gap between messages and last sequence
        r.overwritten = info.last_sequence.saturating_sub(info.first_sequence.saturating_sub(1)) - info.messages;
        r.duplicated += r.overwritten as usize;
        println!(
            "chaos {name}: sent {} / answered {} / lost {} / duplicated {} (error results {}, identical repeats {}, results overwritten {})",
            r.sent, r.answered, r.lost, r.duplicated, r.errors, r.repeated, r.overwritten
        );
        r
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub sent: usize,
    pub answered: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub errors: usize,
    pub repeated: usize,
    pub overwritten: u64,
    pub examples: Vec<String>,
}

impl Report {
    pub fn assert_clean(&self) {
        assert_eq!(self.lost, 0, "lost requests: {self:?}");
        assert_eq!(self.duplicated, 0, "two different results for one id: {self:?}");
    }
}
